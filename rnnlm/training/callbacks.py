"""Lightning callbacks of rnnlm, one job each.

The LightningModules return the ones training needs besides its steps (the non-finite loss guard, the chunk-length
learning-rate scaling, the throughput) from ``configure_callbacks``, so plain ``Trainer.fit`` gets them as the CLI
does; :class:`TextSample` is the CLI's ``--sample.*`` section.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from tokenizers import Tokenizer

from rnnlm.sharing.lm import sample
from rnnlm.text.streams import ChunkLoader
from rnnlm.text.tokenization import Encoder


class NonFiniteLossError(RuntimeError):
    """The training loss or gradients became NaN or infinite."""


def writing_step(trainer: L.Trainer) -> bool:
    """Whether the loggers write this step's metrics (Lightning writes every ``log_every_n_steps``)."""
    return (trainer.global_step + 1) % trainer.log_every_n_steps == 0


class NonFiniteGuard(L.Callback):
    """Checks every step's loss and gradient norm before the optimizer uses them, and logs the gradient norm.

    The total gradient norm (before clipping) is computed every step, fused over all gradients, and tested with
    the loss in one host synchronisation. On a non-finite value ``policy`` says what happens: ``stop`` writes a
    checkpoint of the state before that step (weights, optimizer, the streams' position and carried state) and
    raises :class:`NonFiniteLossError`; ``skip`` drops the step (no weight update; the carried state restarts from
    zeros) and goes on; ``ignore`` does not check. The norm is logged as ``train/grad_norm`` on the steps the
    loggers write. (Lightning's ``grad_norm`` utility computes one norm per parameter and reads them back to the
    host one by one, a synchronisation per parameter on a GPU; one fused norm is all that is needed here.)
    """

    def __init__(self, policy: str = "stop") -> None:
        self.policy = policy
        self.skipped_steps = 0
        self._loss: torch.Tensor | None = None
        self._before: tuple[int, dict] = (0, {})

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._before = (batch_idx, pl_module.carry.of_stage("train"))  # detached tensors, replaced, never mutated

    def on_before_backward(self, trainer: L.Trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()  # the loss actually backpropagated, whatever training_step did to it

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        writing = writing_step(trainer)
        if self.policy == "ignore" and not writing:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if writing and norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)  # a device tensor: no sync
        if self.policy == "ignore":
            return
        checks = [self._loss] if self._loss is not None else []
        # With fp16 loss scaling, infinite gradients are routine: the GradScaler skips those steps itself.
        if norm is not None and "16-mixed" not in str(trainer.precision):
            checks.append(norm)
        if not checks:
            return
        bad = not bool(torch.isfinite(torch.stack([c.float() for c in checks])).all())  # the one host sync
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # every rank acts alike
        if bad:
            self._act(trainer, pl_module, optimizer)

    def _act(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        position = self._before[0]
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, chunk {position})"
        if self.policy == "skip":
            optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without gradients: no update
            pl_module.carry.reset("train")  # the state left by this chunk may be NaN too
            self.skipped_steps += 1
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            if trainer.is_global_zero:
                warnings.warn(f"rnnlm: non-finite loss or gradient at {where}: step skipped "
                              f"({self.skipped_steps} so far).", stacklevel=1)
            return
        path = self._save_last_good_state(trainer, pl_module)
        raise NonFiniteLossError(
            f"The training loss or gradient became NaN or infinite at {where}, so training stopped before that "
            f"step changed the weights. The state before it is saved in {path}. The usual remedies: a lower "
            "learning rate (--optimizer.init_args.lr), gradient clipping (--trainer.gradient_clip_val 0.25), "
            "fp32 or bf16-mixed instead of 16-mixed precision, or a look at the data around that chunk. "
            "--model.on_nonfinite skip drops such steps instead of stopping."
        )

    def _save_last_good_state(self, trainer: L.Trainer, pl_module) -> str:
        position, states = self._before
        pl_module.carry.reset("train")
        pl_module.carry.states.update(states)
        loader = trainer.train_dataloader
        if isinstance(loader, ChunkLoader):
            loader.position = position
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = os.path.join(folder, f"nonfinite-step{trainer.global_step}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)
        return path

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


class ChunkLengthLR(L.Callback):
    """Variable-length BPTT (AWD-LSTM, Merity et al. 2017): each optimizer step's learning rate is scaled by its
    chunk length / bptt, so that short chunks do not weigh as much as long ones.

    The rate is scaled right before the update (``on_before_optimizer_step``, after the gradients are complete)
    and put back by a step hook of the optimizer right after it, so the steps' logs, the schedulers and the
    checkpoints only ever see the configured rate. With gradient accumulation the step takes the scale of its last
    chunk. Does nothing for fixed-length chunks.
    """

    def __init__(self) -> None:
        self._scale: float | None = None
        self._configured: list[float] | None = None
        self._handles: list = []

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._handles = [opt.register_step_post_hook(self._restore) for opt in trainer.optimizers]

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        loader = trainer.train_dataloader
        variable = isinstance(loader, ChunkLoader) and loader.variable_length
        self._scale = batch[0].size(1) / loader.bptt if variable else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        if self._scale is None:
            return
        self._configured = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self._scale

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._restore(trainer.optimizers[0] if trainer.optimizers else None)  # a step the GradScaler skipped

    def _restore(self, optimizer: torch.optim.Optimizer | None, *hook_args) -> None:
        if self._configured is not None and optimizer is not None:
            for group, lr in zip(optimizer.param_groups, self._configured, strict=True):
                group["lr"] = lr
            self._configured = None


class TokensPerSecond(L.Callback):
    """Training tokens per second over each logging window (all processes together), logged as
    ``train/tokens_per_s`` and shown in the progress bar.

    Lightning's ``ThroughputMonitor`` synchronises a GPU on every step to time it; counting tokens on the host and
    reading the clock at each logging window costs nothing on the device.
    """

    def __init__(self, count: Callable[[Any], int] | None = None) -> None:
        self._window: tuple[float, int] | None = None
        # The tokens of a batch: the targets of an LM chunk by default; a classifier counts its texts' tokens.
        self.count = count if count is not None else (lambda batch: batch[1].numel())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._window = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now, tokens = time.perf_counter(), self.count(batch) * trainer.world_size
        if self._window is None:
            self._window = (now, 0)  # the first batch of an epoch includes start-up work: not timed
            return
        start, seen = self._window
        seen += tokens
        if trainer.global_step % trainer.log_every_n_steps == 0 and now > start:
            # A host tensor, so that showing it in the progress bar needs no device sync.
            rate = torch.tensor(seen / (now - start))
            pl_module.log("train/tokens_per_s", rate, on_step=True, on_epoch=False, prog_bar=True)
            self._window = (now, 0)
        else:
            self._window = (start, seen)


class TextSample(L.Callback):
    """Samples text from the model after each validation pass and at the end of training.

    Every sample is added to a ``samples`` table (prompt, continuation, temperature, step) in each logger that
    keeps tables (W&B); the final one is also printed.

    Args:
        prompt: text that primes the hidden state before sampling.
        max_new_tokens: tokens to generate (0 turns sampling off).
        temperature: softmax temperature (0 = greedy).
        top_k: sample only from the k most likely tokens.
        seed: makes the samples reproducible.
        every_validation: also sample after each validation pass (and print it when ``print_every_validation``).
        print_every_validation: print the samples taken after validation passes, not just the final one.
    """

    COLUMNS = ["step", "prompt", "continuation", "temperature"]

    def __init__(
        self,
        prompt: str = "",
        max_new_tokens: int = 300,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 0,
        every_validation: bool = True,
        print_every_validation: bool = False,
    ) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.every_validation = every_validation
        self.print_every_validation = print_every_validation
        self.samples: list[list] = []
        self._encoder: tuple[str, Encoder] | None = None

    def _can_sample(self, pl_module) -> bool:
        # A model trained on plain loaders has no tokenizer to write text with.
        return self.max_new_tokens > 0 and pl_module.tokenizer_json is not None

    def _sample(self, trainer: L.Trainer, pl_module) -> str:
        if self._encoder is None or self._encoder[0] != pl_module.tokenizer_json:
            self._encoder = (pl_module.tokenizer_json, Encoder(Tokenizer.from_str(pl_module.tokenizer_json)))
        text = sample(pl_module.model, self._encoder[1], self.prompt, max_new_tokens=self.max_new_tokens,
                      temperature=self.temperature, top_k=self.top_k, seed=self.seed)
        self.samples.append([trainer.global_step, self.prompt, text, self.temperature])
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                # W&B tables are immutable once logged: log the whole, growing table each time.
                logger.log_table("samples", columns=self.COLUMNS, data=[list(r) for r in self.samples],
                                 step=trainer.global_step)
        return text

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_validation and not trainer.sanity_checking and self._can_sample(pl_module):
            text = self._sample(trainer, pl_module)
            if self.print_every_validation:
                print(f"\n--- sample at step {trainer.global_step} ---\n{self.prompt}{text}\n---", flush=True)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._can_sample(pl_module):
            text = self._sample(trainer, pl_module)
            print(f"\n--- sample after {trainer.global_step} steps ---\n{self.prompt}{text}\n---", flush=True)

