"""The LightningCLI classes of ``rnnlm.fit`` and ``rnnlm.classify``: their sections and links, what they check
before anything is built (config files, old settings and class paths, mistyped flags, ``--ckpt_path``), ``--ckpt_path
last``, W&B run naming and fine-tuning's settings; :func:`train` builds one and hands it to
:func:`rnnlm.training.run.run_training`."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError
from rnnlm.network.config import RNNLMConfig
from rnnlm.sharing.transfer import take_pretrained_settings, tokenizer_source
from rnnlm.text.tokenization import default_tokenizers_parallelism
from rnnlm.training.callbacks import TextSample
from rnnlm.training.checkpointing import (
    ResumableCheckpoints,
    newest_checkpoint,
    peek_checkpoint,
    with_safe_checkpoint_io,
)
from rnnlm.training.run import current_wandb_run, run_training, wandb_run_started
from rnnlm.training.tracking import choose_wandb_mode


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


