"""rnnlm against a hand-written PyTorch TBPTT loop: training and evaluation speed, profile, and side-by-side runs.

    python scripts/bench.py train   --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2
    python scripts/bench.py eval    --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2
    python scripts/bench.py profile --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2
    python scripts/bench.py full    --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2 \\
        --epochs 1 --limit 0.1
    python scripts/bench.py full --side hand --threads 1 --config ... --epochs 6   # one side per process
    python scripts/bench.py eval --side rnnlm --eval_batch_size 80 --config ...     # one side: speed, peak RSS

Every flag after the mode's own (``--repeats``, ``--steps``, ...) is an ``rnnlm.fit`` flag: the config and any
``--model.*`` / ``--data.*`` / ``--trainer.*`` override. The hand-written side reads the same settings.

``train``: the same model (same sizes, dropout, optimizer, gradient clipping) on the same token stream, (a) through
rnnlm (LanguageModel + LMDataModule + the Lightning Trainer, with per-step metric logging, as ``rnnlm.fit`` runs
it) and (b) through the minimal loop below: embedding, fused RNN, linear decoder (``F.linear`` +
``F.cross_entropy``), detached carried state, optimizer, clipping. Both run in this one process, in alternating
blocks (a, b, a, b, ...), so that other load on the machine hits both alike; each block runs ``--warmup`` steps
that are not timed, then ``--steps`` timed steps. The time of a step is the time between the ends of consecutive
steps, so it includes loading the batch, logging and everything else the framework does. It is taken twice:
wall-clock time, and the CPU time of this process (all its threads), which other programs on a shared machine
disturb far less. Reported for each: the median tokens/s of each side over the blocks, and the median of the
per-pair ratios rnnlm / hand-written. When the two models have the same parameters (untied, full softmax, one
fused stack), the hand-written side starts from rnnlm's initial weights and each side draws its dropout masks
from its own copy of the same random stream, so after the first block both have taken the same steps: the
validation loss of each on the first ``--val_chunks`` validation chunks is reported there, and should agree to
rounding. (Compared later, the lr-20 SGD of the classic recipe has amplified rounding differences: a plain loop
whose decoder weight is moved by one float32 ulp differs by 1.5e-5 nats after 14 steps and by 0.18 after 175.)

``eval``: the same for evaluation (no autograd; ``--eval_batch_size`` streams), rnnlm's ``Trainer.validate``
against a loop under ``torch.inference_mode``.

Peak memory (``train`` and ``eval``, unless ``--no-memory``): after the timing, each side runs alone in a fresh
process (``--side rnnlm`` / ``--side hand``, one block) and reports its resident memory before the first step and
its peak resident set size during the steps (``VmHWM``, restarted there, so that setting up the data does not
count); the difference is what the steps themselves need. ``--side`` alone runs that one side and reports the
same. On a GPU the peak GPU memory allocated by each side's blocks is reported instead, from the interleaved run.

``profile``: where the time of a hand-written training step goes (embedding + RNN forward, decoder + softmax,
backward, clipping, optimizer), and the top operators by CPU time.

``full``: trains the recipe to the end (or ``--epochs`` epochs of ``--limit`` of the chunks) through
``rnnlm.fit`` and through the hand-written loop, each with its validation-based learning-rate schedule, and
reports the validation and test perplexity of each. ``--side rnnlm`` / ``--side hand`` trains only one of them, so
that the two sides of a long comparison can run at once as two processes (``--threads 1`` each); the hand-written
side alone reads the same config and token stream without training through rnnlm.

The hand-written loop is importable (``sys.path.insert(0, "scripts"); import bench``): :class:`HandWrittenLM`,
:class:`HandWrittenLoop` and :func:`hand_written_run`.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.network.config import RNNLMConfig
from rnnlm.text.tokenization import default_tokenizers_parallelism


# --------------------------------------------------------------------------------------------- the hand-written side
def _recurrent(cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0) -> nn.RNNBase:
    kwargs = dict(dropout=dropout, batch_first=True)
    if cell == "lstm":
        return nn.LSTM(input_size, hidden_size, num_layers, **kwargs)
    if cell == "gru":
        return nn.GRU(input_size, hidden_size, num_layers, **kwargs)
    return nn.RNN(input_size, hidden_size, num_layers, nonlinearity=cell.removeprefix("rnn_"), **kwargs)


class _LockedDropout(nn.Module):
    """One dropout mask per sequence, the same at every time step (AWD-LSTM's ``LockedDropout``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return x * x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - self.p).div_(1 - self.p)


class HandWrittenLM(nn.Module):
    """Embedding -> RNN -> linear decoder, as one writes it by hand (cf. pytorch/examples word_language_model), and
    for AWD-LSTM settings as its reference code does (one module per layer, weight drop by swapping in a dropped
    ``weight_hh_l0`` with ``torch.func.functional_call``, locked dropout, embedding dropout, tied weights).

    Reads the settings of an rnnlm config that such a model has; its output is always ``F.linear`` over the full
    vocabulary (also against rnnlm's adaptive softmax). Otherwise its parameter names are rnnlm's, so the two can
    start from the same weights.
    """

    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.input_mode != "embedding" or c.bidirectional:
            raise SystemExit("The hand-written loop is one embedding and one direction: benchmark a config with "
                             "input_mode=embedding, unidirectional.")
        self.embedding = nn.Embedding(c.vocab_size, c.embedding_dim)
        sizes = c.layer_sizes
        if c.per_layer:
            self.rnn = nn.Module()
            inputs = [c.embedding_dim, *sizes[:-1]]
            self.rnn.layers = nn.ModuleList(_recurrent(c.cell, i, h) for i, h in zip(inputs, sizes, strict=True))
        else:
            self.rnn = _recurrent(c.cell, c.embedding_dim, sizes[-1], c.num_layers,
                                  c.dropout_between if c.num_layers > 1 else 0.0)
        tie = c.tie_weights
        self.projection = nn.Linear(sizes[-1], c.embedding_dim, bias=False) if tie and sizes[-1] != c.embedding_dim \
            else None
        self.decoder = nn.Linear(c.embedding_dim if tie else sizes[-1], c.vocab_size)
        drop = _LockedDropout if c.locked_dropout else nn.Dropout
        self.drop_in, self.drop_between, self.drop_out = (drop(c.dropout_embedding), drop(c.dropout_between),
                                                          drop(c.dropout_output))
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie:
            self.decoder.weight = self.embedding.weight

    def forward(self, x: Tensor, state=None) -> tuple[Tensor, object, Tensor, Tensor]:
        """Logits, the new state, the top layer's output and the decoder's input (for AR/TAR)."""
        c = self.config
        h = self.embedding(x)
        if self.training and c.dropout_words > 0:  # drop whole words: one draw per vocabulary entry
            keep = h.new_empty(c.vocab_size).bernoulli_(1 - c.dropout_words).div_(1 - c.dropout_words)
            h = h * keep[x].unsqueeze(-1)
        h = self.drop_in(h)
        if c.per_layer:
            new_state = []
            for i, layer in enumerate(self.rnn.layers):
                if i > 0:
                    h = self.drop_between(h)
                layer_state = None if state is None else state[i]
                if self.training and c.weight_drop > 0:
                    weights = dict(layer.named_parameters())
                    weights["weight_hh_l0"] = F.dropout(weights["weight_hh_l0"], c.weight_drop, training=True)
                    h, layer_state = torch.func.functional_call(layer, weights, (h, layer_state))
                else:
                    h, layer_state = layer(h, layer_state)
                new_state.append(layer_state)
            state = new_state
        else:
            h, state = self.rnn(h, state)
        features = self.drop_out(h)
        if self.projection is not None:
            features = self.projection(features)
        return self.decoder(features), state, h, features


def clock() -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process)."""
    return time.perf_counter(), time.process_time()


def _rates(tokens: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return tokens / (end[0] - start[0]), tokens / max(end[1] - start[1], 1e-9)


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    now = _status_mib("VmRSS")
    return float("nan") if now is None else now


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB) since it started or since :func:`start_rss_peak`.

    Linux's ``VmHWM``: ``ru_maxrss`` would not do, as a process started by another (fork, then exec) inherits the
    parent's peak there.
    """
    peak = _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak


