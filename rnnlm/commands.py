"""What the command faces share: the ``--device`` option and reading a text input (a file, or ``-`` for stdin).

Every command that runs a model has one ``--device`` option, declared by :func:`add_device_option` and resolved
by :func:`resolve_device`: ``auto`` (the default: ``cuda`` when torch sees a GPU, else ``cpu``), ``cpu``,
``cuda``, ``cuda:N`` or ``mps`` (where torch has it). A name that cannot work is refused with one line saying so.

A command that reads text one item per line reads it with :func:`read_lines` (:func:`open_input` gives the stream
itself): UTF-8 with universal newlines, as ``datasets`` reads text files; a missing file, a folder or text that is
not UTF-8 is refused with a message that says which.
"""

from __future__ import annotations

import argparse
import difflib
import io
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO, TypeVar

import torch
from tqdm import tqdm

from rnnlm.errors import ConfigError, UserError

T = TypeVar("T")
DEVICE_HELP = "where the model runs: auto (default: cuda when available, else cpu), cpu, cuda, cuda:N or mps"


# ------------------------------------------------------------------------------------------------ arguments
class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose mistakes are one line naming the bad flag and the closest valid one, with exit
    status 1 like every other mistake (argparse prints its whole usage and exits 2); ``--help`` still prints it."""

    def error(self, message: str):
        flags = sorted({s for action in self._actions for s in action.option_strings if s.startswith("--")
                        and action.help != argparse.SUPPRESS})
        hint = ""
        if message.startswith("unrecognized arguments:"):
            bad = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("-")]
            close = [difflib.get_close_matches(b, flags, n=1, cutoff=0.6) for b in bad]
            hint = "".join(f" Did you mean {c[0]} (for {b})?" for b, c in zip(bad, close, strict=True) if c)
        raise UserError(f"{self.prog}: {message}.{hint} See {self.prog} --help.")


# ------------------------------------------------------------------------------------------------ --device
def add_device_option(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """Add ``--device`` (default ``auto``) to ``parser``; ``aliases`` are older spellings, accepted but not shown."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    for alias in aliases:
        parser.add_argument(alias, dest="device", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device of a ``--device`` value; a :class:`ConfigError` for a name that is unknown or unavailable."""
    if isinstance(name, torch.device):
        name = str(name)
    spelled = name.strip().lower()
    if spelled == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spelled == "gpu":  # Lightning's word (the old evaluate --accelerator gpu)
        spelled = "cuda"
    choices = "auto, cpu, cuda, cuda:N" + (", mps" if _mps_available() else "")
    try:
        device = torch.device(spelled)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"Unknown --device {name!r}; choose one of {choices}.")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name!r} asks for a GPU, but torch sees none; use --device cpu (or auto).")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name!r}: there is no GPU {device.index}; torch sees {count} "
                              f"(cuda:0 to cuda:{count - 1}).")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"--device {name!r}: this torch has no MPS device; choose one of {choices}.")
    return device


# ------------------------------------------------------------------------------------------------ input text
def open_input(path: str, error: type[UserError] = UserError) -> tuple[TextIO, str]:
    """The text input ``path`` (``-``: standard input) as a stream, UTF-8 with universal newlines, and its name for
    messages. Close it with :func:`close_input`. A missing file or a folder raises ``error``."""
    if path == "-":
        buffer = getattr(sys.stdin, "buffer", None)
        stream = io.TextIOWrapper(buffer, encoding="utf-8") if buffer is not None else sys.stdin
        return stream, "standard input"
    if not os.path.exists(path):
        raise error(f"Input file {path!r} does not exist; give a text file, or - to read standard input.")
    if os.path.isdir(path):
        raise error(f"--input {path!r} is a folder; give a text file, or - to read standard input.")
    return open(path, encoding="utf-8"), repr(path)  # noqa: SIM115 - closed by close_input


def close_input(stream: TextIO) -> None:
    """Close a stream of :func:`open_input`; standard input stays open."""
    if stream is sys.stdin:
        return
    if getattr(sys.stdin, "buffer", None) is not None and getattr(stream, "buffer", None) is sys.stdin.buffer:
        stream.detach()  # the UTF-8 reader of stdin: let go of stdin without closing it
        return
    stream.close()


def read_lines(path: str, error: type[UserError] = UserError) -> Iterator[str]:
    """The lines of the text input ``path`` (``-``: standard input) without their line ends. The input is checked
    at once (a missing file or a folder raises ``error`` here), then read as the lines are taken; text that is
    not UTF-8 raises ``error`` when it is reached."""
    stream, name = open_input(path, error)
    return _lines(stream, name, error)


def _lines(stream: TextIO, name: str, error: type[UserError]) -> Iterator[str]:
    try:
        for line in stream:
            yield line.removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as err:
        raise error(f"{name} is not UTF-8 text ({err}). Convert it first, e.g. with iconv -f LATIN1 -t UTF-8.") \
            from None
    finally:
        close_input(stream)


# ------------------------------------------------------------------------------------------------ progress
def progress(items: Iterable[T], source: str, unit: str) -> Iterator[T]:
    """``items`` with a progress bar on stderr: live on a terminal, and every 30 s otherwise (a log file, a batch
    job), so that a long run always shows it is alive. Nothing is written to stdout, which holds results."""
    interactive = sys.stderr.isatty()
    yield from tqdm(items, desc=f"rnnlm: {'stdin' if source == '-' else Path(source).name}", unit=f" {unit}",
                    file=sys.stderr, mininterval=0.5 if interactive else 30.0, leave=interactive, dynamic_ncols=True)
