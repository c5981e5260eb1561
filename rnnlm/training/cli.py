"""The training commands' machinery: the LightningCLI classes of ``rnnlm.fit`` and ``rnnlm.classify`` and the
training run they share (log the configuration, fit, test the best checkpoint, export for W&B, end with a message
and an exit status on a stop or a fault), ``--ckpt_path last`` and W&B run naming."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger

from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError, load_safely, remove_stale_temporaries, save_atomically, write_atomically
from rnnlm.network.config import RNNLMConfig
from rnnlm.sharing.export import export
from rnnlm.sharing.transfer import take_pretrained_settings, tokenizer_source
from rnnlm.text.tokenization import default_tokenizers_parallelism
from rnnlm.training.callbacks import NonFiniteLossError, TextSample
from rnnlm.training.checkpointing import (
    ResumableCheckpoints,
    TrainingInterrupted,
    newest_checkpoint,
    peek_checkpoint,
    with_safe_checkpoint_io,
)
from rnnlm.training.tracking import choose_wandb_mode
from rnnlm.version import __version__


class RNNLMCLI(LightningCLI):
    """What ``rnnlm.fit`` and ``rnnlm.classify`` share: old settings refused by name, a CSV or TensorBoard logger
    writing under the run's folder, ``--ckpt_path last``, W&B run naming, fine-tuning set-up, safe checkpoint IO.
    :class:`LanguageModelCLI` and :class:`ClassifierCLI` add their sections and links."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self.raw_args = sys.argv[1:] if args is None else args
        _refuse_moved_settings(self.raw_args)
        _refuse_old_class_paths(self.raw_args)
        _check_config_files(self.raw_args)
        if isinstance(self.raw_args, (list, tuple)):
            args = _default_logger_folder(list(self.raw_args))
        try:
            with warnings.catch_warnings():
                # Lightning warns whenever args are passed and sys.argv holds arguments too: here they are the same.
                warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
                super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise ConfigError(_argument_error(parser, str(err))) from None

    def before_instantiate_classes(self) -> None:
        config = self.config
        _check_ckpt_path(config)
        _find_last_checkpoint(config)
        self.use_pretrained(config)
        # A W&B run gets a name from its config file plus a timestamp, and writes under the run's own folder;
        # unless W&B started the run already (a sweep agent, WANDB_RUN_ID, wandb.init in the calling code):
        # that one keeps its id and name, and it is the only run.
        started = wandb_run_started()
        files = config.get("config") or []
        stem = Path(str(files[0])).stem if files else "rnnlm"
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        resumed = _saved_wandb_run(config.get("ckpt_path"))
        for logger in loggers:
            if getattr(logger, "class_path", "").endswith("WandbLogger"):
                args = logger.init_args
                if resumed and not started and not (args.get("id") or args.get("version")):
                    args.id, args.name = resumed["id"], args.get("name") or resumed.get("name")
                if not args.get("name") and not started:
                    args.name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
                if args.get("save_dir") in (None, "."):
                    args.save_dir = config.trainer.default_root_dir or "runs"
            elif getattr(getattr(logger, "init_args", None), "save_dir", None) == RUN_FOLDER:
                logger.init_args.save_dir = config.trainer.default_root_dir or "runs"

    def use_pretrained(self, config) -> None:
        """Fine-tuning: with ``model.init_from``, the run takes the pretrained model's architecture and tokenizer."""
        if config.model.get("init_from"):
            raw = getattr(self, "raw_args", None)
            take_pretrained_settings(config, _explicit_settings(raw, "model.config"), _explicit_settings(raw, "data"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self.config_init.trainer
        if trainer.get("enable_checkpointing") is False:  # Lightning refuses a ModelCheckpoint then
            self.parser.callback_keys = [key for key in self.parser.callback_keys if key != "checkpoint"]
        # Atomic writes and weights_only reads, unless the user chose a checkpoint IO.
        kwargs.setdefault("plugins", with_safe_checkpoint_io(trainer.get("plugins"), trainer.get("strategy")))
        return super().instantiate_trainer(**kwargs)



class LanguageModelCLI(RNNLMCLI):
    """``rnnlm.fit``: the language model's links, checkpoints (best by validation loss) and closing text sample."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module knows the vocabulary (it builds the tokenizer on demand); the user never repeats it.
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        # A bidirectional model needs the backward chunks; the user sets it once, on the model.
        parser.link_arguments("model.config.bidirectional", "data.bidirectional")
        # Fine-tuning: the data is read with the pretrained tokenizer (unless the vocabularies are matched).
        parser.link_arguments(("model.init_from", "model.init_vocab"), "data.init_from", compute_fn=tokenizer_source)
        _add_run_arguments(parser, monitor="val/loss", mode="min")
        parser.add_lightning_class_args(TextSample, "sample")

class ClassifierCLI(RNNLMCLI):
    """``rnnlm.classify``: the classifier's links and checkpoints (best by validation accuracy)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The pretrained model is named once, on the model; the data module reads its tokenizer.
        parser.link_arguments("model.init_from", "data.init_from")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.labels", apply_on="instantiate")
        _add_run_arguments(parser, monitor="val/accuracy", mode="max")

    def use_pretrained(self, config) -> None:
        """The classifier reads its language model itself (``TextClassifier(init_from=...)``): its encoder, not a
        whole LM with its architecture checks."""


def _add_run_arguments(parser: LightningArgumentParser, monitor: str, mode: str) -> None:
    """The sections both training commands have: ``--ckpt_path``, ``--test_after_fit``, ``--checkpoint.*`` (the
    best checkpoint by ``monitor``, and last.ckpt) and ``--resumable.*``."""
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="Checkpoint to resume from: a path, or 'last' for the newest of the run in "
                             "trainer.default_root_dir (none yet: start the run).")
    parser.add_argument("--test_after_fit", type=bool, default=True,
                        help="Evaluate the best checkpoint on the test split (if any) after training.")
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    name = monitor.replace("/", "_")
    parser.set_defaults({
        "checkpoint.monitor": monitor,
        "checkpoint.mode": mode,
        "checkpoint.save_last": True,
        "checkpoint.filename": f"epoch{{epoch}}-step{{step}}-{name}{{{monitor}:.4f}}",
        "checkpoint.auto_insert_metric_name": False,
        # --resumable writes last.ckpt too: one file, not last-v1.ckpt beside it.
        "checkpoint.enable_version_counter": False,
    })  # fmt: skip
    parser.add_lightning_class_args(ResumableCheckpoints, "resumable")


def train(cli_class: type[RNNLMCLI], module: type, data: type, command: str, description: str | None,
          args: list[str] | None, **cli_kwargs) -> RNNLMCLI:
    """Build the CLI of ``command`` (``rnnlm.fit``, ``rnnlm.classify``) from ``args`` and run the training."""
    default_tokenizers_parallelism()
    keep_freed_memory()
    flush_denormals()
    wandb_mode = choose_wandb_mode()
    existing_run = current_wandb_run()  # started by the caller: theirs to finish
    cli = cli_class(module, data, run=False, args=args, seed_everything_default=1234,
                    save_config_kwargs={"overwrite": True},
                    parser_kwargs={"description": description, "exit_on_error": False}, **cli_kwargs)
    run_training(cli, cli.datamodule.splits, command, args, wandb_mode, existing_run)
    return cli


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
    """Whether this is the process that starts a run: not a DDP worker Lightning launched, not another task of
    a multi-process job (they run in the folder the first one holds)."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


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


# ------------------------------------------------------------------------------------------ fine-tuning
def _explicit_settings(args, section: str) -> set[str]:
    """The names under ``section`` (``model.config``, ``data``) that this run sets itself: on the command line
    (``--section.name v``, ``--section.name=v``, or the section as YAML) or in a ``--config`` file."""
    if not isinstance(args, (list, tuple)):
        return set()
    found: set[str] = set()
    prefix = f"--{section}."
    for i, arg in enumerate(args):
        if arg.startswith(prefix):
            found.add(arg[len(prefix):].split("=")[0].split(".")[0])
        name, _, inline = arg.partition("=")
        if name in ("--config", f"--{section}", f"--{section.split('.')[0]}"):
            value = inline or (args[i + 1] if i + 1 < len(args) else "")
            content = _yaml_value(value)
            keys = ["model", "config"] if section == "model.config" else ["data"]
            depth = 0 if name == "--config" else len(name[2:].split("."))
            for key in keys[depth:]:
                content = content.get("init_args", content) if isinstance(content, dict) else {}
                content = content.get(key) if isinstance(content, dict) else {}
            content = content.get("init_args", content) if isinstance(content, dict) else {}
            if isinstance(content, dict):
                found.update(content)
    return found


def _yaml_value(value: str) -> Any:
    """A YAML file's content, or the value itself parsed as YAML."""
    try:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                return yaml.safe_load(f)
        return yaml.safe_load(value)
    except (OSError, yaml.YAMLError):
        return None


def _saved_wandb_run(ckpt_path: str | None) -> dict | None:
    """The W&B run a checkpoint was written by, so that resuming continues that run and its checkpoint folder."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return None  # "best"/"hpc" or a missing file: Lightning resolves or reports it
    try:
        return peek_checkpoint(ckpt_path).get("rnnlm", {}).get("wandb_run")
    except CheckpointError:
        return None  # reported with its explanation when the Trainer loads it


def _check_ckpt_path(config) -> None:
    """``--ckpt_path`` names a checkpoint file (or ``last``, ``best``, ...): a folder is answered with the files
    in it that could be meant."""
    path = config.get("ckpt_path")
    if path and os.path.isdir(path):
        found = sorted(Path(path).rglob("*.ckpt"))
        hint = (f" It holds {', '.join(str(p) for p in found[:3])}{' ...' if len(found) > 3 else ''}." if found
                else " It holds no .ckpt file.")
        raise ConfigError(f"--ckpt_path {path} is a folder: give a checkpoint file (.ckpt), or --ckpt_path last to "
                          f"continue the newest checkpoint of the run in trainer.default_root_dir.{hint}")


def _find_last_checkpoint(config) -> None:
    """``--ckpt_path last``: the newest checkpoint of the run (``checkpointing.newest_checkpoint``), looked up before
    the logger exists, so that a new process (a requeued or resubmitted job) continues the run, its W&B run and its
    checkpoint folder included. A run that has none yet starts, and says so in one line."""
    if config.get("ckpt_path") != "last":
        return
    root = config.trainer.default_root_dir or os.getcwd()
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    run_id, save_dirs = None, []
    for logger in loggers:
        args = getattr(logger, "init_args", None) or {}
        wandb = getattr(logger, "class_path", "").endswith("WandbLogger")
        if args.get("save_dir") not in (None, "."):
            save_dirs.append(str(args.save_dir))
        elif wandb and not config.trainer.default_root_dir:
            save_dirs.append("runs")  # where before_instantiate_classes puts it
        if wandb:
            run_id = args.get("id") or args.get("version") or run_id  # a W&B run named: that run's checkpoints
    dirpath = config.get("checkpoint", {}).get("dirpath")
    found = newest_checkpoint(root, dirpath, run_id, tuple(save_dirs), report=_say_last)
    if found is None:
        where = dirpath or (f"W&B run {run_id} under {root}" if run_id else root)
        _say_last(f"no checkpoint of this run in {where} yet: starting it from scratch")
        config.ckpt_path = None
    else:
        _say_last(f"continuing from {found.path} (step {found.step})")
        config.ckpt_path = str(found.path)


@rank_zero_only
def _say_last(message: str) -> None:
    print(f"rnnlm: --ckpt_path last: {message}", flush=True)


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


# Loggers whose save_dir has no default: named alone on the command line (as the configs' comments suggest,
# `--trainer.logger lightning.pytorch.loggers.CSVLogger`), they write under the run's default_root_dir, as the
# W&B logger does, instead of failing to parse.
FOLDER_LOGGERS = ("CSVLogger", "TensorBoardLogger")
RUN_FOLDER = "<trainer.default_root_dir>"


def _default_logger_folder(args: list[str]) -> list[str]:
    """``args`` with ``--trainer.logger.save_dir RUN_FOLDER`` after a logger of FOLDER_LOGGERS that is given no
    save_dir (a save_dir given later still wins)."""
    if any(a.startswith(("--trainer.logger.save_dir", "--trainer.logger.init_args.save_dir")) for a in args):
        return args
    for i, arg in enumerate(args):
        if arg.startswith("--trainer.logger="):
            value, at = arg.split("=", 1)[1], i + 1
        elif arg == "--trainer.logger" and i + 1 < len(args):
            value, at = args[i + 1], i + 2
        else:
            continue
        if value.rsplit(".", 1)[-1] in FOLDER_LOGGERS:
            return [*args[:at], "--trainer.logger.save_dir", RUN_FOLDER, *args[at:]]
    return args


def _refuse_moved_settings(args) -> None:
    """Model settings moved from ``model.<setting>`` to ``model.config.<setting>``: say so, rather than leave the user
    with the parser's "unrecognized arguments"."""
    if not isinstance(args, (list, tuple)):
        return  # a dict or Namespace given from Python
    moved = RNNLMConfig.setting_names()
    found = []
    for i, arg in enumerate(args):
        if arg.startswith("--model.") and arg[len("--model.") :].split("=")[0] in moved:
            found.append(f"{arg.split('=')[0]} (now --model.config.{arg[len('--model.') :].split('=')[0]})")
        if arg == "--config" and i + 1 < len(args) or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
            model = _yaml_section(path, "model")
            model = model.get("init_args", model)
            found += [f"model: {key}: in {path} (now model: config: {key}:)" for key in model if key in moved]
    if found:
        raise ConfigError(
            "The model's settings are now one config object, under model.config: " + "; ".join(found) + ". On the "
            "command line write --model.config.<setting>; in a YAML file nest the settings under model: config:."
        )


# Modules of rnnlm before the package was layered, and where their classes are now.
MOVED_MODULES = {
    "config": "network.config", "model": "network.lm", "head": "network.head", "pointer": "network.pointer",
    "classifier": "network.classifier", "sources": "text.sources", "tokenization": "text.tokenization",
    "encoding": "text.encoding", "token_cache": "text.token_cache", "streams": "text.streams", "data": "data.lm",
    "classification_data": "data.classifier", "lm": "training.lm", "classification": "training.classifier",
    "ulmfit": "training.ulmfit", "training": "training.callbacks", "callbacks": "training.callbacks",
    "averaging": "training.averaging", "checkpointing": "training.checkpointing", "tracking": "training.tracking",
    "inference": "sharing.lm", "pretrained": "sharing.folders",
}  # fmt: skip
# A class named right under one of those names is an old path: the layered package keeps no class at that level.
_OLD_CLASS_PATH = re.compile(r"\brnnlm\.(" + "|".join(MOVED_MODULES) + r")\.([A-Z]\w*)\b")


def _refuse_old_class_paths(args) -> None:
    """Class paths of rnnlm before its modules moved into layers (``rnnlm.ulmfit.SlantedTriangularLR``), on the
    command line or in a ``--config`` file: one message naming each new path."""
    if not isinstance(args, (list, tuple)):
        return
    found: dict[str, str] = {}
    for i, arg in enumerate(args):
        texts = [arg]
        if arg == "--config" and i + 1 < len(args) or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
            try:
                texts.append(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                pass  # the parser reports an unreadable config file itself
        for text in texts:
            for match in _OLD_CLASS_PATH.finditer(text):
                found[match.group(0)] = f"rnnlm.{MOVED_MODULES[match.group(1)]}.{match.group(2)}"
    if found:
        raise ConfigError(
            "rnnlm's modules moved into layers: " + "; ".join(f"{old} is now {new}" for old, new in found.items())
            + ". Write the new class path in the config file or on the command line."
        )


def _argument_error(parser: LightningArgumentParser, message: str) -> str:
    """The parser's complaint in one line, with the closest valid flag for each one it did not know."""
    flags = sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})
    hint = ""
    if message.startswith("unrecognized arguments:"):
        bad = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
        for flag in bad:
            close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
            hint += f" Did you mean {close[0]} (for {flag})?" if close else ""
    # jsonargparse explains a bad value over several indented lines: one line, cut where it starts repeating.
    text = " ".join(line.strip() for line in message.splitlines() if line.strip()) or "invalid arguments"
    text = text if len(text) <= 400 else text[:397] + "..."
    return f"{text.rstrip('.')}.{hint} See --help for every setting."


def _check_config_files(args) -> None:
    """A ``--config`` file that is missing or not valid YAML, named with the line of the mistake (the parser would
    print its whole usage instead)."""
    if not isinstance(args, (list, tuple)):
        return
    for i, arg in enumerate(args):
        if not (arg == "--config" and i + 1 < len(args) or arg.startswith("--config=")):
            continue
        path = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
        if not os.path.isfile(path):
            raise ConfigError(f"The config file {path} does not exist" + (" (it is a folder)" if os.path.isdir(path)
                              else "") + ": give a YAML file, e.g. configs/quickstart.yaml.")
        try:
            with open(path, encoding="utf-8") as f:
                content = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"The config file {path} is not valid YAML{where}: {what}.") from None
        except UnicodeDecodeError:
            raise ConfigError(f"The config file {path} is not UTF-8 text.") from None
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"The config file {path} must hold sections (trainer:, data:, model:, ...), not "
                              f"a {type(content).__name__}.")


def _yaml_section(path: str, section: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}  # the parser reports an unreadable config file itself
    value = content.get(section) if isinstance(content, dict) else None
    return value if isinstance(value, dict) else {}


