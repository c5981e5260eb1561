"""Fine-tuning from a pretrained model: its tokenizer and settings read without building it, its weights moved into
a new model (the layouts of a fused and a layer-by-layer stack converted; at word level the rows of the tokens two
vocabularies share mapped), and the set-up the CLI runs for ``--model.init_from``."""

from __future__ import annotations

import re
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch import Tensor

from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError, load_safely
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.sharing.checkpoints import checked_config
from rnnlm.sharing.folders import read_config, read_tokenizer, read_values
from rnnlm.sharing.hub import locate
from rnnlm.sharing.lm import load
from rnnlm.text.tokenization import describe_tokenizer, same_tokenizer, tokenizer_kind


def read_pretrained_tokenizer(spec: str, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a pretrained model, without building the model."""
    kind, path = locate(spec, revision)
    if kind == "folder":
        read_values(path)
        return read_tokenizer(path)
    checkpoint = load_safely(path)
    saved = checkpoint.get("rnnlm", {}).get("tokenizer") if isinstance(checkpoint.get("rnnlm"), dict) else None
    if not saved:
        raise CheckpointError(f"{str(path)!r} is not an rnnlm checkpoint (it lacks the model settings and tokenizer).")
    return Tokenizer.from_str(saved)


def pretrained_summary(spec: str, revision: str | None = None) -> tuple[RNNLMConfig, str]:
    """The model config of a pretrained model and its tokenizer kind, without building the model."""
    kind, path = locate(spec, revision)
    if kind == "folder":
        values = read_values(path)
        config = read_config(path)
        return config, values.get("tokenizer_kind") or tokenizer_kind(read_tokenizer(path))
    checkpoint = load_safely(path)
    config = checked_config(checkpoint, str(path))
    setting = checkpoint.get("datamodule_hyper_parameters", {}).get("tokenizer")
    return config, tokenizer_kind(Tokenizer.from_str(checkpoint["rnnlm"]["tokenizer"]), setting)


def _layer_key(name: str, prefix: str, per_layer: bool) -> str:
    """A recurrent weight's name in the fused layout (``rnn.weight_ih_l1``) or the layer-by-layer one
    (``rnn.layers.1.weight_ih_l0``), whichever ``name`` is in."""
    rest = name[len(prefix):]
    stacked = re.fullmatch(r"layers\.(\d+)\.(\w+)_l0", rest)
    fused = re.fullmatch(r"(\w+)_l(\d+)", rest)
    if per_layer and fused and not stacked:
        return f"{prefix}layers.{fused.group(2)}.{fused.group(1)}_l0"
    if not per_layer and stacked:
        return f"{prefix}{stacked.group(2)}_l{stacked.group(1)}"
    return name


def convert_layout(state: dict[str, Tensor], per_layer: bool) -> dict[str, Tensor]:
    """``state`` with its recurrent weights named as a fused stack (``per_layer=False``) or a layer-by-layer one
    has them: weight drop and locked dropout between layers need the latter, so a model fine-tuned with other
    regularisation than it was trained with may have the other layout."""
    out = {}
    for name, t in state.items():
        for prefix in ("rnn_backward.", "rnn."):
            if name.startswith(prefix):
                name = _layer_key(name, prefix, per_layer)
                break
        out[name] = t
    return out


def architecture_differences(pretrained: RNNLMConfig, ours: RNNLMConfig, vocab: bool = True) -> list[str]:
    """The settings that give the weights their shapes and meaning and differ, as ``name: pretrained X, this run
    Y`` (``vocab=False`` leaves out the vocabulary size)."""
    a, b = pretrained.architecture(), ours.architecture()
    if not vocab:
        a.pop("vocab_size"), b.pop("vocab_size")
    return [f"{k}: pretrained {a[k]!r}, this run {b.get(k)!r}" for k in a if a[k] != b.get(k)]


def _vocab_tensors(config: RNNLMConfig, per_layer: bool) -> dict[str, int]:
    """Names of the tensors indexed by token id, with the dimension that is: embedding and decoder rows, and the
    input weight's columns with one-hot inputs."""
    names: dict[str, int] = {}
    directions = ["", "_backward"] if config.bidirectional else [""]
    for d in directions:
        if config.input_mode == "embedding":
            names[f"embedding{d}.weight"] = 0
        else:
            names[f"rnn{d}.layers.0.weight_ih_l0" if per_layer else f"rnn{d}.weight_ih_l0"] = 1
        names[f"decoder{d}.weight"] = 0
        names[f"decoder{d}.bias"] = 0
    return names


def vocabulary_map(old: Tokenizer, new: Tokenizer) -> list[int]:
    """For each id of ``new``, the id of the same token in ``old`` (-1 for a token ``old`` lacks)."""
    old_vocab = old.get_vocab(with_added_tokens=True)
    new_vocab = new.get_vocab(with_added_tokens=True)
    mapping = [-1] * new.get_vocab_size(with_added_tokens=True)
    for token, i in new_vocab.items():
        mapping[i] = old_vocab.get(token, -1)
    return mapping


@torch.no_grad()
def transfer(source: RNNLM, target: RNNLM, mapping: list[int] | None = None) -> dict:
    """Copy the weights of ``source`` into ``target``.

    The two must have the same architecture (the regularisers may differ; the recurrent weights are renamed when
    that changes the stack's layout). With ``mapping`` (new id -> old id or -1, from :func:`vocabulary_map`) the
    vocabularies may differ: the rows of the tokens both have are copied, and every other token starts at the mean
    of the pretrained rows (ULMFiT's recipe). Returns how many tokens matched.
    """
    differ = architecture_differences(source.config, target.config, vocab=mapping is None)
    if differ:
        raise ConfigError("The pretrained model has another architecture than this run: " + "; ".join(differ) + ".")
    per_layer = target.config.per_layer
    state = convert_layout(source.state_dict(), per_layer)
    report = {"tokens": target.config.vocab_size, "matched": target.config.vocab_size, "new": 0}
    if mapping is not None:
        if target.config.output == "adaptive":
            raise ConfigError(
                "Matching vocabularies is not supported with output='adaptive': its clusters are ranges of ids "
                "sorted by frequency in the pretraining data. Fine-tune with the pretrained tokenizer (init_vocab "
                "same), or use a model with a full softmax."
            )
        if len(mapping) != target.config.vocab_size:
            raise ConfigError(f"The vocabulary map has {len(mapping)} ids, the model {target.config.vocab_size}.")
        index = torch.tensor(mapping, dtype=torch.long)
        known = index >= 0
        for name, dim in _vocab_tensors(target.config, per_layer).items():
            old = state[name]
            rows = old.movedim(dim, 0)
            new = rows.mean(0, keepdim=True).expand(len(mapping), *rows.shape[1:]).clone()
            new[known] = rows[index[known]]
            state[name] = new.movedim(0, dim).contiguous()
        report.update(matched=int(known.sum()), new=int((~known).sum()))
    target.load_state_dict(state, strict=True)
    return report


# --------------------------------------------------------------------------------------------- the CLI's set-up
def tokenizer_source(init_from: str | None, init_vocab: str | None) -> str | None:
    """The pretrained model whose tokenizer reads the data: ``model.init_from``, unless the vocabularies are
    matched (then the data module builds its own)."""
    return init_from if init_vocab != "match" else None


def take_pretrained_settings(config, explicit_model: set[str], explicit_data: set[str]) -> None:
    """Take the model's architecture (and, where this run does not set them, its regularisers) from the pretrained
    model of ``model.init_from`` into the CLI's ``config``, refusing the settings of this run that contradict it, by
    name. ``explicit_model`` / ``explicit_data``: the ``model.config`` and ``data`` settings the user gave."""
    spec, mode = config.model.init_from, config.model.get("init_vocab", "same")
    pretrained, kind = pretrained_summary(spec)
    settings = config.model.config
    architecture = set(pretrained.architecture()) - {"vocab_size"}
    conflicts = []
    for name, value in pretrained.settings().items():
        if name == "vocab_size":
            continue
        ours = settings.get(name)
        if name in explicit_model:
            if name in architecture and _norm(ours) != _norm(value):
                conflicts.append(f"{name}: this run {_norm(ours)!r}, pretrained {_norm(value)!r}")
        else:
            setattr(settings, name, value)
    if conflicts:
        raise ConfigError(
            f"model.init_from {spec}: the pretrained model's architecture is kept, and this run's settings contradict "
            "it: " + "; ".join(conflicts) + ". Remove them from the command line and config file (or give the "
            "pretrained values); the regularisers (dropouts, weight_drop, locked_dropout) may differ."
        )
    config.data.bidirectional = pretrained.bidirectional
    level = config.data.get("tokenizer")
    if mode == "same":
        if "tokenizer" in explicit_data and level != kind and not str(level).endswith(".json"):
            raise ConfigError(
                f"data.tokenizer={level} but the pretrained model {spec} reads {kind} tokens: fine-tuning uses the "
                f"pretrained tokenizer so that the ids match its weights. Remove data.tokenizer (or set it to {kind})"
                + (", or set model.init_vocab=match to map the shared tokens of a new vocabulary."
                   if kind in ("word", "char") else ".")
            )
    else:
        if "tokenizer" not in explicit_data:
            config.data.tokenizer = kind
        elif level != kind:
            raise ConfigError(
                f"model.init_vocab=match maps tokens between vocabularies of the same level: the pretrained model "
                f"{spec} is {kind}-level, data.tokenizer is {level}."
            )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------- the model's start
INIT_VOCAB = ("same", "match")


class PretrainedStart:
    """A language model's start from a pretrained one (``model.init_from``): every weight is copied into ``model``.

    With ``mode="same"`` the pretrained tokenizer reads the data (the CLI sets ``data.init_from``), which
    :meth:`use_tokenizer` checks; with ``mode="match"`` (word or char level) the data has its own vocabulary, and
    the rows of the tokens both share are copied once it is known (ULMFiT's recipe for the others). ``report``
    says what was done (for the run's log and tests).
    """

    def __init__(self, spec: str, mode: str, model: RNNLM) -> None:

        if mode not in INIT_VOCAB:
            raise ConfigError(f"model.init_vocab must be one of {', '.join(INIT_VOCAB)}, got {mode!r}.")
        pretrained = load(spec)
        differ = architecture_differences(pretrained.config, model.config, vocab=mode == "same")
        if differ:
            raise ConfigError(
                f"model.init_from {spec}: the pretrained model has another architecture than this run ("
                + "; ".join(differ) + "). Leave the architecture to the pretrained model (the CLI takes it from there)."
            )
        kind = tokenizer_kind(pretrained.tokenizer, pretrained.data.get("tokenizer"))
        ours = model.config.regularisers()
        changed = [f"{k} {v!r} -> {ours[k]!r}" for k, v in pretrained.config.regularisers().items() if v != ours[k]]
        self.model = model
        self.report = {"from": spec, "mode": mode, "tokenizer": kind, "regularisation": changed}
        self.tokenizer = pretrained.tokenizer
        self._waiting = None  # with mode="match": the pretrained model, until the data's tokenizer is known
        if mode == "match":
            if kind not in ("word", "char"):
                raise ConfigError(
                    f"model.init_vocab=match maps the tokens of word- and char-level vocabularies; {spec} has a "
                    f"{kind} tokenizer, whose pieces cannot be matched to another one's. Fine-tune with its own "
                    "tokenizer (init_vocab same)."
                )
            if model.config.output == "adaptive":
                raise ConfigError(
                    "model.init_vocab=match is not supported with output='adaptive': its clusters are ranges of ids "
                    "sorted by their frequency in the pretraining data. Fine-tune with the pretrained tokenizer "
                    "(init_vocab same)."
                )
            self._waiting = pretrained
            return
        self.report.update(transfer(pretrained.model, model))
        self._announce()

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """The data's tokenizer is known: check it is the pretrained one, or map the rows of a matched vocabulary."""
        if self._waiting is None:
            if not same_tokenizer(tokenizer, self.tokenizer):
                raise ConfigError(
                    f"The data's tokenizer ({describe_tokenizer(tokenizer)}) is not the one of the pretrained model "
                    f"{self.report['from']} ({describe_tokenizer(self.tokenizer)}), so the ids would read the wrong "
                    "rows. Give the data module init_from too (the CLI does), or, at word or char level, use "
                    "init_vocab='match'."
                )
            return
        pretrained, self._waiting = self._waiting, None
        kind = tokenizer_kind(tokenizer)
        if kind != self.report["tokenizer"]:
            raise ConfigError(
                f"model.init_vocab=match: the pretrained model is {self.report['tokenizer']}-level but this run's "
                f"tokenizer is {kind}-level; set data.tokenizer to {self.report['tokenizer']}."
            )
        self.report.update(transfer(pretrained.model, self.model, vocabulary_map(pretrained.tokenizer, tokenizer)))
        self.tokenizer = tokenizer
        self._announce()

    def check_complete(self) -> None:
        """Training starts: a matched vocabulary must have been mapped by now."""
        if self._waiting is not None:
            raise ConfigError(
                "model.init_vocab=match maps the pretrained rows onto the data's vocabulary, so it needs a data "
                "module with a tokenizer (LMDataModule), not plain loaders."
            )

    def _announce(self) -> None:
        r = self.report
        if r["mode"] == "match":
            vocab = (f"{r['matched']:,} of the {r['tokens']:,} tokens of this run's vocabulary are in the pretrained "
                     f"one and start from their pretrained rows; the other {r['new']:,} start at the mean of the "
                     "pretrained rows")
        else:
            vocab = f"the pretrained tokenizer ({r['tokenizer']}, {r['tokens']:,} tokens) is used, so the ids match"
        regularisation = ("; regularisation differs from the pretraining: " + ", ".join(r["regularisation"])
                          if r["regularisation"] else "")
        rank_zero_info(f"rnnlm: initialised from {r['from']}: every weight; {vocab}{regularisation}. The "
                       "optimizer, learning-rate schedule and step count start afresh.")
