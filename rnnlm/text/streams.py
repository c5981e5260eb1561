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

Variable-length BPTT (Merity et al. 2017, section 4.1): with ``variable_length=True`` the chunk lengths of an
epoch are drawn rather than fixed: a base length of ``bptt`` with probability 0.95 (else ``bptt / 2``), then a
length from a normal distribution around it with standard deviation ``std``, at least ``min_length``. The chunks
still follow each other with no gap and no overlap (chunk k+1 starts where chunk k ended), so the carried state
stays right and every target is still seen exactly once per epoch; only the places where backpropagation is cut
move from epoch to epoch. The lengths come from a generator seeded by ``(seed, epoch)``, so every DDP rank cuts
the same spans (equal numbers of steps) and a resumed run redraws the same schedule. ``spans()`` is that
schedule: the ``(start, length)`` of every chunk of the epoch, fixed when the epoch is set.

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

from rnnlm.errors import ConfigError


def cut_streams(ids: np.ndarray, num_streams: int) -> np.ndarray:
    """View ``ids`` as ``[num_streams, L]`` contiguous rows (no copy; the ragged tail is dropped)."""
    length = len(ids) // num_streams
    return ids[: num_streams * length].reshape(num_streams, length)


def rank_rows(ids: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0) -> np.ndarray:
    """The ``[batch_size, L]`` rows that ``rank`` owns when the stream is shared by ``world_size`` ranks."""
    rows = cut_streams(ids, batch_size * world_size)
    return rows[rank * batch_size : (rank + 1) * batch_size]


def draw_spans(
    targets: int, bptt: int, seed: int, epoch: int, min_length: int = 5, std: float = 5.0
) -> list[tuple[int, int]]:
    """AWD-LSTM's variable chunk lengths as ``(start, length)`` spans covering ``targets`` positions exactly."""
    rng = np.random.default_rng([seed, epoch])
    lengths: list[np.ndarray] = []
    total = 0
    while total < targets:
        n = (targets - total) // max(bptt // 2, 1) + 16  # surely enough draws for what is left
        base = np.where(rng.random(n) < 0.95, bptt, bptt / 2)
        drawn = np.maximum(min_length, rng.normal(base, std).astype(np.int64))
        lengths.append(drawn)
        total += int(drawn.sum())
    ends = np.cumsum(np.concatenate(lengths))
    count = int(np.searchsorted(ends, targets)) + 1  # the first chunk that reaches the end is the last
    ends = np.minimum(ends[:count], targets)
    starts = np.concatenate([[0], ends[:-1]])
    return [(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)]


class ChunkLoader:
    """Serves ``(x, y)`` int64 tensors of shape ``[B, T]`` in stream order, never shuffled.

    With ``bidirectional=True`` it serves ``(x, y, x_backward, y_backward)``, the last two from the reversed rows.
    With ``variable_length=True`` the chunk lengths are drawn per epoch (see the module's docstring); ``epoch``
    (or :meth:`set_epoch`) picks the epoch whose schedule is served.
    """

    def __init__(
        self,
        rows: np.ndarray,
        bptt: int,
        pin_memory: bool = False,
        bidirectional: bool = False,
        variable_length: bool = False,
        seed: int = 0,
        epoch: int = 0,
        min_length: int = 5,
        std: float = 5.0,
    ) -> None:
        if rows.ndim != 2 or rows.shape[1] < 2:
            raise ValueError(f"need rows of at least 2 tokens, got shape {rows.shape}")
        self.rows = rows
        self.bptt = bptt
        self.pin_memory = pin_memory
        self.bidirectional = bidirectional
        self.position = 0  # chunks of this epoch already trained on
        self._start = 0  # where the next iteration begins (set by load_state_dict)
        self.variable_length = variable_length
        self.seed = seed
        self.min_length = min_length
        self.std = std
        self._spans: list[tuple[int, int]] = []
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Fix the chunk schedule for ``epoch`` (only variable-length chunks depend on it)."""
        self.epoch = epoch
        targets = self.rows.shape[1] - 1
        if self.variable_length:
            self._spans = draw_spans(targets, self.bptt, self.seed, epoch, self.min_length, self.std)
        else:
            self._spans = [(start, min(self.bptt, targets - start)) for start in range(0, targets, self.bptt)]

    def spans(self) -> list[tuple[int, int]]:
        """``(start, length)`` of every chunk of the current epoch in order: chunk k is ``rows[:, start:start+length]``
        with targets shifted by one."""
        return list(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    @property
    def tokens_per_epoch(self) -> int:
        """Targets per epoch on this rank."""
        return self.rows.shape[0] * (self.rows.shape[1] - 1)

    def _chunk(self, rows: np.ndarray, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = torch.from_numpy(np.ascontiguousarray(rows[:, start : start + length + 1], np.int64))
        x, y = block[:, :-1].contiguous(), block[:, 1:].contiguous()
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def layout(self) -> dict[str, int]:
        """What a saved position refers to: resuming is only meaningful on the same chunks."""
        return {"rows": self.rows.shape[0], "row_length": self.rows.shape[1], "bptt": self.bptt,
                "variable_length": self.variable_length, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "epoch": self.epoch, **self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.variable_length and "epoch" in state:
            self.set_epoch(int(state["epoch"]))  # the same draw of chunk lengths as the interrupted epoch
        position = int(state["position"])
        if position <= 0 or position >= len(self):
            self._start = self.position = 0  # saved at an epoch boundary: the next epoch starts afresh
            return
        saved = {k: state.get(k) for k in self.layout()}
        if saved != self.layout():
            raise ConfigError(
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

    def _chunks(self, first: int) -> Iterator[tuple[torch.Tensor, ...]]:
        reversed_rows = self.rows[:, ::-1]
        for start, length in self._spans[first:]:
            if self.bidirectional:
                yield (*self._chunk(self.rows, start, length), *self._chunk(reversed_rows, start, length))
            else:
                yield self._chunk(self.rows, start, length)
