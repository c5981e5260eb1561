"""What an rnnlm checkpoint holds besides the LightningModule's state: one record, ``checkpoint["rnnlm"]``, written
by both LightningModules through ``rnnlm.training.checkpointing.write_record`` and read here.

The record holds the tokenizer (``tokenizer.json`` text), the rnnlm version, the run's name and tracking project,
the characters per token of each split, and for a classifier its task and ``max_length``. Reading a checkpoint
never runs code (``rnnlm.files.load_safely`` reads with ``weights_only=True``).
"""

from __future__ import annotations

import torch

from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError
from rnnlm.network.config import RNNLMConfig, check_size
from rnnlm.network.pretrained import CLASSIFIER  # the record's "task" for a classifier (absent: a language model)


def is_classifier_checkpoint(checkpoint: dict) -> bool:
    return isinstance(checkpoint.get("rnnlm"), dict) and checkpoint["rnnlm"].get("task") == CLASSIFIER




def config_of_checkpoint(checkpoint: dict) -> RNNLMConfig:
    """The model config a checkpoint was written with (also from checkpoints of rnnlm before the config object,
    whose model settings were flat hyperparameters)."""
    hparams = checkpoint.get("hyper_parameters", {})
    if "config" in hparams:
        return RNNLMConfig.from_dict(dict(hparams["config"]))
    names = set(RNNLMConfig.__dataclass_fields__)
    return RNNLMConfig.from_dict({k: v for k, v in hparams.items() if k in names})


def checked_config(checkpoint: dict, path: str) -> RNNLMConfig:
    """The model config of an rnnlm checkpoint already read, refusing a checkpoint that is not rnnlm's or whose
    settings cannot be used."""
    extra = checkpoint.get("rnnlm")
    if not isinstance(extra, dict) or not extra.get("tokenizer") or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path!r} is not an rnnlm checkpoint (it lacks the model settings and tokenizer).")
    if is_classifier_checkpoint(checkpoint):
        raise CheckpointError(
            f"{path!r} is a text classifier's checkpoint (written by rnnlm.classify), not a language model's: "
            "python -m rnnlm.classify predict / evaluate and rnnlm.sharing.classifier.load read it. To start a "
            "classifier from a language model, give the language model's checkpoint."
        )
    try:
        config = config_of_checkpoint(checkpoint)
        check_size(config, path)
        return config
    except ConfigError as err:
        raise CheckpointError(f"The model settings in {path!r} cannot be used: {err}") from None


def load_module_weights(model: torch.nn.Module, checkpoint: dict, path: str) -> None:
    """Fill ``model`` from a checkpoint's LightningModule state (its ``model.`` entries), refusing weights that do
    not fit."""
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"The weights in {path!r} do not fit its model settings: {err}") from None


def data_settings(checkpoint: dict) -> dict:
    """The data module's settings saved in a checkpoint (Lightning's private entries left out)."""
    return {k: v for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")}


