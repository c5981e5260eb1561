"""Writing files so that a reader sees either the old file or the complete new one, never half of it.

Every file rnnlm writes for later runs (token ids and their record, tokenizers, checkpoints, the built-in corpus)
goes through here: the content is written to a temporary file beside the target, flushed to disk, and renamed over
the target, which POSIX makes atomic within one file system (hence beside the target, not in /tmp). If writing
fails the temporary file is removed and the old file, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is flushed to disk and renamed to ``path``.

    For writers that want a file name rather than an open file. On an exception the temporary file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    # Unique per process and call: processes or threads writing the same target never share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
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
