"""Checkpoints that survive crashes, pre-emption and cluster time limits, and load without running code (the reading
and writing themselves are in ``rnnlm.files``).

- :class:`SafeCheckpointIO` writes each checkpoint to a temporary file in the same folder, flushes it to disk and
  renames it over the target, so a crash mid-write leaves the previous file intact; it reads checkpoints with
  ``weights_only=True`` (tensors and plain types only: a checkpoint cannot run code when loaded) and turns a
  truncated or foreign file into a clear error.
- :class:`ResumableCheckpoints` writes ``last.ckpt`` when training ends, whatever ended it, keeps it fresh every N
  steps or minutes and, on SIGTERM (a scheduler's pre-emption), Ctrl-C or SLURM's warning signal, finishes the
  current step, writes it and stops with :class:`TrainingInterrupted`, which says how to resume; on SLURM's
  warning it also requeues the job. A second SIGTERM or Ctrl-C stops at once. With checkpointing off it stops the
  same way, saving nothing.
- :func:`newest_checkpoint` finds where a restarted job continues: the newest full checkpoint of the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import Strategy

from rnnlm.errors import ConfigError, check_positive_int
from rnnlm.files import CheckpointError, load_safely, save_atomically
from rnnlm.training.tracking import wandb_run_facts
from rnnlm.version import __version__


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a resumable checkpoint (``path``; None with checkpointing off).

    ``requeued`` says what became of the SLURM job when the signal was SLURM's warning (None otherwise): True when
    ``scontrol requeue`` succeeded, False when it failed or was not attempted (``detail`` says why).
    """

    def __init__(self, signum: int, path: str | None, step: int, requeued: bool | None = None,
                 detail: str = "", seconds: float | None = None) -> None:  # fmt: skip
        self.signum, self.path, self.step, self.requeued = signum, path, step, requeued
        took = f" (written in {seconds:.2f} s)" if seconds is not None else ""
        saved = (f"resumable checkpoint: {path}{took}" if path else
                 "nothing was saved: checkpointing is off (trainer.enable_checkpointing=false), so the run cannot be "
                 "resumed")  # fmt: skip
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}"
                         + (f"; {detail}" if detail else ""))  # fmt: skip


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


# ------------------------------------------------------------------------------------------ SLURM
def slurm_requeue_signal(trainer: L.Trainer) -> int | None:
    """The signal SLURM warns with (``--signal=USR1@<seconds>``) when the Trainer runs as a SLURM job whose
    environment plugin has ``auto_requeue`` on (Lightning's default under SLURM); None otherwise."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:  # single-device strategies keep it on the accelerator connector only
        environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
        return int(environment.requeue_signal)
    return None


def slurm_job_id() -> str | None:
    """This job's id as ``scontrol`` wants it (``<array job>_<task>`` for a job array), or None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(timeout: float = 60.0) -> tuple[bool, str]:
    """``scontrol requeue <this job>``: the job goes back to the queue and, when it starts again, runs its script
    from the top. Returns whether it worked and a sentence saying what happened."""
    job = slurm_job_id()
    if not job:
        return False, "not requeued: SLURM_JOB_ID is not set"
    command = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return False, f"not requeued: scontrol was not found on the PATH; resubmit job {job}'s script"
    except subprocess.TimeoutExpired:
        return False, f"not requeued: `{' '.join(command)}` did not answer within {timeout:.0f} s; resubmit the job"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return False, (f"not requeued: `{' '.join(command)}` failed with exit status {done.returncode}"
                       + (f" ({why[-1]})" if why else "") + "; is the job submitted with --requeue? Resubmit it")
    return True, f"SLURM job {job} requeued: it continues from this checkpoint when it starts again"


