"""rnnlm against a hand-written PyTorch TBPTT loop: training and evaluation speed, profile, and side-by-side runs.

    python scripts/bench.py train   --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2
    python scripts/bench.py eval    --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2
    python scripts/bench.py profile --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2
    python scripts/bench.py full    --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2 \\
        --epochs 1 --limit 0.1
    python scripts/bench.py full --side hand --threads 1 --config ... --epochs 6   # one side per process

Every flag after the mode's own (``--repeats``, ``--steps``, ...) is an ``rnnlm.fit`` flag: the config and any
``--model.*`` / ``--data.*`` / ``--trainer.*`` override. The hand-written side reads the same settings.

``train``: the same model (same sizes, dropout, optimizer, gradient clipping) on the same token stream, (a) through
rnnlm (LanguageModel + LMDataModule + the Lightning Trainer, with per-step metric logging, as ``rnnlm.fit`` runs
it) and (b) through the minimal loop below: embedding, fused RNN, linear decoder, detached carried state,
optimizer, clipping. Both run in this one process, in alternating blocks (a, b, a, b, ...), so that other load on
the machine hits both alike; each block runs ``--warmup`` steps that are not timed, then ``--steps`` timed steps.
The time of a step is the time between the ends of consecutive steps, so it includes loading the batch, logging
and everything else the framework does. It is taken twice: wall-clock time, and the CPU time of this process
(all its threads), which other programs on a shared machine disturb far less. Reported for each: the median
tokens/s of each side over the blocks, and the median of the per-pair ratios rnnlm / hand-written.

``eval``: the same for evaluation (no autograd; ``--eval_batch_size`` streams), rnnlm's ``Trainer.validate``
against a loop under ``torch.inference_mode``.

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
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.config import RNNLMConfig
from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.tokenization import default_tokenizers_parallelism


# --------------------------------------------------------------------------------------------- the hand-written side
class HandWrittenLM(nn.Module):
    """Embedding -> fused RNN -> linear decoder, as one writes it by hand (cf. pytorch/examples word_language_model).

    Reads the settings of an rnnlm config that such a model has (cell, sizes, the three plain dropouts); it is
    always untied, with a full softmax and one fused stack.
    """

    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        c = config
        if c.input_mode != "embedding" or c.per_layer or c.bidirectional:
            raise SystemExit("The hand-written loop is one embedding, one fused stack, one direction: benchmark a "
                             "config with input_mode=embedding, one hidden size, no weight drop, unidirectional.")
        self.embedding = nn.Embedding(c.vocab_size, c.embedding_dim)
        kwargs = dict(dropout=c.dropout_between if c.num_layers > 1 else 0.0, batch_first=True)
        if c.cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(c.embedding_dim, c.hidden_size, c.num_layers, **kwargs)
        elif c.cell == "gru":
            self.rnn = nn.GRU(c.embedding_dim, c.hidden_size, c.num_layers, **kwargs)
        else:
            nonlinearity = c.cell.removeprefix("rnn_")
            self.rnn = nn.RNN(c.embedding_dim, c.hidden_size, c.num_layers, nonlinearity=nonlinearity, **kwargs)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size)
        self.drop_in, self.drop_out = nn.Dropout(c.dropout_embedding), nn.Dropout(c.dropout_output)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: Tensor, state=None):
        h, state = self.rnn(self.drop_in(self.embedding(x)), state)
        return self.decoder(self.drop_out(h)), state


def clock() -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process)."""
    return time.perf_counter(), time.process_time()


def _rates(tokens: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return tokens / (end[0] - start[0]), tokens / max(end[1] - start[1], 1e-9)


def _detach(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


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
    ) -> None:
        self.model, self.optimizer = model, optimizer
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
            logits, state = self.model(x, _detach(self.state))
        self.state = state
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
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
                logits, state = self.model(x, state)
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
                           recipe.clip_val, recipe.clip_algorithm, recipe.bf16)


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
    from rnnlm.data import LMDataModule
    from rnnlm.fit import RNNLMCLI
    from rnnlm.lm import LanguageModel

    return RNNLMCLI(LanguageModel, LMDataModule, run=False, args=[*rnnlm_args, *extra], save_config_callback=None)


def _quiet_run_flags(root: str, progress_bar: bool) -> list[str]:
    return [
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", root,
        "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", str(progress_bar).lower(),
        "--sample.max_new_tokens", "0", "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false",
    ]


