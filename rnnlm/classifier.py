"""A text classifier on the encoder of a recurrent language model (ULMFiT), usable without Lightning.

    ids [B, T]: the separator, then the text's tokens, right-padded
      -> the LM's embedding and recurrent layers (forward; and backward, for a bidirectional LM)
      -> concat pooling of the top layer over the text's tokens: [state at the last token, max, mean] per direction
      -> head: BatchNorm, dropout, linear, ReLU, BatchNorm, dropout, linear -> logits [B, C]

Padding never changes a representation: the padding sits after each text, a forward recurrent layer reads it only
after the text's last token (whose state is taken from its own position), and pooling masks it out. The backward
direction reads each row's tokens reversed *in place* (:func:`reverse_texts`), so its padding comes last too. So a
padded text gets exactly the features it gets alone, with no packing; batches of texts of similar length keep the
padding, i.e. the wasted work, small.

Each text is read from a zero state after the separator token, the document boundary the LM saw between documents
in pretraining. The LM's output layers (decoder, tying projection) are dropped: a classifier never predicts tokens.

    import rnnlm.classifier
    clf = rnnlm.classifier.load("runs/.../checkpoints/best.ckpt")
    clf.predict(["재미있는 영화였어요"])   # [Prediction(label=1, probabilities={0: 0.03, 1: 0.97})]
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from rnnlm.config import RNNLMConfig
from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError, load_safely
from rnnlm.inference import data_settings, load_module_weights
from rnnlm.model import RNNLM
from rnnlm.tokenization import Encoder

TASK = "classification"  # checkpoint["rnnlm"]["task"] of a classifier checkpoint
DROPOUTS = ("dropout_embedding", "dropout_between", "dropout_output", "dropout_words", "weight_drop")
_RNN_PARAMETER = re.compile(r"^(?:rnn|rnn_backward)\.(?:layers\.(\d+)\.\w+|\w+_l(\d+))$")


# ------------------------------------------------------------------------------------------------ batches
class Batch(NamedTuple):
    """Texts ready for the classifier: ``ids`` ``[B, T]`` (separator first, right-padded with the separator),
    ``lengths`` ``[B]`` (tokens read per row, separator included), ``labels`` ``[B]`` (class indices; -1 when
    unknown) and ``index`` ``[B]`` (each row's position in its split or input)."""

    ids: Tensor
    lengths: Tensor
    labels: Tensor
    index: Tensor


def make_batch(texts: Sequence[np.ndarray], separator: int, labels: Sequence[int] | None = None,
               index: Sequence[int] | None = None) -> Batch:
    """Pad token-id arrays (one per text, at least one token each) into a :class:`Batch`."""
    lengths = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    ids = np.full((len(texts), int(lengths.max())), separator, dtype=np.int64)
    for row, tokens in enumerate(texts):
        ids[row, 1 : len(tokens) + 1] = tokens
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(lengths),
        torch.as_tensor(labels if labels is not None else [-1] * len(texts), dtype=torch.int64),
        torch.as_tensor(index if index is not None else range(len(texts)), dtype=torch.int64),
    )


