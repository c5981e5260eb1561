"""Encoding a split into the token cache: memory bounded by a few batches, every core busy.

Documents arrive in batches (from a memory-mapped ``datasets.Dataset`` or a streamed one); they are regrouped into
tasks of about ``TASK_CHARS`` characters, encoded by a pool of worker processes, and the ids are appended to the
output file in document order as the tasks finish. At most two tasks per worker are in flight, so neither all the
text nor all the ids are ever in memory, whatever the corpus size.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer

from rnnlm.text.tokenization import Encoder, tokenizers_parallelism

TASK_CHARS = 1 << 22  # ~4 M characters per task: large enough to amortise the inter-process copies
PARALLEL_MIN_CHARS = 1 << 25  # below ~32 M characters the pool's start-up costs more than it saves


@dataclass
class EncodeStats:
    tokens: int = 0
    documents: int = 0
    characters: int = 0  # the separator after each document counts as one character (it stands for a newline)
    bytes: int = 0

    def add(self, other: EncodeStats) -> None:
        self.tokens += other.tokens
        self.documents += other.documents
        self.characters += other.characters
        self.bytes += other.bytes


def default_workers() -> int:
    """One encoding process per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def encode_docs(encoder: Encoder, docs: list[str]) -> tuple[np.ndarray, EncodeStats]:
    ids = encoder.encode(docs)
    n_chars = sum(map(len, docs)) + len(docs)
    # ASCII text is one byte per character; only the other documents need encoding to count their bytes.
    n_bytes = sum(len(d) if d.isascii() else len(d.encode("utf-8")) for d in docs) + len(docs)
    return ids, EncodeStats(len(ids), len(docs), n_chars, n_bytes)


def tasks(batches: Iterable[list[str]], max_chars: int = TASK_CHARS) -> Iterator[list[str]]:
    """Regroup batches of documents into lists of about ``max_chars`` characters (order kept)."""
    task: list[str] = []
    size = 0
    for batch in batches:
        for doc in batch:
            task.append(doc)
            size += len(doc) + 1
            if size >= max_chars:
                yield task
                task, size = [], 0
    if task:
        yield task


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(Tokenizer.from_str(tokenizer_json))


def _encode_task(docs: list[str]) -> tuple[np.ndarray, EncodeStats]:
    return encode_docs(_WORKER_ENCODER, docs)  # type: ignore[arg-type]


def _context() -> multiprocessing.context.BaseContext:
    # fork starts in milliseconds and does not re-import the caller's main module; torch resets its thread pool in
    # forked children (as for DataLoader workers) and tokenizers_parallelism(False) keeps the Rust pool out of them.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def encode_to_file(
    batches: Iterable[list[str]],
    encoder: Encoder,
    out: BinaryIO,
    workers: int = 1,
    progress=None,
    task_chars: int = TASK_CHARS,
) -> EncodeStats:
    """Encode every document of ``batches`` (each followed by the separator) and append the ids to ``out``.

    ``workers > 1`` encodes in that many processes; the ids are identical either way. ``progress`` (optional) is
    called with the number of documents done after each task.
    """
    stats = EncodeStats()

    def write(ids: np.ndarray, st: EncodeStats) -> None:
        out.write(ids.astype(encoder.dtype, copy=False).tobytes())
        stats.add(st)
        if progress is not None:
            progress(st.documents)

    if workers <= 1:
        for docs in tasks(batches, task_chars):
            write(*encode_docs(encoder, docs))
        return stats

    pending: deque[Future] = deque()
    with tokenizers_parallelism(False), ProcessPoolExecutor(  # set before the fork: each worker encodes sequentially
        max_workers=workers,
        mp_context=_context(),
        initializer=_init_worker,
        initargs=(encoder.tokenizer.to_str(),),
    ) as pool:
        for docs in tasks(batches, task_chars):
            pending.append(pool.submit(_encode_task, docs))
            if len(pending) >= 2 * workers:
                write(*pending.popleft().result())
        while pending:
            write(*pending.popleft().result())
    return stats
