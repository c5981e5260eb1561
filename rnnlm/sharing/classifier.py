"""A trained text classifier outside the trainer: load it (checkpoint, exported folder or Hub id) and predict.

    from rnnlm.sharing.classifier import load
    clf = load("runs/.../checkpoints/best.ckpt")
    clf.predict(["재미있는 영화였어요"])   # [Prediction(label=1, probabilities={0: 0.03, 1: 0.97})]

The twin of :mod:`rnnlm.sharing.lm`. Nothing here imports Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError, load_safely
from rnnlm.network.classifier import HEAD_DROPOUT, HEAD_HIDDEN, POOL_DROPOUT, Classifier
from rnnlm.network.config import RNNLMConfig, check_size
from rnnlm.network.pretrained import load_weights
from rnnlm.sharing.checkpoints import data_settings, is_classifier_checkpoint, load_module_weights
from rnnlm.sharing.folders import (
    CLASSIFIER,
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    PretrainedError,
    read_config,
    read_tokenizer,
    read_values,
)
from rnnlm.sharing.hub import locate
from rnnlm.text.batching import batches_by_length, encode_texts
from rnnlm.text.tokenization import Encoder


class Prediction(NamedTuple):
    """The most likely label and every label's probability."""

    label: int | str
    probabilities: dict


@dataclass
class TrainedClassifier:
    """A trained classifier with what it needs to read text: its tokenizer and its labels (class i = ``labels[i]``).

    ``data`` holds the data settings it was trained with; ``max_length`` is the tokens read per text.
    """

    model: Classifier
    tokenizer: Tokenizer
    labels: list
    max_length: int
    data: dict

    def __post_init__(self) -> None:
        self.encoder = Encoder(self.tokenizer)

    @property
    def config(self) -> RNNLMConfig:
        """The encoder's settings."""
        return self.model.config

    def classifier_settings(self) -> dict:
        """What an exported folder's config.json keeps beside the encoder's settings to rebuild this classifier."""
        return {"labels": list(self.labels), "max_length": self.max_length, **self.model.head_settings}

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's token ids, cut to ``max_length``."""
        return encode_texts(self.encoder, texts, self.max_length)[0]

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``[N, C]`` (float64) of ``texts``; an empty text gets a row of NaN."""
        device = next(self.model.parameters()).device
        self.model.eval()
        tokens = self.tokenize(texts)
        out = np.full((len(texts), len(self.labels)), np.nan)
        for batch in batches_by_length(tokens, batch_size, self.encoder.separator):
            logits = self.model(batch.ids.to(device), batch.lengths.to(device))
            out[batch.index.numpy()] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[Prediction | None]:
        """The prediction for each text (None for an empty one)."""
        result = []
        for row in self.probabilities(texts, batch_size):
            if np.isnan(row).any():
                result.append(None)
                continue
            probabilities = {label: float(p) for label, p in zip(self.labels, row, strict=True)}
            result.append(Prediction(self.labels[int(row.argmax())], probabilities))
        return result


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         revision: str | None = None) -> TrainedClassifier:
    """Load a classifier (weights, tokenizer, labels): a checkpoint written by ``rnnlm.classify``, a folder written
    from one by ``rnnlm.export``, or the Hugging Face Hub model id it was pushed to (``revision``: a branch, tag or
    commit)."""
    kind, where = locate(path, revision)
    if kind == "folder":
        return from_folder(where, map_location)
    path = str(where)
    checkpoint = load_safely(path, map_location)
    if not is_classifier_checkpoint(checkpoint):
        raise CheckpointError(
            f"{path!r} is not a classifier checkpoint of rnnlm.classify"
            + (" (it is a language model: rnnlm.load reads it)" if isinstance(checkpoint.get("rnnlm"), dict) else "")
            + "."
        )
    return from_checkpoint(checkpoint, path, map_location)


def from_checkpoint(checkpoint: dict, path: str, map_location: str | torch.device = "cpu") -> TrainedClassifier:
    """A :class:`TrainedClassifier` from a classifier checkpoint already read."""
    hparams = checkpoint.get("hyper_parameters", {})
    try:
        config = RNNLMConfig.from_dict(dict(hparams["config"]))
        check_size(config, path)
        model = Classifier(config, len(hparams["labels"]), hparams.get("head_hidden", HEAD_HIDDEN),
                           hparams.get("pool_dropout", POOL_DROPOUT), hparams.get("head_dropout", HEAD_DROPOUT))
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"The classifier settings in {path!r} cannot be used: {err}") from None
    load_module_weights(model, checkpoint, path)
    return TrainedClassifier(
        model=model.to(map_location).eval(),
        tokenizer=Tokenizer.from_str(checkpoint["rnnlm"]["tokenizer"]),
        labels=list(hparams["labels"]),
        max_length=int(checkpoint["rnnlm"]["max_length"]),
        data=data_settings(checkpoint),
    )


def from_folder(folder: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """The :class:`~rnnlm.network.classifier.TrainedClassifier` of a folder exported from a classifier checkpoint."""
    folder = Path(folder)
    values = read_values(folder, CLASSIFIER)
    config = read_config(folder, CLASSIFIER)
    head = values.get("classifier")
    try:
        labels, max_length = list(head["labels"]), int(head["max_length"])
        model = Classifier(config, len(labels), head["head_hidden"], head["pool_dropout"], head["head_dropout"])
    except (TypeError, KeyError, ValueError, ConfigError) as err:
        raise PretrainedError(f"The classifier settings in {folder / CONFIG_FILE} cannot be used ({err!r}): it "
                              "needs 'classifier' with labels, max_length, head_hidden, pool_dropout and "
                              "head_dropout; re-export the classifier from its checkpoint.") from None
    tokenizer = read_tokenizer(folder)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise PretrainedError(f"{folder / TOKENIZER_FILE} has {size:,} tokens but the encoder in {CONFIG_FILE} "
                              f"reads only {config.vocab_size:,}: the files come from different models.")
    load_weights(model, folder / MODEL_FILE)
    data = values.get("data") or {}
    if not isinstance(data, dict):
        raise PretrainedError(f"{folder / CONFIG_FILE}: 'data' must be a JSON object.")
    return TrainedClassifier(model=model.to(map_location).eval(), tokenizer=tokenizer, labels=labels,
                             max_length=max_length, data=dict(data))