def reverse_texts(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's text (positions 1 .. length-1) reversed in place; the separator at 0 and the padding stay.

    Returns the reversed ids and the gather index that did it; the index is its own inverse, so it also brings the
    backward direction's states back to the tokens' original positions."""
    positions = torch.arange(ids.size(1), device=ids.device)
    last = lengths[:, None]
    index = torch.where((positions >= 1) & (positions < last), last - positions, positions)
    return ids.gather(1, index), index


def text_mask(lengths: Tensor, steps: int) -> Tensor:
    """``[B, T]`` True at the text's tokens (positions 1 .. length-1), False at the separator and the padding."""
    positions = torch.arange(steps, device=lengths.device)
    return (positions >= 1) & (positions < lengths[:, None])


def concat_pool(states: Tensor, lengths: Tensor) -> Tensor:
    """ULMFiT's concat pooling of one direction's states ``[B, T, H]`` over each text's tokens: the state at the last
    token, the maximum and the mean, concatenated: ``[B, 3H]``. Padding and the leading separator are left out."""
    if bool((lengths < 2).any()):
        raise ValueError("concat_pool needs at least one token per text after the separator.")
    rows = torch.arange(states.size(0), device=states.device)
    mask = text_mask(lengths, states.size(1)).unsqueeze(-1)
    last = states[rows, lengths - 1]
    biggest = states.masked_fill(~mask, float("-inf")).amax(dim=1)
    mean = (states * mask).sum(dim=1) / (lengths - 1).unsqueeze(-1).to(states.dtype)
    return torch.cat([last, biggest, mean], dim=-1)


# ------------------------------------------------------------------------------------------------ the model
def scaled_dropouts(config: RNNLMConfig, scale: float) -> RNNLMConfig:
    """``config`` with every dropout multiplied by ``scale`` (fastai's ``drop_mult``)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        raise ConfigError(f"dropout_scale must be a number >= 0, got {scale!r}.")
    return dataclasses.replace(config, **{name: getattr(config, name) * scale for name in DROPOUTS})


class Classifier(nn.Module):
    """An RNNLM's encoder with concat pooling and a classification head (see the module docstring).

    Args:
        config: the encoder's settings (a pretrained LM's, or new ones to train from scratch).
        num_classes: outputs of the head.
        head_hidden: width of the head's hidden layer (ULMFiT: 50); 0 makes the head one linear layer.
        pool_dropout: dropout on the pooled features (ULMFiT: 0.4).
        head_dropout: dropout before the head's last linear layer (ULMFiT: 0.1).
    """

    def __init__(self, config: RNNLMConfig, num_classes: int, head_hidden: int = 50, pool_dropout: float = 0.4,
                 head_dropout: float = 0.1) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"A classifier needs at least 2 classes, got {num_classes!r}.")
        if isinstance(head_hidden, bool) or not isinstance(head_hidden, int) or head_hidden < 0:
            raise ConfigError(f"head_hidden must be an integer >= 0, got {head_hidden!r}.")
        for name, p in (("pool_dropout", pool_dropout), ("head_dropout", head_dropout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ConfigError(f"{name} must be a probability in [0, 1), got {p!r}.")
        self.config = config
        self.num_classes = num_classes
        self.head_settings = {"head_hidden": head_hidden, "pool_dropout": pool_dropout, "head_dropout": head_dropout}
        self.encoder = RNNLM(config)
        for name in ("projection", "decoder", "projection_backward", "decoder_backward"):
            if hasattr(self.encoder, name):
                setattr(self.encoder, name, None)
        width = 3 * config.layer_sizes[-1] * (2 if config.bidirectional else 1)
        layers: list[nn.Module] = [nn.BatchNorm1d(width), nn.Dropout(pool_dropout)]
        if head_hidden:
            layers += [nn.Linear(width, head_hidden), nn.ReLU(), nn.BatchNorm1d(head_hidden), nn.Dropout(head_dropout),
                       nn.Linear(head_hidden, num_classes)]
        else:
            layers.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*layers)

    @property
    def directions(self) -> tuple[str, ...]:
        return ("forward", "backward") if self.config.bidirectional else ("forward",)

    def features(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """The pooled features ``[B, 3H]`` (``[B, 6H]`` for a bidirectional encoder: forward, then backward)."""
        pooled = []
        for direction in self.directions:
            x = ids if direction == "forward" else reverse_texts(ids, lengths)[0]
            states, _ = self.encoder.encode(x, direction=direction)
            pooled.append(concat_pool(states, lengths))
        return torch.cat(pooled, dim=-1)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Logits ``[B, C]`` of texts given as in :class:`Batch`."""
        return self.head(self.features(ids, lengths).float())

    def layer_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """ULMFiT's layer groups, bottom to top: ``embedding``, ``layer1`` .. ``layerN`` (both directions of a layer
        together) and ``head``. A group without parameters (one-hot input has no embedding) is left out."""
        groups: dict[str, list[nn.Parameter]] = {"embedding": []}
        groups.update({f"layer{i + 1}": [] for i in range(self.config.num_layers)})
        groups["head"] = list(self.head.parameters())
        for name, param in self.encoder.named_parameters():
            if name.startswith(("embedding.", "embedding_backward.")):
                groups["embedding"].append(param)
                continue
            match = _RNN_PARAMETER.match(name)
            if match is None:
                raise RuntimeError(f"Parameter {name!r} of the encoder belongs to no layer group.")
            groups[f"layer{int(match.group(1) or match.group(2)) + 1}"].append(param)
        return [(name, params) for name, params in groups.items() if params]


# ------------------------------------------------------------------------------------------------ inference
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
            probabilities = {label: float(p) for label, p in zip(self.labels, row)}
            result.append(Prediction(self.labels[int(row.argmax())], probabilities))
        return result


def encode_texts(encoder: Encoder, texts: Sequence[str], max_length: int) -> tuple[list[np.ndarray], int]:
    """Token ids of each text (no separator), cut to its first ``max_length`` tokens, and how many texts were cut."""
    if not texts:
        return [], 0
    stream = encoder.encode(list(texts)).astype(np.int64)
    ends = np.flatnonzero(stream == encoder.separator)
    if len(ends) != len(texts):  # a tokenizer that can produce the separator from text: one text at a time
        pieces = [np.asarray(encoder.encode_text(t), dtype=np.int64) for t in texts]
    else:
        starts = np.concatenate([[0], ends[:-1] + 1])
        pieces = [stream[a:b] for a, b in zip(starts, ends)]
    cut = sum(len(p) > max_length for p in pieces)
    return [p[:max_length] for p in pieces], cut


def batches_by_length(tokens: Sequence[np.ndarray], batch_size: int, separator: int,
                      labels: Sequence[int] | None = None, world_size: int = 1, rank: int = 0) -> Iterable[Batch]:
    """Non-empty texts in batches of similar length, longest first (for evaluation and prediction); each batch's
    ``index`` says where its rows come from. With ``world_size`` > 1, the texts of process ``rank``: every
    ``world_size``-th by length, so that every process gets a batch as soon as there is a text for each."""
    order = sorted((i for i, t in enumerate(tokens) if len(t)), key=lambda i: -len(tokens[i]))[rank::world_size]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield make_batch([tokens[i] for i in rows], separator,
                         None if labels is None else [labels[i] for i in rows], rows)


def is_classifier_checkpoint(checkpoint: dict) -> bool:
    return isinstance(checkpoint.get("rnnlm"), dict) and checkpoint["rnnlm"].get("task") == TASK


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         revision: str | None = None) -> TrainedClassifier:
    """Load a classifier (weights, tokenizer, labels): a checkpoint written by ``rnnlm.classify``, a folder written
    from one by ``rnnlm.export``, or the Hugging Face Hub model id it was pushed to (``revision``: a branch, tag or
    commit)."""
    from rnnlm.pretrained import locate, read_classifier_folder

    kind, where = locate(path, revision)
    if kind == "folder":
        return read_classifier_folder(where, map_location)
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
        model = Classifier(config, len(hparams["labels"]), hparams.get("head_hidden", 50),
                           hparams.get("pool_dropout", 0.4), hparams.get("head_dropout", 0.1))
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
