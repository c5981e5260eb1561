"""Token stream -> contiguous streams -> truncated-BPTT chunks.

The id stream of a split is cut into ``S = world_size * batch_size`` equal rows (the tail that does not fill a
row is dropped). Rank r owns rows ``[r*B, (r+1)*B)``. Chunk k of a rank is

    x = rows[:, k*T     : (k+1)*T    ]
    y = rows[:, k*T + 1 : (k+1)*T + 1]

so row i of chunk k+1 starts exactly where row i of chunk k ended and the carried hidden state of row i is
the right context for it. Every position but the first of each row is a target exactly once per epoch; the
last chunk is shorter when ``T`` does not divide ``L - 1``. Every rank has the same row length and so the same
number of chunks, which DDP needs (ranks with different numbers of batches hang).

    stream:  t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 ...
    rows (B=2, L=6):   row 0: t0 t1 t2 t3 t4 t5      chunk 0 (T=2): x=[t0 t1] y=[t1 t2]   chunk 1: x=[t2 t3] ...
                       row 1: t6 t7 t8 t9 t10 t11                   x=[t6 t7] y=[t7 t8]            x=[t8 t9] ...

For a bidirectional model each batch also carries the backward direction's chunk k, cut the same way from the
rows read right to left (``rows[:, ::-1]``): its targets are the previous tokens, its chunks follow each other
with no gap and no overlap, so the backward state is carried too, and every token but the last of each row is a
backward target exactly once per epoch.

:class:`ChunkLoader` is a plain iterable rather than a ``DataLoader``: Lightning injects a (shuffling)
``DistributedSampler`` into ``DataLoader`` objects under DDP, but leaves other iterables alone, so nothing can
re-order the chunks whatever the Trainer flags are. Batches are copied out of the memory-mapped ids one chunk
at a time, so memory does not grow with the corpus.

Mid-epoch resume: the loader follows Lightning's stateful-loader protocol. Its state is ``position``, the number
of chunks of the current epoch the model has *trained on* (the LightningModule sets it after each step; the
loader cannot count it itself, because Lightning fetches one batch ahead), plus the stream layout. After
``load_state_dict`` the next iteration starts at that chunk, once; ``len()`` stays the whole epoch, as Lightning
expects when it resumes a partly done epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def cut_streams(ids: np.ndarray, num_streams: int) -> np.ndarray:
    """View ``ids`` as ``[num_streams, L]`` contiguous rows (no copy; the ragged tail is dropped)."""
    length = len(ids) // num_streams
    return ids[: num_streams * length].reshape(num_streams, length)


def rank_rows(ids: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0) -> np.ndarray:
    """The ``[batch_size, L]`` rows that ``rank`` owns when the stream is shared by ``world_size`` ranks."""
    rows = cut_streams(ids, batch_size * world_size)
    return rows[rank * batch_size : (rank + 1) * batch_size]


class ChunkLoader:
    """Serves ``(x, y)`` int64 tensors of shape ``[B, T]`` in stream order, never shuffled.

    With ``bidirectional=True`` it serves ``(x, y, x_backward, y_backward)``, the last two from the reversed rows.
    """

    def __init__(self, rows: np.ndarray, bptt: int, pin_memory: bool = False, bidirectional: bool = False) -> None:
        if rows.ndim != 2 or rows.shape[1] < 2:
            raise ValueError(f"need rows of at least 2 tokens, got shape {rows.shape}")
        self.rows = rows
        self.bptt = bptt
        self.pin_memory = pin_memory
        self.bidirectional = bidirectional
        self.position = 0  # chunks of this epoch already trained on
        self._start = 0  # where the next iteration begins (set by load_state_dict)

    def __len__(self) -> int:
        return -(-(self.rows.shape[1] - 1) // self.bptt)

    @property
    def tokens_per_epoch(self) -> int:
        """Targets per epoch on this rank."""
        return self.rows.shape[0] * (self.rows.shape[1] - 1)

    def _chunk(self, rows: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = k * self.bptt
        block = torch.from_numpy(np.ascontiguousarray(rows[:, start : start + self.bptt + 1], np.int64))
        x, y = block[:, :-1].contiguous(), block[:, 1:].contiguous()
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def layout(self) -> dict[str, int]:
        """What a saved position refers to: resuming is only meaningful on the same chunks."""
        return {"rows": self.rows.shape[0], "row_length": self.rows.shape[1], "bptt": self.bptt}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, **self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = int(state["position"])
        if position <= 0 or position >= len(self):
            self._start = self.position = 0  # saved at an epoch boundary: the next epoch starts afresh
            return
        saved = {k: state.get(k) for k in self.layout()}
        if saved != self.layout():
            raise ValueError(
                f"Cannot resume mid-epoch: the checkpoint was written at chunk {position} of streams laid out as "
                f"{saved}, but this run cuts the data into {self.layout()} (rows per process, tokens per row, chunk "
                "length). Resume with the same data, data.batch_size, data.bptt and number of processes, or resume "
                "from a checkpoint written at the end of an epoch."
            )
        self._start = self.position = position

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        start, self._start = self._start, 0
        self.position = start  # set now, not at the first next(): a new epoch begins at iter()
        return self._chunks(start)

    def _chunks(self, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        reversed_rows = self.rows[:, ::-1]
        for k in range(start, len(self)):
            if self.bidirectional:
                yield (*self._chunk(self.rows, k), *self._chunk(reversed_rows, k))
            else:
                yield self._chunk(self.rows, k)
