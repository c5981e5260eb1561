"""What a user did wrong, and how every entry point reports it.

Every mistake a user can make (a bad setting, a missing file, a corrupt checkpoint, an unreachable dataset) raises
a :class:`UserError` whose message says what was wrong, what was expected and how to fix it. The command-line
entry points run under :func:`run_main`, which prints that message alone and exits with status 1; the Python
traceback, which only helps someone debugging rnnlm itself, is shown when ``RNNLM_DEBUG=1``.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEBUG_VARIABLE = "RNNLM_DEBUG"


class UserError(ValueError):
    """Bad input from the user: the message is the whole report."""


class ConfigError(UserError):
    """A setting that cannot work (out of range, contradicting another one, or unknown)."""


class PretrainedError(UserError):
    """A pretrained model (folder, Hub repo) that cannot be found or used. Here, below both, because the network's
    ``from_pretrained`` and the sharing layer's loaders raise the same error for the same folder."""


def check_positive_int(name: str, value: object, error: type[UserError] = ConfigError) -> None:
    """Refuse anything but a positive integer (``bool`` included, which Python counts as an int)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise error(f"{name} must be a positive integer, got {value!r}.")


def check_probability(name: str, value: object, error: type[UserError] = ConfigError) -> None:
    """Refuse a dropout-style probability outside [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise error(f"{name} must be a probability in [0, 1), got {value!r}.")


# What to do about an operating-system error, by its errno: the message names the path, this says the way out.
_OS_ADVICE = {
    errno.ENOENT: "check the path",
    errno.EACCES: "choose a place you can read and write, or change its permissions",
    errno.EPERM: "choose a place you can read and write, or change its permissions",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOSPC: "free space on that disk or write elsewhere; nothing under its final name was left half-written",
    errno.EDQUOT: "your disk quota is used up: free space or write elsewhere",
    errno.EROFS: "that file system is read-only: write elsewhere",
    errno.EEXIST: "choose another name, or remove it first",
}


def user_error_in(exc: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``exc``, if any (Lightning and jsonargparse wrap the exceptions they see);
    an operating-system error (a missing file, no permission, a full disk), undecodable text or a failed allocation
    becomes one, with the path and what to do."""
    seen = set()
    chain = []
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    for exc in chain:
        if isinstance(exc, OSError) and exc.errno in _OS_ADVICE:
            where = f" {exc.filename}" if exc.filename else ""
            return UserError(f"{exc.strerror or exc}:{where}: {_OS_ADVICE[exc.errno]}.")
        if isinstance(exc, UnicodeDecodeError):
            return UserError(f"The input is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it first, e.g. "
                             "`iconv -f LATIN1 -t UTF-8 FILE > FILE.utf8`.")
        if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _ALLOCATION.search(str(exc))):
            return UserError("Not enough memory for this model or batch: lower the batch size or the model size, or "
                             "check the settings (a hidden_size or vocab_size far too large?).")
    return None


_ALLOCATION = re.compile(r"can't allocate memory|not enough memory|out of memory|DefaultCPUAllocator", re.I)


def run_main(main: Callable[..., T], *args, **kwargs) -> T:
    """Run an entry point; a user's mistake ends with its message on stderr and exit status 1, no traceback."""
    try:
        return main(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - anything that is not a user error is re-raised as it was
        error = user_error_in(exc)
        if error is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"rnnlm: error: {error}", file=sys.stderr, flush=True)
        if os.environ.get(DEBUG_VARIABLE) is None:
            print(f"rnnlm: (set {DEBUG_VARIABLE}=1 to see where it was raised)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None