# ------------------------------------------------------------------------------------------ the callback
class ResumableCheckpoints(L.Callback):
    """Writes a resumable ``last.ckpt`` beside the other checkpoints: when training ends, periodically, and when the
    run is interrupted.

    - **At the end**: whatever ends training (``max_steps``, ``max_epochs``, ``max_time``, early stopping),
      ``last.ckpt`` holds the state it ended with. A run that stops in the middle of an epoch is saved at the step
      it stopped after, so a longer run resumed from it continues that epoch exactly. (Lightning 2.6's
      ``ModelCheckpoint`` rewrites ``last.ckpt`` only when it saves a new best checkpoint, and at the end only if
      it saved nothing before.) With weight averaging (NT-ASGD) the checkpoint is written before the model takes
      the averages: its weights are the averages the run ends with and its ``current_model_state`` the training
      weights, so it resumes exactly too.
    - **Periodically**: every N optimizer steps and/or minutes, so a hard kill (a node failure, SIGKILL) loses at
      most that much.
    - **On a signal**: on SIGTERM or SIGINT (Ctrl-C) the step or validation pass under way finishes, ``last.ckpt``
      is written and training stops with :class:`TrainingInterrupted`; a second SIGTERM or SIGINT stops at once.
      Under SLURM (Lightning's ``SLURMEnvironment`` with ``auto_requeue``), the requeue signal (SIGUSR1, sent by
      ``sbatch --signal=USR1@<seconds>`` before the time limit) does the same and then requeues the job with
      ``scontrol requeue``; the SIGTERM SLURM sends when it takes the job off its nodes is then expected, not a
      second request. This replaces Lightning's own SIGUSR1 handler, which writes ``hpc_ckpt_<n>.ckpt`` from
      inside the signal handler, wherever the step happens to be, on each process separately.

    Under DDP the processes agree on every save (one small all-reduce per step, the same cost as Lightning's own
    SIGTERM check) and the checkpoint is written once. With checkpointing off (``Trainer(enable_checkpointing=
    False)``) nothing is written and nothing is requeued: a signal still stops training cleanly, with
    :class:`TrainingInterrupted` saying that the run cannot be resumed.

    ``last.ckpt`` is the file the Trainer's ``ModelCheckpoint(save_last=True)`` writes too: give that one
    ``enable_version_counter=False`` (the CLI does), or it versions its own to ``last-v1.ckpt`` when it finds ours.

    The callback moves itself behind the other callbacks, so that what they do at the end of a step (a timer that
    stops training, weight averaging) is in the checkpoint; for the end of training it puts a small hook in front,
    so that the checkpoint is written before the others' ``on_train_end`` (weight averaging swaps the weights
    there).

    The periodic saves are this callback's rather than a second ``ModelCheckpoint(every_n_train_steps=...,
    train_time_interval=..., save_last=True)``: one ``ModelCheckpoint`` takes only one of the two triggers; its timer
    can fire between the micro-batches of an accumulated step (a checkpoint that loses their gradients); and under
    DDP it decides with a ``broadcast_object_list`` on every batch, besides the all-reduce the signal needs, which
    here carries both decisions.

    Args:
        every_n_train_steps: also write it every N optimizer steps (None: off).
        every_n_minutes: also write it when this many minutes have passed since the last write (None: off).
        handle_signals: catch SIGTERM, SIGINT and, under SLURM, the requeue signal as described; off leaves
            Lightning's default handling.
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
        self._reset()
        self._originals: dict[int, Any] = {}  # the handlers found when this callback installed its own
        self._armed = False  # between setup and the end of training
        self._can_save = True  # False when the Trainer has checkpointing off
        self._silenced: list[ModelCheckpoint] = []

    def _reset(self) -> None:
        self._signal: int | None = None  # the first signal that asked to stop
        self._stop_signals: set[int] = set()  # SIGTERM / SIGINT received: a second one means "now"
        self._requeue_signal: int | None = None  # SLURM's warning signal, when running under SLURM
        self._requeue = False  # SLURM's warning arrived: requeue the job once the checkpoint is written
        self._last_write = time.monotonic()
        self._final_step: int | None = None  # the step the final checkpoint was written after
        self._requeued = False  # the job was requeued: SLURM's SIGTERM is coming
        self._epoch_complete = False  # the last training batch seen ended its epoch

    # ----------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._armed:
            # Lightning puts back, after training, the handlers it found before: this one if it was installed by
            # then (the requeue signal). Behave as if it were not there.
            signal.signal(signum, self._originals.pop(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        if signum == self._requeue_signal:
            # Requeue only when the warning comes first: after a SIGTERM (scancel, pre-emption) the job must end.
            if self._signal is None:
                self._signal, self._requeue = signum, True
                self._announce(signum, "then requeueing the job")
            return
        if self._stop_signals:  # asked twice: the user wants out now
            self._restore_handlers()
            self._armed = False
            raise KeyboardInterrupt
        self._stop_signals.add(signum)
        if self._signal is None:
            self._signal = signum
            self._announce(signum, "")

    def _announce(self, signum: int, then: str) -> None:
        saving = "saving a checkpoint" if self._can_save else "stopping WITHOUT a checkpoint (checkpointing is off)"
        again = "" if signum == self._requeue_signal else " (signal again to stop at once)"
        print(f"\nrnnlm: {signal.Signals(signum).name} received: finishing this step, then {saving}"
              f"{', ' + then if then and self._can_save else ''}{again}", flush=True)  # fmt: skip

    def _install(self, signals: tuple[int, ...]) -> None:
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            self._armed = True
            for signum in signals:
                previous = signal.signal(signum, self._on_signal)
                owner = getattr(previous, "__self__", None)
                if owner is self:
                    continue
                if isinstance(owner, ResumableCheckpoints) and not owner._armed:
                    previous = owner._originals.get(signum, signal.SIG_DFL)  # left by an earlier run: see _on_signal
                self._originals[signum] = previous

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        # Behind every other callback, with a hook in front for the end of training (see the class docstring).
        others = [cb for cb in trainer.callbacks if cb is not self and not isinstance(cb, _BeforeTrainEnd)]
        trainer.callbacks = [_BeforeTrainEnd(self), *others, self]
        # Before the Trainer sets up its own signal handlers, so that Lightning leaves SLURM's warning to this one
        # (a warning that arrives while the model is set up is kept for the first step).
        self._requeue_signal = slurm_requeue_signal(trainer)
        if self._requeue_signal is not None:
            self._install((self._requeue_signal,))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            # A checkpoint found by --ckpt_path last on a file system that the nodes do not share could differ
            # from one process to the next: train on together only if all loaded the same one.
            mine = str(trainer.ckpt_path)
            differs = trainer.strategy.reduce_boolean_decision(trainer.strategy.broadcast(mine) != mine, all=False)
            if differs:
                raise CheckpointError(
                    f"The processes of this job resumed from different checkpoints (process {trainer.global_rank}: "
                    f"{mine}). Put trainer.default_root_dir (and checkpoint.dirpath) on a file system that every "
                    "node shares, or pass --ckpt_path with one file."
                )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A SIGTERM that arrived while the data was prepared is in Lightning's flag: keep it.
        if trainer.received_sigterm and self._signal is None:
            self._signal = signal.SIGTERM
            self._stop_signals.add(signal.SIGTERM)
        self._last_write = time.monotonic()
        # Lightning adds a ModelCheckpoint unless checkpointing is off, and refuses one when it is.
        self._can_save = trainer.checkpoint_callback is not None
        # Replacing Lightning's SIGTERM handler also keeps a signal from aborting a validation pass half way.
        self._install(self.SIGNALS)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._originals.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        if self._requeued:
            # Not the handler found before (Lightning's, which broadcasts to the other processes from inside the
            # handler, while they are shutting down): SLURM's SIGTERM is expected now, and means nothing more.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._armed = False
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._armed = False
        self._restore_handlers()
        for ckpt in self._silenced:
            ckpt.save_last = True
        self._silenced = []

    # ----------------------------------------------------------------------------------------- when to save
    def last_path(self, trainer: L.Trainer) -> str:
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, "last.ckpt")

    @staticmethod
    def _may_stop(trainer: L.Trainer) -> bool:
        """Whether a request to stop (``trainer.should_stop``) is obeyed now: min_steps and min_epochs are met."""
        return (trainer.min_steps is None or trainer.global_step >= trainer.min_steps) and (
            trainer.min_epochs is None or trainer.current_epoch >= trainer.min_epochs)  # fmt: skip

    def _stops_mid_epoch(self, trainer: L.Trainer) -> bool:
        """Whether training ends after this step although its epoch is not finished."""
        if self._epoch_complete:
            return False  # the end of an epoch is saved at the end of training, after the epoch's hooks
        reached = trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps
        return reached or (trainer.should_stop and self._may_stop(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        done = batch_idx + 1
        self._epoch_complete = done >= trainer.num_training_batches
        final = self._stops_mid_epoch(trainer)
        if done % trainer.accumulate_grad_batches and not self._epoch_complete and not final:
            return  # a checkpoint between the micro-batches of one step would lose their gradients
        due = bool(self.every_n_train_steps) and trainer.global_step % self.every_n_train_steps == 0
        self._maybe_save(trainer, pl_module, due, final)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            # Early stopping decides here (it runs before this callback): the run ends after this validation.
            self._maybe_save(trainer, pl_module, due=False, final=self._stops_mid_epoch(trainer))

    def _before_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At the end of training, before any other callback's ``on_train_end``."""
        self._maybe_save(trainer, pl_module, due=False, final=True)
        # ModelCheckpoint writes last.ckpt in its own on_train_end when it has saved nothing in this process: after
        # weight averaging has put the averages into the model, which would overwrite the training weights.
        for ckpt in trainer.checkpoint_callbacks:
            if isinstance(ckpt, ModelCheckpoint) and ckpt.save_last and self._can_save:
                ckpt.save_last = False  # given back in teardown
                self._silenced.append(ckpt)

    def _maybe_save(self, trainer: L.Trainer, pl_module: L.LightningModule, due: bool, final: bool = False) -> None:
        if self.every_n_minutes and time.monotonic() - self._last_write >= 60 * self.every_n_minutes:
            due = True
        if final and (self._final_step == trainer.global_step or trainer.fast_dev_run):
            final = False  # written already (or fast_dev_run, which writes nothing)
        due = (due or final) and self._can_save
        stopping, requeue = self._signal is not None, self._requeue
        if trainer.world_size > 1:
            # Every process must take part in a save (the carried states are gathered): decide together.
            flags = torch.tensor([float(due), float(stopping), float(requeue)], device=pl_module.device)
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
            due, stopping, requeue = bool(flags[0] > 0), bool(flags[1] > 0), bool(flags[2] > 0)
        if not (due or stopping):
            return
        signum = (self._requeue_signal if requeue else self._signal) or signal.SIGTERM
        if not self._can_save:
            detail = "not requeued: a requeued job would start over" if requeue else ""
            raise TrainingInterrupted(signum, None, trainer.global_step, False if requeue else None, detail)
        path = self.last_path(trainer)
        start = time.monotonic()
        trainer.save_checkpoint(path, weights_only=False)  # the full state: weights, optimizer, loops
        self._last_write = time.monotonic()
        if final:
            self._final_step = trainer.global_step
        if stopping:
            requeued, detail = None, ""
            if requeue:
                requeued, detail = requeue_slurm_job() if trainer.is_global_zero else (True, "")
                self._requeued = True
            # How long the write took tells how many seconds of warning the job needs (docs/resume.md).
            seconds = self._last_write - start
            raise TrainingInterrupted(signum, path, trainer.global_step, requeued, detail, seconds)


