"""Writing files so that a reader sees either the old file or the complete new one, never half of it; checking an
output location before anything is written; and reading checkpoints so that loading one runs no code.

Every file rnnlm writes (token ids and their record, tokenizers, checkpoints, the built-in corpus, the commands'
outputs, exported folders) goes through here: the content is written to a temporary file beside the target,
flushed to disk, and renamed over the target, which POSIX makes atomic within one file system (hence beside the
target, not in /tmp). If writing fails the temporary file is removed and the old file, if any, is left as it was.
A command checks its output with :func:`check_output` first, so that a mistake (a folder, the input itself, a
place it cannot write) is refused before any work is done.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from rnnlm.errors import UserError

_TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp(\.\w+)?$")  # what temporary_name makes (and made before)


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` for its content while it is written, ending in ``path``'s suffix (writers such
    as numpy's add their suffix to a name without it). Unique per process and call: processes or threads writing
    the same target never share one; :func:`remove_stale_temporaries` recognises them."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writers killed mid-write (``kill -9``, a lost node) left in ``folder``;
    call it only while no other process can be writing there (e.g. holding the run's lock). Returns them."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        if tmp.is_file() and _TEMPORARY.match(tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is flushed to disk and renamed to ``path``.

    For writers that want a file name rather than an open file. On an exception the temporary file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reaches the disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that replaces ``path`` only once the block finishes without an exception."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a whole new file: the mode must start with 'w', got {mode!r}.")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` (a ``str`` is written as UTF-8) in one step."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


# ------------------------------------------------------------------------------------------ outputs
@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A new private folder beside ``out`` to write a whole folder into; when the block finishes without an exception
    its files are flushed to disk and it is renamed to ``out`` (replacing an ``out`` that exists, so callers check
    first whether they may), so readers see the old folder or the complete new one. On an exception nothing is left.

    Beside ``out``, not in /tmp: a rename is atomic only within one file system."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)  # safetensors writes its file private; the others are as usual
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class OutputError(UserError):
    """An output location that cannot be written, or that would destroy something the user has."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | os.PathLike, flag: str, inputs: tuple = ()) -> Path:
    """The output file ``path`` (given as ``flag``), checked before anything is computed or written: not a folder,
    not one of ``inputs`` (it would be lost before it is read), in a folder that exists or can be made, and
    writable there."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise OutputError(f"{flag} {path} is a folder: give a file name inside it.")
    for given in inputs:
        if given not in (None, "-") and (_same_file(out, Path(given)) or out.resolve() == Path(given).resolve()):
            raise OutputError(f"{flag} {path} is the input {given}: writing it would destroy what is being read. "
                              "Choose another output file.")
    parent = out.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a folder.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {existing} (permission denied). Choose a folder you can "
                          "write to.")
    if out.exists() and not os.access(out, os.W_OK) and not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {path} exists and cannot be replaced (permission denied).")
    return out


# ------------------------------------------------------------------------------------------ checkpoints
class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or holding more than plain data."""


def save_atomically(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` so that readers only ever see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(checkpoint, f)


def load_safely(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``, explaining what is wrong when it cannot be used."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {path!r} does not exist.")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive (ending in its central directory). Anything else would go to torch's
        # legacy unpickler, which fails on arbitrary bytes with bare IndexError/KeyError/... rather than an error.
        with open(path, "rb") as f:
            head = f.read(8)
        raise _unreadable(path, f"not a zip archive, as torch.save writes them; it begins with {head!r}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # it names a function or class to call: what a code payload needs
            raise CheckpointError(
                f"Refused to load {path!r}: it asks to import and call Python objects other than tensors and plain "
                "types, which could run code while loading. rnnlm checkpoints never contain such objects; only "
                f"load files from sources you trust. (torch: {_first_line(err, 'GLOBAL')})"
            ) from None
        raise _unreadable(path, err) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, struct.error) as err:
        raise _unreadable(path, err) from None
    except (IndexError, KeyError, ValueError, TypeError) as err:  # what the unpickler makes of damaged bytes
        raise _unreadable(path, err) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path!r} is not a training checkpoint (it has no model weights).")
    return checkpoint


def _first_line(err: BaseException, containing: str = "") -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if containing and containing in line), lines[0] if lines else "")


def _unreadable(path: str, err: BaseException | str) -> CheckpointError:
    why = err if isinstance(err, str) else f"{type(err).__name__}: {_first_line(err)}"
    return CheckpointError(
        f"Checkpoint {path!r} ({os.path.getsize(path):,} bytes) cannot be read: it is truncated or corrupt, or not a "
        f"checkpoint ({why}). Nothing was changed; resume from another checkpoint of the run (the folder keeps the "
        "best ones besides last.ckpt)."
    )