def start_rss_peak() -> float:
    """Restart the peak from the resident memory now (Linux: ``clear_refs``), so that the peak measures what comes
    next and not the set-up (tokenizer, data, imports); returns the memory now (MiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss_mib()


def _detach(state):
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(_detach(s) for s in state)
    return state.detach()


def _rows(ids: np.ndarray, batch_size: int) -> Tensor:
    """The stream as ``batch_size`` contiguous rows (the tail that does not fill a row is dropped)."""
    length = len(ids) // batch_size
    return torch.from_numpy(np.asarray(ids[: batch_size * length], dtype=np.int64)).view(batch_size, length)


class HandWrittenLoop:
    """Truncated BPTT by hand: rows of the stream, chunks of ``bptt`` in order, the detached state carried along.

    ``train_steps(n)`` continues where the last call stopped (a new epoch, with a zero state, after the last
    chunk), so it can be timed in blocks; ``train_epoch`` and ``evaluate`` serve whole runs.
    """

    def __init__(
        self,
        model: nn.Module,
        train_ids: np.ndarray,
        batch_size: int,
        bptt: int,
        optimizer: torch.optim.Optimizer,
        clip_val: float | None = None,
        clip_algorithm: str = "norm",
        bf16: bool = False,
        ar: float = 0.0,
        tar: float = 0.0,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.ar, self.tar = ar, tar  # AR and TAR (AWD-LSTM's activation penalties), as rnnlm adds them
        self.device = next(model.parameters()).device
        self.rows = _rows(train_ids, batch_size)
        if self.device.type == "cuda":
            self.rows = self.rows.pin_memory()
        self.bptt, self.clip_val, self.clip_algorithm, self.bf16 = bptt, clip_val, clip_algorithm, bf16
        self.pos, self.state = 0, None

    def _to_device(self, *tensors: Tensor) -> list[Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def chunks_per_epoch(self) -> int:
        return -(-(self.rows.size(1) - 1) // self.bptt)

    def new_epoch(self) -> None:
        self.pos, self.state = 0, None

    def step(self) -> tuple[Tensor, int]:
        """One training step on the next chunk; returns the (detached) loss and the number of target tokens."""
        if self.pos >= self.rows.size(1) - 1:
            self.new_epoch()
        n = min(self.bptt, self.rows.size(1) - 1 - self.pos)
        x, y = self._to_device(self.rows[:, self.pos : self.pos + n], self.rows[:, self.pos + 1 : self.pos + 1 + n])
        self.pos += n
        self.model.train()
        with self._autocast():
            logits, state, top, features = self.model(x, _detach(self.state))
        self.state = state
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        if self.ar:
            loss = loss + self.ar * features.float().pow(2).mean()
        if self.tar and top.size(1) > 1:
            loss = loss + self.tar * (top[:, 1:] - top[:, :-1]).float().pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_val:
            if self.clip_algorithm == "value":
                nn.utils.clip_grad_value_(self.model.parameters(), self.clip_val)
            else:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_val)
        self.optimizer.step()
        return loss.detach(), y.numel()

    def timed_block(self, warmup: int, steps: int) -> tuple[float, float]:
        """Tokens/s (wall, CPU) over ``steps`` steps after ``warmup`` untimed ones (time between the ends of steps)."""
        for _ in range(warmup):
            self.step()
        self.sync()
        start, tokens = clock(), 0
        for _ in range(steps):
            tokens += self.step()[1]
        self.sync()
        return _rates(tokens, start, clock())

    def train_epoch(self, limit: int | None = None) -> float:
        """One epoch (or its first ``limit`` chunks) from a zero state; returns the mean training loss."""
        self.new_epoch()
        total, count = 0.0, 0
        for _ in range(min(limit or self.chunks_per_epoch, self.chunks_per_epoch)):
            loss, n = self.step()
            total, count = total + loss.item() * n, count + n
        return total / max(count, 1)

    @torch.inference_mode()
    def evaluate(self, ids: np.ndarray, batch_size: int, bptt: int | None = None, max_chunks: int | None = None):
        """Token-weighted mean loss over the stream (state carried, zero at the start)."""
        self.model.eval()
        rows, bptt = _rows(ids, batch_size), bptt or self.bptt
        state, total, count = None, torch.zeros((), device=self.device), 0
        for k, pos in enumerate(range(0, rows.size(1) - 1, bptt)):
            if max_chunks is not None and k == max_chunks:
                break
            n = min(bptt, rows.size(1) - 1 - pos)
            x, y = self._to_device(rows[:, pos : pos + n], rows[:, pos + 1 : pos + 1 + n])
            with self._autocast():
                logits, state = self.model(x, state)[:2]
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
            count += y.numel()
        return total.item() / max(count, 1)  # one device read per pass, not per chunk


# --------------------------------------------------------------------------------------------- settings from a config
@dataclass
class Recipe:
    """What both sides train with, read from an rnnlm config."""

    model: dict  # the rnnlm model settings but vocab_size, which comes from the data
    batch_size: int
    eval_batch_size: int
    bptt: int
    optimizer: tuple[str, dict]
    clip_val: float | None
    clip_algorithm: str
    scheduler: tuple[str, dict] | None
    seed: int = 1234
    bf16: bool = False
    ar: float = 0.0
    tar: float = 0.0

    @classmethod
    def from_cli(cls, cli) -> Recipe:
        c = cli.config
        model = {k: v for k, v in c.model.config.as_dict().items() if k != "vocab_size"}
        opt = c.optimizer if c.get("optimizer") else None
        optimizer = (opt.class_path, dict(opt.init_args)) if opt else ("torch.optim.AdamW", {"lr": 2e-3})
        sched = c.get("lr_scheduler")
        return cls(
            model=model,
            batch_size=c.data.batch_size,
            eval_batch_size=c.data.eval_batch_size or c.data.batch_size,
            bptt=c.data.bptt,
            optimizer=optimizer,
            clip_val=c.trainer.gradient_clip_val,
            clip_algorithm=c.trainer.gradient_clip_algorithm or "norm",
            bf16=str(c.trainer.precision).startswith("bf16"),
            scheduler=(sched.class_path, dict(sched.init_args)) if sched else None,
            seed=c.seed_everything if isinstance(c.seed_everything, int) else 1234,
            ar=c.model.activation_regularization,
            tar=c.model.temporal_activation_regularization,
        )

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        path, kwargs = self.optimizer
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(params, **kwargs)


def hand_written_loop(
    recipe: Recipe, vocab_size: int, train_ids: np.ndarray, device: torch.device | str = "cpu"
) -> HandWrittenLoop:
    model = HandWrittenLM(RNNLMConfig(vocab_size=vocab_size, **recipe.model)).to(device)
    return HandWrittenLoop(model, train_ids, recipe.batch_size, recipe.bptt, recipe.make_optimizer(model.parameters()),
                           recipe.clip_val, recipe.clip_algorithm, recipe.bf16, recipe.ar, recipe.tar)


def hand_written_run(
    recipe: Recipe, vocab_size: int, ids: dict, epochs: int, limit: float | None = None, device="cpu"
) -> dict:
    """Train the recipe with the hand-written loop: ``epochs`` epochs (of ``limit`` of the chunks), validation after
    each, the learning rate multiplied by the plateau factor whenever validation does not improve (the classic
    "divide by 4"), the best weights kept and tested. Returns losses, perplexities and timings."""
    torch.manual_seed(recipe.seed)
    loop = hand_written_loop(recipe, vocab_size, ids["train"], device)
    factor = None
    if recipe.scheduler and recipe.scheduler[0].endswith("ReduceLROnPlateau"):
        factor = recipe.scheduler[1].get("factor", 0.1)
    chunks = loop.chunks_per_epoch if limit is None else max(1, int(loop.chunks_per_epoch * limit))
    best, best_state, history, start = math.inf, None, [], time.perf_counter()
    train_time = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        train_loss = loop.train_epoch(chunks)
        train_time += time.perf_counter() - t0
        val = loop.evaluate(ids["validation"], recipe.eval_batch_size)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val, "val_ppl": math.exp(val),
                        "lr": loop.optimizer.param_groups[0]["lr"]})
        print(f"hand-written epoch {epoch}: train loss {train_loss:.4f}, val ppl {math.exp(val):.2f}", flush=True)
        if val < best:
            best, best_state = val, copy.deepcopy(loop.model.state_dict())
        elif factor is not None:
            for group in loop.optimizer.param_groups:
                group["lr"] *= factor
    loop.model.load_state_dict(best_state)
    test = loop.evaluate(ids["test"], recipe.eval_batch_size)
    tokens = epochs * chunks * recipe.batch_size * recipe.bptt
    return {"val_loss": best, "val_ppl": math.exp(best), "test_loss": test, "test_ppl": math.exp(test),
            "steps": epochs * chunks, "train_tokens_per_s": tokens / train_time,
            "wall_s": time.perf_counter() - start, "history": history}


# --------------------------------------------------------------------------------------------- the rnnlm side
def build_cli(rnnlm_args: list[str], extra: list[str]):
    from rnnlm.data.lm import LMDataModule
    from rnnlm.training.cli import LanguageModelCLI
    from rnnlm.training.lm import LanguageModel

    return LanguageModelCLI(LanguageModel, LMDataModule, run=False, args=[*rnnlm_args, *extra],
                            save_config_callback=None)


def _quiet_run_flags(root: str, progress_bar: bool) -> list[str]:
    return [
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", root,
        "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", str(progress_bar).lower(),
        "--sample.max_new_tokens", "0", "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false",
    ]


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _record_gpu_peak(peaks: dict[str, float], side: str, device: torch.device) -> None:
    """The GPU memory allocated at the peak of the block just run (MiB), the largest over the blocks per side."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peaks[side] = max(peaks.get(side, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)