class _BeforeTrainEnd(L.Callback):
    """Gives :class:`ResumableCheckpoints` the first ``on_train_end`` (it stands last for the other hooks)."""

    def __init__(self, owner: ResumableCheckpoints) -> None:
        self.owner = owner

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.owner._before_train_end(trainer, pl_module)


# ------------------------------------------------------------------------------------------ finding the newest
@dataclass
class FoundCheckpoint:
    """A full training checkpoint found on disk: its path, the step it was written after, its W&B run (if any)."""

    path: Path
    step: int
    wandb_run: dict | None


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents with its tensors memory-mapped, not read: cheap for a checkpoint of any size.

    Raises :class:`CheckpointError` when the file cannot be read as a checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, the answer is "not usable"
        why = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {why})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint (it has no model weights)")
    return checkpoint


def _checkpoint_folders(base: Path, depth: int = 4) -> list[Path]:
    """The ``checkpoints`` folders under ``base`` (Lightning's layout: ``<save_dir>/<name>/<version>/checkpoints``,
    or ``<default_root_dir>/checkpoints`` without a logger), skipping hidden folders and W&B's own files."""
    found = []
    base_depth = len(base.parts)
    for folder, subfolders, _ in os.walk(base):
        here = Path(folder)
        if here.name == "checkpoints":
            found.append(here)
        subfolders[:] = [] if len(here.parts) - base_depth >= depth else [
            name for name in subfolders if not name.startswith(".") and name != "wandb"]  # fmt: skip
    return found