class _Interleave(L.Callback):
    """Times rnnlm's training steps in blocks and runs a block of the hand-written loop after each."""

    def __init__(self, make_hand, warmup: int, steps: int, repeats: int) -> None:
        self.make_hand, self.warmup, self.steps, self.repeats = make_hand, warmup, steps, repeats
        self.hand: HandWrittenLoop | None = None
        self.stamps: list[tuple[tuple[float, float], int]] = []
        self.rates: dict[str, list[tuple[float, float]]] = {"rnnlm": [], "hand": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.hand = self.make_hand(trainer.datamodule, pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.stamps) in (self.warmup - 1, self.warmup + self.steps - 1):
            self.hand.sync()  # on a GPU, wait for the queued steps at the two stamps that bound the timed ones
        self.stamps.append((clock(), batch[1].numel()))
        if len(self.stamps) < self.warmup + self.steps:
            return
        tokens = sum(n for _, n in self.stamps[self.warmup :])
        self.rates["rnnlm"].append(_rates(tokens, self.stamps[self.warmup - 1][0], self.stamps[-1][0]))
        self.rates["hand"].append(self.hand.timed_block(self.warmup, self.steps))
        _print_block(self.rates)
        self.stamps = []
        if len(self.rates["hand"]) == self.repeats:
            trainer.should_stop = True


def _print_block(rates: dict[str, list[tuple[float, float]]]) -> None:
    (a_wall, a_cpu), (b_wall, b_cpu) = rates["rnnlm"][-1], rates["hand"][-1]
    print(f"  block {len(rates['hand'])}: rnnlm {a_wall:,.0f} tokens/s ({a_cpu:,.0f} per CPU-second), hand-written "
          f"{b_wall:,.0f} tokens/s ({b_cpu:,.0f} per CPU-second)", flush=True)


def _summary(kind: str, rates: dict[str, list[tuple[float, float]]]) -> dict:
    result: dict = {"mode": kind, "blocks": len(rates["hand"])}
    for i, clock_name in enumerate(("wall", "cpu")):
        a, b = [r[i] for r in rates["rnnlm"]], [r[i] for r in rates["hand"]]
        ratios = [x / y for x, y in zip(a, b)]
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
              f"(median of the pairs; range {min(ratios):.3f}-{max(ratios):.3f})")
    return result


def bench_train(rnnlm_args: list[str], warmup: int, steps: int, repeats: int, progress_bar: bool) -> dict:
    with tempfile.TemporaryDirectory() as root:
        block = warmup + steps
        cli = build_cli(rnnlm_args, [*_quiet_run_flags(root, progress_bar), "--trainer.limit_val_batches", "0",
                                     "--trainer.num_sanity_val_steps", "0", "--trainer.max_epochs", "-1",
                                     "--trainer.max_steps", str(block * repeats)])
        recipe = Recipe.from_cli(cli)
        vocab = cli.datamodule.vocab_size
        timer = _Interleave(
            lambda dm, device: hand_written_loop(recipe, vocab, dm.ids["train"], device), warmup, steps, repeats
        )
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        result = _summary("train", timer.rates)
        result.update(batch_size=recipe.batch_size, bptt=recipe.bptt, vocab_size=vocab, model=recipe.model,
                      threads=torch.get_num_threads())
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


def bench_eval(rnnlm_args: list[str], warmup: int, steps: int, repeats: int, batch_size: int | None) -> dict:
    with tempfile.TemporaryDirectory() as root:
        cli = build_cli(rnnlm_args, _quiet_run_flags(root, False))
        recipe = Recipe.from_cli(cli)
        data, model = cli.datamodule, cli.model
        data.prepare_data()
        data.setup("validate")
        batch_size = batch_size or recipe.eval_batch_size
        loop = None
        loader = data.loader("validation", batch_size=batch_size)
        rates: dict[str, list[tuple[float, float]]] = {"rnnlm": [], "hand": []}
        hand_tokens = steps * batch_size * recipe.bptt
        for _ in range(repeats):
            timer = _EvalTimer(warmup, steps)
            trainer = L.Trainer(accelerator=cli.config.trainer.accelerator, devices=1, logger=False,
                                precision=cli.config.trainer.precision, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=warmup + steps, callbacks=[timer])
            trainer.validate(model, dataloaders=loader, verbose=False)
            rates["rnnlm"].append(timer.rate())
            if loop is None:
                loop = hand_written_loop(recipe, data.vocab_size, data.ids["train"], trainer.strategy.root_device)
            loop.evaluate(data.ids["validation"], batch_size, max_chunks=warmup)
            start = clock()
            loop.evaluate(data.ids["validation"], batch_size, max_chunks=steps)
            rates["hand"].append(_rates(hand_tokens, start, clock()))
            _print_block(rates)
        result = _summary("eval", rates)
        result.update(batch_size=batch_size, bptt=recipe.bptt, vocab_size=data.vocab_size, model=recipe.model)
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
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
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
            if recipe.model.get("tie_weights") or recipe.model.get("output", "softmax") != "softmax":
                print("note: the hand-written loop is untied with a full softmax; the rnnlm side is not.")
            hand = hand_written_run(recipe, data.vocab_size, data.ids, epochs, limit, device)
    if rnnlm_result is not None:
        print(f"rnnlm:        validation ppl {rnnlm_result['val_ppl']:.2f}, test ppl {rnnlm_result['test_ppl']:.2f} "
              f"({rnnlm_result['steps']} steps, {rnnlm_result['wall_s'] / 60:.1f} min wall)")
    if hand is not None:
        print(f"hand-written: validation ppl {hand['val_ppl']:.2f}, test ppl {hand['test_ppl']:.2f} "
              f"({hand['steps']} steps, {hand['wall_s'] / 60:.1f} min wall)")
    return {"mode": "full", "epochs": epochs, "limit": limit, "side": side, "rnnlm": rnnlm_result, "hand": hand}


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
                   help="full mode: train both sides one after the other, or only one (run two processes at once)")
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
    if args.mode == "train":
        result = bench_train(rnnlm_args, args.warmup, args.steps, args.repeats, args.progress_bar)
    elif args.mode == "eval":
        result = bench_eval(rnnlm_args, args.warmup, args.steps, args.repeats, args.eval_batch_size)
    elif args.mode == "profile":
        result = profile(rnnlm_args, args.warmup, args.steps)
    else:
        result = full(rnnlm_args, args.epochs, args.limit, args.side)
    result.update(torch=torch.__version__, threads=torch.get_num_threads(), argv=sys.argv[1:] if argv is None else argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