def _print_gpu_peak(kind: str, peaks: dict[str, float]) -> None:
    if peaks:
        print(f"{kind} peak GPU memory allocated: " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in peaks.items()))


class _Interleave(L.Callback):
    """Times rnnlm's training steps in blocks and runs a block of the hand-written loop after each (``hand=False``:
    rnnlm alone).

    The hand-written model starts from rnnlm's initial weights when their parameters match, and each side draws
    its random numbers (dropout masks) from its own copy of the generator state at the start: the two then take
    the same steps, up to rounding.
    """

    def __init__(self, make_hand, warmup: int, steps: int, repeats: int, hand: bool = True, compare=None) -> None:
        self.make_hand, self.warmup, self.steps, self.repeats, self.with_hand = make_hand, warmup, steps, repeats, hand
        self.compare, self.comparison = compare, None
        self.hand: HandWrittenLoop | None = None
        self.same_start = False
        self.stamps: list[tuple[tuple[float, float], int]] = []
        self.rates: dict[str, list[tuple[float, float]]] = {"rnnlm": [], "hand": []}
        self.rss_before = self.hand_rng = None
        self.gpu_peak: dict[str, float] = {}  # MiB, the largest of the blocks (on a GPU)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.with_hand:
            self.hand = self.make_hand(trainer.datamodule, pl_module.device)
            ours, theirs = pl_module.model.state_dict(), self.hand.model.state_dict()
            if ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours):
                self.hand.model.load_state_dict(ours)
                self.same_start = True
            self.hand_rng = _rng_state(pl_module.device)
        self.rss_before = start_rss_peak()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.stamps:
            _reset_gpu_peak(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.stamps) in (self.warmup - 1, self.warmup + self.steps - 1) and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the queued steps, at the two stamps bounding the timed ones
        self.stamps.append((clock(), batch[1].numel()))
        if len(self.stamps) < self.warmup + self.steps:
            return
        tokens = sum(n for _, n in self.stamps[self.warmup :])
        self.rates["rnnlm"].append(_rates(tokens, self.stamps[self.warmup - 1][0], self.stamps[-1][0]))
        _record_gpu_peak(self.gpu_peak, "rnnlm", pl_module.device)
        if self.with_hand:
            rnnlm_rng = _rng_state(pl_module.device)
            _set_rng_state(self.hand_rng, pl_module.device)
            _reset_gpu_peak(pl_module.device)
            self.rates["hand"].append(self.hand.timed_block(self.warmup, self.steps))
            _record_gpu_peak(self.gpu_peak, "hand", pl_module.device)
            self.hand_rng = _rng_state(pl_module.device)
            _set_rng_state(rnnlm_rng, pl_module.device)
            _print_block(self.rates)
            if self.compare is not None and self.same_start and len(self.rates["hand"]) == 1:
                # After the first block both sides have taken the same steps on the same chunks with the same dropout
                # masks. (Over hundreds of steps the lr-20 SGD recipe amplifies rounding differences: compare early.)
                self.comparison = self.compare(pl_module.model, self.hand, self.warmup + self.steps)
        self.stamps = []
        if len(self.rates["rnnlm"]) == self.repeats:
            trainer.should_stop = True


