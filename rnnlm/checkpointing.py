"""Checkpoints that survive crashes and pre-emption, and load without running code (the reading and writing
themselves are in ``rnnlm.files``).

- :class:`SafeCheckpointIO` writes each checkpoint to a temporary file in the same folder, flushes it to disk and
  renames it over the target, so a crash mid-write leaves the previous file intact; it reads checkpoints with
  ``weights_only=True`` (tensors and plain types only: a checkpoint cannot run code when loaded) and turns a
  truncated or foreign file into a clear error.
- :class:`ResumableCheckpoints` keeps ``last.ckpt`` fresh every N steps or minutes and, on SIGTERM (a scheduler's
  pre-emption) or Ctrl-C, finishes the current step, writes ``last.ckpt`` and stops with :class:`TrainingInterrupted`,
  which says how to resume. A second signal stops at once. With checkpointing off it stops the same way, saving
  nothing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import Strategy

from rnnlm.errors import ConfigError, check_positive_int
from rnnlm.files import load_safely, save_atomically


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a resumable checkpoint (``path``; None with checkpointing off)."""

    def __init__(self, signum: int, path: str | None, step: int) -> None:
        self.signum, self.path, self.step = signum, path, step
        saved = (f"resumable checkpoint: {path}" if path else
                 "nothing was saved: checkpointing is off (trainer.enable_checkpointing=false), so the run cannot be "
                 "resumed")  # fmt: skip
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes and ``weights_only`` reads (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return load_safely(path, map_location if map_location is not None else "cpu")


def with_safe_checkpoint_io(plugins: Any, strategy: Any = None) -> list:
    """The Trainer's ``plugins`` with a :class:`SafeCheckpointIO` added, unless a checkpoint IO was chosen already.

    A ``CheckpointIO`` among ``plugins`` is kept as it is, and so is one set on a ``Strategy`` object; a strategy
    object that has none gets the safe one set on it (Lightning refuses a checkpoint IO in both places).
    """
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        return plugins
    if isinstance(strategy, Strategy):
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default it creates when none was given
            strategy.checkpoint_io = SafeCheckpointIO()
        return plugins
    return [*plugins, SafeCheckpointIO()]


class ResumableCheckpoints(L.Callback):
    """Keeps a resumable ``last.ckpt`` beside the other checkpoints, and writes it when the run is interrupted.

    On SIGTERM or SIGINT (Ctrl-C) the step or validation pass under way finishes, ``last.ckpt`` is written and
    training stops with :class:`TrainingInterrupted`; a second signal stops at once. Under DDP the processes agree
    on every save (one small all-reduce per step, the same cost as Lightning's own SIGTERM check). With checkpointing
    off (``Trainer(enable_checkpointing=False)``) nothing is written: a signal still stops training cleanly, with
    :class:`TrainingInterrupted` saying that the run cannot be resumed.

    ``last.ckpt`` is the file the Trainer's ``ModelCheckpoint(save_last=True)`` writes too: give that one
    ``enable_version_counter=False`` (the CLI does), or it versions its own to ``last-v1.ckpt`` when it finds ours.

    The periodic saves are this callback's rather than a second ``ModelCheckpoint(every_n_train_steps=...,
    train_time_interval=..., save_last=True)``: one ``ModelCheckpoint`` takes only one of the two triggers; its timer
    can fire between the micro-batches of an accumulated step (a checkpoint that loses their gradients); and under
    DDP it decides with a ``broadcast_object_list`` on every batch, besides the all-reduce the signal needs, which
    here carries both decisions.

    Args:
        every_n_train_steps: also write it every N optimizer steps (None: off).
        every_n_minutes: also write it when this many minutes have passed since the last write (None: off).
        handle_signals: catch SIGTERM and SIGINT as described; off leaves Lightning's default handling.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = 30.0,
        handle_signals: bool = True,
    ) -> None:
        if every_n_train_steps is not None:
            check_positive_int("resumable.every_n_train_steps", every_n_train_steps)
        if every_n_minutes is not None and not every_n_minutes > 0:
            raise ConfigError(f"resumable.every_n_minutes must be positive or null, got {every_n_minutes}.")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_minutes = every_n_minutes
        self.handle_signals = handle_signals
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._last_write = time.monotonic()
        self._can_save = True  # False when the Trainer has checkpointing off

    # ----------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:  # asked twice: the user wants out now
            self._restore_handlers()
            raise KeyboardInterrupt
        self._signal = signum
        then = "saving a checkpoint" if self._can_save else "stopping WITHOUT a checkpoint (checkpointing is off)"
        print(f"\nrnnlm: {signal.Signals(signum).name} received: finishing this step, then {then} (signal again to "
              "stop at once)", flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A SIGTERM that arrived while the data was prepared is in Lightning's flag: keep it.
        self._signal = signal.SIGTERM if trainer.received_sigterm else None
        self._last_write = time.monotonic()
        # Lightning adds a ModelCheckpoint unless checkpointing is off, and refuses one when it is.
        self._can_save = trainer.checkpoint_callback is not None
        # Replacing Lightning's SIGTERM handler also keeps a signal from aborting a validation pass half way.
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # ----------------------------------------------------------------------------------------- saving
    def last_path(self, trainer: L.Trainer) -> str:
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, "last.ckpt")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        done = batch_idx + 1
        if done % trainer.accumulate_grad_batches and done != trainer.num_training_batches:
            return  # a checkpoint between the micro-batches of one step would lose their gradients
        due = bool(self.every_n_train_steps) and trainer.global_step % self.every_n_train_steps == 0
        self._maybe_save(trainer, pl_module, due)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._maybe_save(trainer, pl_module, due=False)

    def _maybe_save(self, trainer: L.Trainer, pl_module: L.LightningModule, due: bool) -> None:
        if self.every_n_minutes and time.monotonic() - self._last_write >= 60 * self.every_n_minutes:
            due = True
        due = due and self._can_save
        stopping = self._signal is not None
        if trainer.world_size > 1:
            # Every process must take part in a save (the carried states are gathered): decide together.
            flags = torch.tensor([float(due), float(stopping)], device=pl_module.device)
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
            due, stopping = bool(flags[0] > 0), bool(flags[1] > 0)
        if not (due or stopping):
            return
        if not self._can_save:
            raise TrainingInterrupted(self._signal or signal.SIGTERM, None, trainer.global_step)
        path = self.last_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: weights, optimizer, loops
        self._last_write = time.monotonic()
        if stopping:
            raise TrainingInterrupted(self._signal or signal.SIGTERM, path, trainer.global_step)
