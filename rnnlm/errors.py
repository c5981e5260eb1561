"""What a user did wrong, and how every entry point reports it.

Every mistake a user can make (a bad setting, a missing file, a corrupt checkpoint, an unreachable dataset) raises
a :class:`UserError` whose message says what was wrong, what was expected and how to fix it. The command-line
entry points run under :func:`run_main`, which prints that message alone and exits with status 1; the Python
traceback, which only helps someone debugging rnnlm itself, is shown when ``RNNLM_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEBUG_VARIABLE = "RNNLM_DEBUG"


class UserError(ValueError):
    """Bad input from the user: the message is the whole report."""


class ConfigError(UserError):
    """A setting that cannot work (out of range, contradicting another one, or unknown)."""


def check_positive_int(name: str, value: object, error: type[UserError] = ConfigError) -> None:
    """Refuse anything but a positive integer (``bool`` included, which Python counts as an int)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise error(f"{name} must be a positive integer, got {value!r}.")


def check_probability(name: str, value: object, error: type[UserError] = ConfigError) -> None:
    """Refuse a dropout-style probability outside [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise error(f"{name} must be a probability in [0, 1), got {value!r}.")


def user_error_in(exc: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``exc``, if any (Lightning and jsonargparse wrap the exceptions they see)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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