def _print_block(rates: dict[str, list[tuple[float, float]]]) -> None:
    (a_wall, a_cpu), (b_wall, b_cpu) = rates["rnnlm"][-1], rates["hand"][-1]
    print(f"  block {len(rates['hand'])}: rnnlm {a_wall:,.0f} tokens/s ({a_cpu:,.0f} per CPU-second), hand-written "
          f"{b_wall:,.0f} tokens/s ({b_cpu:,.0f} per CPU-second)  [load {os.getloadavg()[0]:.2f}]", flush=True)


def _summary(kind: str, rates: dict[str, list[tuple[float, float]]]) -> dict:
    result: dict = {"mode": kind, "blocks": len(rates["hand"]), "loadavg_end": list(os.getloadavg())}
    for i, clock_name in enumerate(("wall", "cpu")):
        a, b = [r[i] for r in rates["rnnlm"]], [r[i] for r in rates["hand"]]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        result[clock_name] = {
            "rnnlm_tokens_per_s": statistics.median(a),
            "hand_tokens_per_s": statistics.median(b),
            "ratio_median_of_pairs": statistics.median(ratios),
            "ratios": [round(r, 4) for r in ratios],
            "rnnlm_blocks": [round(r) for r in a],
            "hand_blocks": [round(r) for r in b],
        }
        unit = "tokens/s" if clock_name == "wall" else "tokens per CPU-second"
        print(f"{kind} ({clock_name} clock): rnnlm {statistics.median(a):,.0f}, "
              f"hand-written {statistics.median(b):,.0f} "
              f"{unit} (medians of {len(ratios)} blocks); rnnlm / hand-written = {statistics.median(ratios):.3f} "
              f"(median of the pairs; range {min(ratios):.3f}-{max(ratios):.3f}); per pair: "
              + " ".join(f"{r:.3f}" for r in ratios))
    return result


