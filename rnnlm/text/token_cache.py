"""The token cache: every split's token ids, encoded once and memory-mapped by every process, and the tokenizers
trained for them.

Under the cache folder (``$RNNLM_CACHE``, default ``~/.cache/rnnlm``)::

    tokens/<split>-<text key>-<tokenizer hash>/ids.bin      the ids, one unsigned integer each (uint16 or uint32)
    tokens/<split>-<text key>-<tokenizer hash>/meta.json    their record: format version, entry key, dtype, counts
    tokenizers/<level>-<key>/tokenizer.json                 a tokenizer trained on a training split

The text key changes whenever the split's text may have changed (``sources.Corpus.keys``) and the tokenizer hash
whenever the tokenizer does, so an entry is never updated: different input makes a different entry. Entries are
written under a file lock (``<entry>.lock``) and atomically, ``ids.bin`` before ``meta.json``, so processes that
start together (the ranks of a job, jobs sharing a cache) write each entry once and all read the same complete
files, and an entry without ``meta.json`` was never finished. Reading checks the files against their record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from rnnlm.files import atomic_open, write_atomically
from rnnlm.text.encoding import encode_to_file
from rnnlm.text.sources import DataError, digest
from rnnlm.text.tokenization import Encoder

# The format of an entry (ids.bin and meta.json): an entry of another version is refused, not misread.
TOKEN_CACHE_FORMAT_VERSION = 1
# Part of a cached tokenizer's key: raise it when training would give another tokenizer from the same settings.
TOKENIZER_CACHE_VERSION = 1

IDS = "ids.bin"
META = "meta.json"


def _lock(folder: Path) -> FileLock:
    return FileLock(str(folder) + ".lock")


class TokenCache:
    """The token ids of corpus splits, one entry (folder) per split text and tokenizer, under ``cache_dir/tokens``."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.root = Path(cache_dir) / "tokens"

    def entry(self, split: str, text_key: str, tokenizer: Tokenizer) -> Path:
        """The folder of ``split``'s ids: its name is the entry's key (the split, its text, the tokenizer)."""
        return self.root / f"{split}-{text_key}-{digest(tokenizer.to_str())}"

    @staticmethod
    def complete(folder: Path) -> bool:
        return (folder / META).exists()

    def prepare(
        self, folder: Path, split: str, encoder: Encoder, texts: Iterable[list[str]], documents: int | None,
        workers: int = 1,
    ) -> bool:
        """Encode ``texts`` (batches of documents, read only on a miss) into ``folder`` unless it is there already.

        Returns whether it was (a cache hit). One process encodes; others asking for the same entry meanwhile
        wait for it and reuse it.
        """
        folder.mkdir(parents=True, exist_ok=True)
        with _lock(folder):
            if self.complete(folder):
                return True
            self._write(folder, split, encoder, texts, documents, workers)
            return False

    @staticmethod
    def _write(
        folder: Path, split: str, enc: Encoder, texts: Iterable[list[str]], documents: int | None, workers: int
    ) -> None:
        start = time.perf_counter()
        with atomic_open(folder / IDS) as f, tqdm(
            total=documents, desc=f"encoding {split}", unit="doc", leave=False, disable=(documents or 10**9) < 5000
        ) as bar:
            stats = encode_to_file(texts, enc, f, workers, bar.update)
        meta = {
            "version": TOKEN_CACHE_FORMAT_VERSION,
            "key": folder.name,
            "split": split,
            "dtype": enc.dtype.name,
            "tokens": stats.tokens,
            "documents": stats.documents,
            "characters": stats.characters,
            "bytes": stats.bytes,
            "encoder": enc.path,
            "workers": workers,
            "seconds": round(time.perf_counter() - start, 3),
        }
        write_atomically(folder / META, json.dumps(meta, indent=1))  # last: it marks the entry complete
        print(
            f"rnnlm: encoded {split}: {stats.tokens:,} tokens from {stats.characters:,} characters in "
            f"{meta['seconds']:.1f}s ({enc.path}, {workers} process{'es' if workers > 1 else ''}) -> {folder}",
            flush=True,
        )

    def load(self, folder: Path, vocab_size: int) -> tuple[np.ndarray, dict]:
        """The entry's ids (memory-mapped, not read into memory) and its record, after checking that they agree
        with each other and with a vocabulary of ``vocab_size``."""
        meta = self.read_meta(folder)
        ids_path = folder / IDS
        expected = meta["tokens"] * np.dtype(meta["dtype"]).itemsize
        actual = ids_path.stat().st_size if ids_path.exists() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual:,} bytes"
            raise DataError(
                f"The token cache {ids_path} {found}, but its meta.json records {meta['tokens']:,} {meta['dtype']} "
                f"ids ({expected:,} bytes): the file is truncated or was changed after it was written. Delete the "
                f"folder {folder} and run again to rebuild it (no other cache is affected)."
            )
        ids = (
            np.memmap(ids_path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
            if meta["tokens"]
            else np.empty(0, dtype=meta["dtype"])
        )
        # One sequential read (page cache, no copy): ids beyond the vocabulary mean the file is not this entry's.
        if len(ids) and int(ids.max()) >= vocab_size:
            raise DataError(
                f"The token cache {ids_path} holds id {int(ids.max())}, beyond this tokenizer's {vocab_size} "
                f"entries: the file does not belong to this cache entry. Delete the folder {folder} and run again "
                "to rebuild it."
            )
        return ids, meta

    @staticmethod
    def read_meta(folder: Path) -> dict:
        """The entry's record, checked against the entry it is in and the format this version reads."""
        path = folder / META
        try:
            meta = json.loads(path.read_text())
            meta["tokens"], np.dtype(meta["dtype"])  # noqa: B018 - both must be present and valid
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"The token cache record {path} is unreadable ({type(err).__name__}: {err}). Delete the folder "
                f"{folder} and run again to rebuild it."
            ) from None
        key = meta.get("key")
        if key is not None and key != folder.name:
            raise DataError(
                f"The token cache in {folder} was written for another dataset or tokenizer (its record says "
                f"{key!r}). Delete the folder and run again to rebuild it."
            )
        if meta.get("version") != TOKEN_CACHE_FORMAT_VERSION:
            raise DataError(
                f"The token cache in {folder} was written by another version of rnnlm (cache format "
                f"{meta.get('version')!r}, this one reads {TOKEN_CACHE_FORMAT_VERSION}). Delete the folder to "
                "rebuild it."
            )
        return meta


def cached_tokenizer(
    cache_dir: str | Path,
    level: str,
    train_key: str,
    settings: tuple,
    train: Callable[[], Tokenizer],
) -> Tokenizer:
    """The ``level`` tokenizer trained on the training text keyed ``train_key`` with ``settings``: loaded from
    ``cache_dir/tokenizers`` if it is there, else made by ``train()`` and saved there."""
    key = digest(TOKENIZER_CACHE_VERSION, train_key, level, *settings)
    path = Path(cache_dir) / "tokenizers" / f"{level}-{key}" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every process of a job (torchrun starts them all at once) asks for the tokenizer: one trains it, the
    # others wait for the lock and load what it wrote.
    with _lock(path.parent):
        if path.exists():
            rank_zero_info(f"rnnlm: tokenizer loaded from cache {path}")
            return Tokenizer.from_file(str(path))
        start = time.perf_counter()
        tok = train()
        write_atomically(path, tok.to_str(pretty=True))
    # Said by whichever process did the work, so a log shows that it happened once.
    print(
        f"rnnlm: trained {level} tokenizer ({tok.get_vocab_size()} entries) in "
        f"{time.perf_counter() - start:.1f}s, saved to {path}",
        flush=True,
    )
    return tok