def newest_checkpoint(
    root: str | os.PathLike,
    dirpath: str | os.PathLike | None = None,
    run_id: str | None = None,
    save_dirs: tuple[str | os.PathLike, ...] = (),
    report: Any = None,
) -> FoundCheckpoint | None:
    """The newest full training checkpoint of the run in ``root`` (the Trainer's ``default_root_dir``): where a
    restarted job continues.

    Looked at: every ``*.ckpt`` in ``dirpath`` if given (``--checkpoint.dirpath``), else in the ``checkpoints``
    folders under ``root`` and ``save_dirs`` (the loggers' folders), only those of W&B run ``run_id`` if given;
    and Lightning's ``hpc_ckpt_<n>.ckpt`` in ``root``. ``nonfinite-step*.ckpt`` (the state before a NaN) and
    checkpoints without optimizer and loop states (``save_weights_only``) are not resumable and are passed over,
    and so is a file that cannot be read (``report`` is called with a line saying why). "Newest" is the latest
    modification time: checkpoints are written atomically, so that is when the file was complete.
    """
    root = Path(root)
    if dirpath:
        folders = [Path(dirpath)]
    else:
        folders = []
        for base in dict.fromkeys([root, *map(Path, save_dirs)]):
            folders += [f for f in _checkpoint_folders(base) if run_id is None or f.parent.name == run_id]
    files = {p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")
             if not p.name.startswith("nonfinite-")}  # fmt: skip
    if root.is_dir():
        files |= set(root.glob("hpc_ckpt_*.ckpt"))
    by_age = sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)
    for path in by_age:
        try:
            checkpoint = peek_checkpoint(path)
        except CheckpointError as err:
            if report:
                report(f"passing over {err}")
            continue
        if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
            continue  # weights only: it can start a run, not continue one
        return FoundCheckpoint(path, int(checkpoint.get("global_step", 0)),
                               checkpoint.get("rnnlm", {}).get("wandb_run"))  # fmt: skip
    return None


# ------------------------------------------------------------------------------------------ rnnlm's record
def write_record(module: L.LightningModule, checkpoint: dict, **entries) -> None:
    """Write ``checkpoint["rnnlm"]`` (read by ``rnnlm.sharing.checkpoints``), the one writer of both
    LightningModules: the rnnlm version, the tokenizer, the data facts, the validation metrics of these very
    weights, the run's configuration and, in training, the W&B run (so that a resumed run continues it), then the
    module's own ``entries``. Plain strings, numbers and tensors only, so the checkpoint alone is enough to use the
    model and it loads with ``weights_only=True``."""
    trainer = module.trainer
    record = {"version": __version__, "tokenizer": module.tokenizer_json}
    if module._data_facts:
        record["data"] = module._data_facts
    val = module.measured.get("val")
    if val is not None and val["step"] == trainer.global_step:
        record["metrics"] = {"val": dict(val)}
    if module.run_config is not None:
        record["run_config"] = module.run_config
    if trainer.state.fn == "fit" and trainer.is_global_zero:
        for logger in module.loggers:
            if isinstance(logger, WandbLogger):
                record["wandb_run"] = wandb_run_facts(logger)
    checkpoint["rnnlm"] = {**record, **entries}