def _one_side(kind: str, side: str, rates: list[tuple[float, float]], rss_before: float) -> dict:
    """Speed and memory of one side run alone."""
    wall, cpu = statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)
    peak = peak_rss_mib()
    print(f"{kind}, {side} alone: {wall:,.0f} tokens/s ({cpu:,.0f} per CPU-second); resident memory before the "
          f"first step {rss_before:,.0f} MiB, peak during the steps {peak:,.0f} MiB (+{peak - rss_before:,.0f} MiB)")
    return {"mode": kind, "side": side, "wall_tokens_per_s": wall, "cpu_tokens_per_s": cpu,
            "rss_before_mib": round(rss_before, 1), "peak_rss_mib": round(peak, 1),
            "step_memory_mib": round(peak - rss_before, 1)}


@torch.no_grad()
def rnnlm_validation_loss(model, ids: np.ndarray, batch_size: int, bptt: int, device, max_chunks: int | None) -> float:
    """Token-weighted mean loss of an rnnlm ``RNNLM`` over the first ``max_chunks`` chunks of a stream, through its
    own loss (the fused head where it is on), the state carried."""
    was_training = model.training
    model.eval()
    rows, state, total, count = _rows(ids, batch_size), None, torch.zeros((), dtype=torch.float64, device=device), 0
    for k, pos in enumerate(range(0, rows.size(1) - 1, bptt)):
        if max_chunks is not None and k == max_chunks:
            break
        n = min(bptt, rows.size(1) - 1 - pos)
        x, y = rows[:, pos : pos + n].to(device), rows[:, pos + 1 : pos + 1 + n].to(device)
        out = model(x, y, state)
        state, total, count = out.state, total + out.loss.double() * y.numel(), count + y.numel()
    model.train(was_training)
    return total.item() / max(count, 1)


