"""The text classifier's network: a recurrent language model's encoder, pooled, under a small head (ULMFiT).

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
The twin of :mod:`rnnlm.network.lm`; :mod:`rnnlm.sharing.classifier` loads a trained one.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor, nn

from rnnlm.errors import ConfigError, PretrainedError
from rnnlm.network.config import DROPOUTS, RNNLMConfig
from rnnlm.network.lm import DIRECTIONS, RNNLM
from rnnlm.network.pretrained import CLASSIFIER, Pretrained, config_from_values

# ULMFiT's head: 50 hidden units, dropout 0.4 on the pooled features and 0.1 before the last layer.
HEAD_HIDDEN = 50
POOL_DROPOUT = 0.4
HEAD_DROPOUT = 0.1
_RNN_PARAMETER = re.compile(r"^(?:rnn|rnn_backward)\.(?:layers\.(\d+)\.\w+|\w+_l(\d+))$")


def reverse_texts(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's text (positions 1 .. length-1) reversed in place; the separator at 0 and the padding stay.

    Returns the reversed ids and the gather index that did it; the index is its own inverse, so it also brings the
    backward direction's states back to the tokens' original positions."""
    positions = torch.arange(ids.size(1), device=ids.device)
    last = lengths[:, None]
    index = torch.where((positions >= 1) & (positions < last), last - positions, positions)
    return ids.gather(1, index), index


def text_mask(lengths: Tensor, steps: int, start: int = 0) -> Tensor:
    """``[B, steps]`` True at the text's tokens (positions 1 .. length-1), False at the separator and the padding;
    the positions are ``start ..``, for a piece of a longer batch."""
    positions = torch.arange(start, start + steps, device=lengths.device)
    return (positions >= 1) & (positions < lengths[:, None])


def concat_pool(states: Tensor, lengths: Tensor) -> Tensor:
    """ULMFiT's concat pooling of one direction's states ``[B, T, H]`` over each text's tokens: the state at the last
    token, the maximum and the mean, concatenated: ``[B, 3H]``. Padding and the leading separator are left out."""
    # The check reads the data, which an exporter can neither trace (TorchScript) nor keep (torch.export): an
    # exported classifier trusts its caller's batching instead.
    exporting = torch.jit.is_tracing() or torch.compiler.is_exporting()
    if not exporting and bool((lengths < 2).any()):
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


class Classifier(nn.Module, Pretrained):
    """An RNNLM's encoder with concat pooling and a classification head (see the module docstring).

    ``Classifier.from_pretrained(folder or OWNER/NAME)``, ``save_pretrained(folder)`` and ``push_to_hub(repo)``
    read and write the weights, the encoder's settings and the head's (:mod:`rnnlm.network.pretrained`).

    Args:
        config: the encoder's settings (a pretrained LM's, or new ones to train from scratch).
        num_classes: outputs of the head.
        head_hidden: width of the head's hidden layer (ULMFiT: 50); 0 makes the head one linear layer.
        pool_dropout: dropout on the pooled features (ULMFiT: 0.4).
        head_dropout: dropout before the head's last linear layer (ULMFiT: 0.1).
    """

    def __init__(self, config: RNNLMConfig, num_classes: int, head_hidden: int = HEAD_HIDDEN,
                 pool_dropout: float = POOL_DROPOUT, head_dropout: float = HEAD_DROPOUT) -> None:
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

    task = CLASSIFIER

    def _folder_values(self) -> dict:
        # The labels themselves and the tokens read per text belong to the trained classifier (the sharing layer
        # writes them on export); the network knows how many classes it has.
        head = {"num_classes": self.num_classes, **self.head_settings}
        return {**self._base_values(), "task": CLASSIFIER, "classifier": head}

    @classmethod
    def _from_values(cls, values: dict, where: str) -> Classifier:
        config = config_from_values(values, where)
        head = values.get("classifier")
        try:
            # An exported folder names its labels; a folder save_pretrained wrote counts them.
            count = len(head["labels"]) if "labels" in head else head["num_classes"]
            return cls(config, count, head["head_hidden"], head["pool_dropout"], head["head_dropout"])
        except (TypeError, KeyError, ConfigError) as err:
            raise PretrainedError(f"The classifier settings in {where} cannot be used ({err!r}): it needs "
                                  "'classifier' with labels (or num_classes), head_hidden, pool_dropout and "
                                  "head_dropout.") from None

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS if self.config.bidirectional else DIRECTIONS[:1]

    def features(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """The pooled features ``[B, 3H]`` (``[B, 6H]`` for a bidirectional encoder: forward, then backward)."""
        pooled = []
        for direction in self.directions:
            x = ids if direction == "forward" else reverse_texts(ids, lengths)[0]
            states, _ = self.encoder.encode(x, direction=direction)
            pooled.append(concat_pool(states, lengths))
        return torch.cat(pooled, dim=-1)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Logits ``[B, C]`` of texts given as in :class:`rnnlm.data.classifier.Batch`."""
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
