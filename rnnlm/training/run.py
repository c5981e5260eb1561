"""The training run ``rnnlm.fit`` and ``rnnlm.classify`` share, once their CLI has built the Trainer, the module
and the data: hold the run folder (one run per folder), log the configuration, fit, test the best checkpoint and
record its test metrics, export the model for W&B's ``log_model``, and end a stop by signal or a numerical or
checkpoint fault with a message and an exit status (with the command that resumes it)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError, load_safely, remove_stale_temporaries, save_atomically, write_atomically
from rnnlm.sharing.export import export
from rnnlm.training.callbacks import NonFiniteLossError
from rnnlm.training.checkpointing import (
    TrainingInterrupted,
    peek_checkpoint,
)
from rnnlm.version import __version__


def run_training(cli: LightningCLI, splits, command: str, args: list[str] | None, wandb_mode: str,
                 existing_run=None) -> None:
    """What ``rnnlm.fit`` and ``rnnlm.classify`` do with their CLI: log the resolved configuration, fit, test the
    best checkpoint (its test metrics recorded in it, for an export's card), log the exported model to W&B with
    ``log_model``; a stop by signal or a numerical or checkpoint fault ends with a message and an exit status.
    ``splits``: the data's split names; ``command``: the module that resumes a stopped run."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    model.run_config = plain(cli.config.as_dict())  # for the model card of an export
    for logger in trainer.loggers:
        # The full resolved configuration and the package version, besides the hparams Lightning logs itself.
        logger.log_hyperparams({"config": cli.config.as_dict(), "rnnlm_version": __version__})
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and wandb_mode == "offline":
            run_dir = Path(logger.experiment.dir).parent
            print(f"rnnlm: W&B is offline (no credentials found or WANDB_MODE=offline): the run is in {run_dir}; "
                  f"upload it later with `wandb sync {run_dir}`", flush=True)
    if "validation" not in splits and trainer.checkpoint_callback is not None:
        trainer.checkpoint_callback.monitor = None  # nothing to monitor: keep the latest weights
    lock = contextlib.ExitStack()
    if _first_process():
        lock.enter_context(run_lock(Path(trainer.default_root_dir), command))
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        for folder in {Path(trainer.default_root_dir), *([Path(dirpath)] if dirpath else [])}:
            for stale in remove_stale_temporaries_under(folder):
                print(f"rnnlm: removed {stale}, left by a checkpoint write that was killed", flush=True)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path, weights_only=True)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cli.config.test_after_fit and "test" in splits and not trainer.interrupted:
            trainer.test(model, datamodule=data, ckpt_path=best or None, weights_only=True)
            if best and trainer.is_global_zero and "test" in model.measured:
                record_test_metrics(best, model.measured["test"], run_checkpoints(trainer))
        if trainer.is_global_zero and trainer.checkpoint_callback is not None:
            ckpt = trainer.checkpoint_callback
            shown = best or os.path.join(ckpt.dirpath, "last.ckpt")
            print(f"rnnlm: checkpoints in {ckpt.dirpath} (best: {shown})")
            if not trainer.interrupted:
                log_exported_model(trainer, shown)
    except TrainingInterrupted as stop:
        if stop.requeued:
            # SLURM takes a requeued job off its nodes with SIGTERM: expected from now on, until the process ends,
            # and not a reason to cut the end short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if trainer.is_global_zero:
            print(f"rnnlm: {stop}", flush=True)
            if stop.path and not stop.requeued:
                print(f"rnnlm: continue exactly where it stopped with:\n  {resume_command(command, args, stop.path)}",
                      flush=True)
        raise SystemExit(128 + stop.signum) from None
    except (NonFiniteLossError, CheckpointError) as err:
        if trainer.is_global_zero:
            print(f"rnnlm: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        lock.close()
        # One call of main is one run: close it, or a later run in the same process would write into it.
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger.experiment is not existing_run:
                logger.experiment.finish()


# ------------------------------------------------------------------------------------------ one run per folder
RUN_LOCK = ".rnnlm-run.lock"


def _first_process() -> bool:
    """Whether this is the process that starts a run: not a DDP worker Lightning launched, not another process of
    a multi-process job (torchrun's RANK and GROUP_RANK, SLURM's SLURM_PROCID), which run in the folder the first
    one holds."""
    names = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") == "0" for name in names)


@contextlib.contextmanager
def run_lock(root: Path, command: str):
    """Hold the run folder ``root`` for this process: a second run there (which would write the same
    checkpoints) is refused, saying who holds it. The lock is the kernel's (released when the process ends, even
    by ``kill -9``), so a stale lock never blocks a resubmitted job."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / RUN_LOCK
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = json.loads((root / (RUN_LOCK + ".owner")).read_text(encoding="utf-8"))
            who = f"process {owner['pid']} on {owner['host']} ({owner['command']}, started {owner['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        raise ConfigError(f"The run folder {root} is in use by {who}: two runs there would overwrite each other's "
                          "checkpoints. Wait for it to finish, or give this run its own "
                          "--trainer.default_root_dir.") from None
    try:
        write_atomically(root / (RUN_LOCK + ".owner"), json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        yield
    finally:
        lock.release()


def remove_stale_temporaries_under(root: Path) -> list[Path]:
    """The temporary files killed writers left anywhere in the run folder (checkpoints, exports), removed; safe
    only while this run holds the folder."""
    if not root.is_dir():
        return []
    folders = {root, *(p.parent for p in root.rglob(".*.tmp*"))}
    return [p for folder in sorted(folders) for p in remove_stale_temporaries(folder)]


# ------------------------------------------------------------------------------------------ W&B
def current_wandb_run():
    wandb = sys.modules.get("wandb")  # never imported: no run can have been started
    return getattr(wandb, "run", None) if wandb is not None else None


def wandb_run_started() -> bool:
    """Whether W&B has started this run already: a sweep agent (or a user) set WANDB_RUN_ID / WANDB_SWEEP_ID for
    this process, or the calling code called ``wandb.init``. rnnlm then neither names the run nor starts another."""
    return bool(os.environ.get("WANDB_RUN_ID") or os.environ.get("WANDB_SWEEP_ID")) or current_wandb_run() is not None


def log_exported_model(trainer: Trainer, checkpoint: str) -> None:
    """With ``WandbLogger(log_model=...)``: export ``checkpoint`` beside the run's checkpoints (``<run>/model``)
    and log the folder as a W&B model artifact (offline runs keep it for ``wandb sync``)."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and getattr(lg, "_log_model", False)]
    if not loggers or not checkpoint or not os.path.isfile(checkpoint):
        return
    import wandb  # deferred: heavy, and needed only when a W&B logger logs the model


    folder = Path(checkpoint).parent.parent / "model"
    result = export(checkpoint, str(folder), overwrite=True)
    saved = load_safely(checkpoint).get("rnnlm", {})
    metadata = {"checkpoint": checkpoint, "parameters": result["parameters"], "rnnlm_version": __version__}
    for stage, values in (saved.get("metrics") or {}).items():
        metadata.update({f"{stage}/{k}": v for k, v in values.items()})
    for logger in loggers:
        run = logger.experiment
        artifact = wandb.Artifact(f"rnnlm-{run.id}", type="model", metadata=metadata,
                                  description="rnnlm exported model: model.safetensors, config.json, tokenizer.json, "
                                  "README.md (load with rnnlm.load(folder))")
        artifact.add_dir(str(folder))
        run.log_artifact(artifact, aliases=["latest"])
        print(f"rnnlm: exported {checkpoint} to {folder}, logged to W&B as the model artifact rnnlm-{run.id}",
              flush=True)


def run_checkpoints(trainer: Trainer) -> list[str]:
    """The checkpoint files this run's checkpoint callbacks keep (the best ones and last.ckpt)."""
    paths: list[str] = []
    for callback in trainer.checkpoint_callbacks:
        paths += [str(p) for p in getattr(callback, "best_k_models", {})]
        paths.append(str(getattr(callback, "last_model_path", "") or ""))
    return [p for p in dict.fromkeys(paths) if p and os.path.isfile(p)]


def record_test_metrics(measured_on: str, metrics: dict, checkpoints: list[str] | tuple[str, ...] = ()) -> None:
    """Add the run's test result to the checkpoint it was measured on and to the run's other ``checkpoints``,
    with that checkpoint's file name and step: an export of any checkpoint of the run (last.ckpt too, which the
    README exports) then shows the run's test result, labelled with the weights it belongs to."""
    try:
        step = peek_checkpoint(measured_on).get("global_step")
    except CheckpointError:
        return
    # The step of the checkpoint tested, not the trainer's: Lightning's test loop leaves global_step as fit ended.
    result = {**metrics, "step": step, "checkpoint": os.path.basename(measured_on)}
    for path in dict.fromkeys([measured_on, *checkpoints]):
        try:
            checkpoint = load_safely(path)
        except CheckpointError:
            continue
        checkpoint.setdefault("rnnlm", {}).setdefault("metrics", {})["test"] = dict(result)
        save_atomically(checkpoint, path)


def plain(value: Any) -> Any:
    """``value`` as JSON types only (what a checkpoint read with weights_only=True may hold)."""
    return json.loads(json.dumps(value, default=str))




def resume_command(command: str, args: list[str] | None, path: str) -> str:
    """The command line of this run of ``command`` (``rnnlm.fit``) with ``--ckpt_path`` pointing at ``path``."""
    argv = list(sys.argv[1:] if args is None else args)
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["python", "-m", command, *kept, "--ckpt_path", path])