def bench_train(rnnlm_args: list[str], warmup: int, steps: int, repeats: int, progress_bar: bool,
                side: str = "both", val_chunks: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as root:
        block = warmup + steps
        cli = build_cli(rnnlm_args, [*_quiet_run_flags(root, progress_bar), "--trainer.limit_val_batches", "0",
                                     "--trainer.num_sanity_val_steps", "0", "--trainer.max_epochs", "-1",
                                     "--trainer.max_steps", str(block * repeats)])
        recipe = Recipe.from_cli(cli)
        data = cli.datamodule
        vocab = data.vocab_size
        facts = dict(batch_size=recipe.batch_size, bptt=recipe.bptt, vocab_size=vocab, model=recipe.model)
        if side == "hand":
            data.prepare_data()
            data.setup("fit")
            device = cli.trainer.strategy.root_device
            cli.model = None  # this process measures the hand-written side alone
            torch.manual_seed(recipe.seed)
            loop = hand_written_loop(recipe, vocab, data.ids["train"], device)
            rss_before = start_rss_peak()
            rates = [loop.timed_block(warmup, steps) for _ in range(repeats)]
            return {**_one_side("train", "hand", rates, rss_before), **facts}
        def compare(model, hand: HandWrittenLoop, steps_taken: int) -> dict:
            ids = data.ids["validation"]
            ours = rnnlm_validation_loss(model, ids, recipe.eval_batch_size, recipe.bptt, hand.device, val_chunks)
            theirs = hand.evaluate(ids, recipe.eval_batch_size, max_chunks=val_chunks)
            print(f"validation loss after the same {steps_taken} steps from the same weights and dropout masks (first "
                  f"{val_chunks} validation chunks): rnnlm {ours:.6f}, hand-written {theirs:.6f} (difference "
                  f"{ours - theirs:+.2e})", flush=True)
            return {"steps": steps_taken, "chunks": val_chunks, "rnnlm": ours, "hand": theirs}

        timer = _Interleave(
            lambda dm, device: hand_written_loop(recipe, vocab, dm.ids["train"], device), warmup, steps, repeats,
            hand=side == "both", compare=compare if val_chunks else None,
        )
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=data)
        if side == "rnnlm":
            return {**_one_side("train", "rnnlm", timer.rates["rnnlm"], timer.rss_before), **facts}
        result = _summary("train", timer.rates)
        result.update(facts, threads=torch.get_num_threads())
        if timer.gpu_peak:
            _print_gpu_peak("train", timer.gpu_peak)
            result["gpu_peak_mib"] = timer.gpu_peak
        if timer.comparison is not None:
            result["validation_after_the_same_steps"] = timer.comparison
        elif val_chunks:
            print("note: the hand-written model has other parameters than rnnlm's (tied, adaptive or per-layer), so "
                  "it did not start from the same weights; no validation-loss comparison.")
        return result


class _EvalTimer(L.Callback):
    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.stamps = warmup, steps, []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if pl_module.device.type == "cuda" and len(self.stamps) in (self.warmup - 1, self.warmup + self.steps - 1):
            torch.cuda.synchronize(pl_module.device)
        self.stamps.append((clock(), batch[1].numel()))

    def rate(self) -> tuple[float, float]:
        tokens = sum(n for _, n in self.stamps[self.warmup :])
        return _rates(tokens, self.stamps[self.warmup - 1][0], self.stamps[-1][0])


def bench_eval(rnnlm_args: list[str], warmup: int, steps: int, repeats: int, batch_size: int | None,
               side: str = "both") -> dict:
    with tempfile.TemporaryDirectory() as root:
        cli = build_cli(rnnlm_args, _quiet_run_flags(root, False))
        recipe = Recipe.from_cli(cli)
        data, model = cli.datamodule, cli.model
        data.prepare_data()
        data.setup("validate")
        batch_size = batch_size or recipe.eval_batch_size
        facts = dict(batch_size=batch_size, bptt=recipe.bptt, vocab_size=data.vocab_size, model=recipe.model)
        loop = None
        loader = data.loader("validation", batch_size=batch_size)
        rates: dict[str, list[tuple[float, float]]] = {"rnnlm": [], "hand": []}
        hand_tokens = steps * batch_size * recipe.bptt
        device = cli.trainer.strategy.root_device
        if side == "hand":
            cli.model = model = None  # this process measures the hand-written side alone
            loop = hand_written_loop(recipe, data.vocab_size, data.ids["train"], device)
        rss_before = start_rss_peak()
        gpu_peak: dict[str, float] = {}
        for _ in range(repeats):
            if side != "hand":
                _reset_gpu_peak(device)
                timer = _EvalTimer(warmup, steps)
                trainer = L.Trainer(accelerator=cli.config.trainer.accelerator, devices=1, logger=False,
                                    precision=cli.config.trainer.precision, enable_progress_bar=False,
                                    enable_model_summary=False, limit_val_batches=warmup + steps, callbacks=[timer])
                trainer.validate(model, dataloaders=loader, verbose=False)
                rates["rnnlm"].append(timer.rate())
                _record_gpu_peak(gpu_peak, "rnnlm", device)
            if side == "rnnlm":
                continue
            if loop is None:
                loop = hand_written_loop(recipe, data.vocab_size, data.ids["train"], device)
            _reset_gpu_peak(device)
            loop.evaluate(data.ids["validation"], batch_size, max_chunks=warmup)
            loop.sync()
            start = clock()
            loop.evaluate(data.ids["validation"], batch_size, max_chunks=steps)
            rates["hand"].append(_rates(hand_tokens, start, clock()))
            _record_gpu_peak(gpu_peak, "hand", device)
            if side == "both":
                _print_block(rates)
        if side != "both":
            return {**_one_side("eval", side, rates[side], rss_before), **facts}
        result = _summary("eval", rates)
        result.update(facts)
        if gpu_peak:
            _print_gpu_peak("eval", gpu_peak)
            result["gpu_peak_mib"] = gpu_peak
        return result


def profile(rnnlm_args: list[str], warmup: int, steps: int) -> dict:
    """Phase times of a hand-written training step (CPU ops are synchronous, so wall time per phase is exact)."""
    with tempfile.TemporaryDirectory() as root:
        cli = build_cli(rnnlm_args, _quiet_run_flags(root, False))
        recipe = Recipe.from_cli(cli)
        data = cli.datamodule
        data.prepare_data()
        data.setup("fit")
        loop = hand_written_loop(recipe, data.vocab_size, data.ids["train"])
        model, opt = loop.model, loop.optimizer
        phases: dict[str, list[float]] = {k: [] for k in ("rnn forward", "decoder + softmax forward", "backward",
                                                          "clip", "optimizer", "total")}
        state = None
        for i in range(warmup + steps):
            x, y = loop.rows[:, i * loop.bptt : (i + 1) * loop.bptt], loop.rows[:, i * loop.bptt + 1 :][:, : loop.bptt]
            t0 = time.perf_counter()
            h, state = model.rnn(model.drop_in(model.embedding(x)), _detach(state))
            t1 = time.perf_counter()
            logits = model.decoder(model.drop_out(h))
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            if recipe.clip_val:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_val)
            t4 = time.perf_counter()
            opt.step()
            t5 = time.perf_counter()
            if i >= warmup:
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0), strict=True):
                    phases[k].append(v)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                loop.step()
        medians = {k: statistics.median(v) * 1e3 for k, v in phases.items()}
        print(f"hand-written step, median of {steps} steps (ms): "
              + ", ".join(f"{k} {v:.1f} ({100 * v / medians['total']:.0f}%)" for k, v in medians.items()))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return {"mode": "profile", "phase_ms": medians}


def full(rnnlm_args: list[str], epochs: int, limit: float | None, side: str = "both") -> dict:
    from rnnlm.fit import main as fit_main

    rnnlm_result = hand = None
    with tempfile.TemporaryDirectory() as root:
        flags = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", root,
                 "--trainer.default_root_dir", root, "--trainer.max_epochs", str(epochs), "--sample.max_new_tokens",
                 "0", "--trainer.enable_progress_bar", "false"]
        if limit is not None:
            flags += ["--trainer.limit_train_batches", str(limit)]
        if side == "hand":
            # The same settings and token stream, without training through rnnlm: the sides can then run as two
            # processes at once (one core each), which halves the wall time of a long comparison.
            cli = build_cli(rnnlm_args, flags)
            data = cli.datamodule
            data.prepare_data()
            data.setup("fit")
            device = cli.trainer.strategy.root_device
        else:
            start = time.perf_counter()
            cli = fit_main([*rnnlm_args, *flags])
            rnnlm_wall = time.perf_counter() - start
            trainer, data = cli.trainer, cli.datamodule
            best = float(trainer.checkpoint_callback.best_model_score)
            test = float(trainer.callback_metrics["test/loss"])
            rnnlm_result = {"val_loss": best, "val_ppl": math.exp(best), "test_loss": test,
                            "test_ppl": math.exp(test), "steps": trainer.global_step, "wall_s": rnnlm_wall}
            device = trainer.strategy.root_device
        recipe = Recipe.from_cli(cli)
        if side != "rnnlm":
            if recipe.model.get("output", "softmax") != "softmax":
                print("note: the hand-written loop has a full softmax; the rnnlm side does not.")
            hand = hand_written_run(recipe, data.vocab_size, data.ids, epochs, limit, device)
    if rnnlm_result is not None:
        print(f"rnnlm:        validation ppl {rnnlm_result['val_ppl']:.2f}, test ppl {rnnlm_result['test_ppl']:.2f} "
              f"({rnnlm_result['steps']} steps, {rnnlm_result['wall_s'] / 60:.1f} min wall)")
    if hand is not None:
        print(f"hand-written: validation ppl {hand['val_ppl']:.2f}, test ppl {hand['test_ppl']:.2f} "
              f"({hand['steps']} steps, {hand['wall_s'] / 60:.1f} min wall)")
    return {"mode": "full", "epochs": epochs, "limit": limit, "side": side, "rnnlm": rnnlm_result, "hand": hand}


def memory_of_sides(args: argparse.Namespace, rnnlm_args: list[str]) -> dict:
    """Each side alone in a fresh process, one block: resident memory before the first step and at the peak."""
    sides = {}
    for side in ("rnnlm", "hand"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "side.json")
            cmd = [sys.executable, os.path.abspath(__file__), args.mode, "--side", side, "--repeats", "1",
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--json", out]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.eval_batch_size:
                cmd += ["--eval_batch_size", str(args.eval_batch_size)]
            if args.keep_denormals:
                cmd.append("--keep_denormals")
            subprocess.run([*cmd, *rnnlm_args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(out) as f:
                sides[side] = json.load(f)
    a, b = sides["rnnlm"], sides["hand"]
    print(f"{args.mode} peak resident memory, each side alone: rnnlm {a['peak_rss_mib']:,.0f} MiB "
          f"(+{a['step_memory_mib']:,.0f} for the steps), hand-written {b['peak_rss_mib']:,.0f} MiB "
          f"(+{b['step_memory_mib']:,.0f})")
    return sides


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "eval", "profile", "full"])
    p.add_argument("--repeats", type=int, default=5, help="blocks per side (train, eval)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each block")
    p.add_argument("--eval_batch_size", type=int, default=None, help="streams in eval mode (default: the config's)")
    p.add_argument("--progress_bar", action="store_true", help="show rnnlm's progress bar while timing")
    p.add_argument("--epochs", type=int, default=1, help="full mode: epochs per side")
    p.add_argument("--limit", type=float, default=None, help="full mode: fraction of each epoch's chunks to train")
    p.add_argument("--side", choices=["both", "rnnlm", "hand"], default="both",
                   help="both sides interleaved, or only one (train, eval: its speed and peak memory alone; full: "
                        "run the two sides as two processes at once)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="train, eval: after the timing, measure each side's peak memory alone in a fresh process")
    p.add_argument("--val_chunks", type=int, default=40,
                   help="train: validation chunks on which both sides' losses are compared after the run (0: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: one per core); 1 is steadier on a busy machine")
    p.add_argument("--keep_denormals", action="store_true",
                   help="do not flush subnormal floats to zero (rnnlm's entry points flush them)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args, rnnlm_args = p.parse_known_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1")
    # The process settings of rnnlm's entry points, for both sides alike.
    default_tokenizers_parallelism()
    os.environ.setdefault("WANDB_MODE", "disabled")
    keep_freed_memory()
    if not args.keep_denormals:
        flush_denormals()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{torch.get_num_threads()} torch threads", flush=True)
    if args.mode == "train":
        result = bench_train(rnnlm_args, args.warmup, args.steps, args.repeats, args.progress_bar, args.side,
                             args.val_chunks)
    elif args.mode == "eval":
        result = bench_eval(rnnlm_args, args.warmup, args.steps, args.repeats, args.eval_batch_size, args.side)
    elif args.mode == "profile":
        result = profile(rnnlm_args, args.warmup, args.steps)
    else:
        result = full(rnnlm_args, args.epochs, args.limit, args.side)
    if args.mode in ("train", "eval") and args.side == "both" and args.memory:
        result["memory"] = memory_of_sides(args, rnnlm_args)
    result.update(torch=torch.__version__, threads=torch.get_num_threads(), argv=sys.argv[1:] if argv is None else argv,
                  loadavg=list(os.getloadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
