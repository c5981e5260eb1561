"""Trained models outside the trainer: the exported folder, the Hugging Face Hub, and pretrained weights moved into
a new model for fine-tuning.

An exported folder is what people share language models as::

    model.safetensors   the weights: tensors only, so loading runs no code (tied weights stored once)
    config.json         the model config (RNNLMConfig, with format_version) plus what a loader needs: the
                        tokenizer kind, the data settings, the characters per token of each split
    tokenizer.json      the Hugging Face tokenizer, as is
    README.md           a model card (written by ``rnnlm.export``)

A text classifier (``rnnlm.classify``) is exported the same way: its config.json adds ``"task": "classification"``
and the head's settings and labels (``classifier``); :func:`read_classifier_folder` reads it, and each reader
refuses the other's folder by name.

:func:`locate` turns what the user gave (a ``.ckpt``, a folder, or a Hub repo id ``OWNER/NAME``, downloaded and
cached by ``huggingface_hub``) into a local path; :func:`read_folder` checks a folder against its config before a
weight is used; :func:`write_folder` writes one so that a reader sees either nothing or all of it.
:func:`transfer` copies pretrained weights into a model (the layouts of a fused and a layer-by-layer stack are
converted), at word level mapping the rows of the tokens two vocabularies share.

Nothing here imports Lightning: ``rnnlm.load`` stays usable without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from rnnlm import __version__
from rnnlm.config import FORMAT_VERSION, RNNLMConfig
from rnnlm.errors import ConfigError, UserError
from rnnlm.files import CheckpointError, load_safely
from rnnlm.model import RNNLM
from rnnlm.tokenization import LEVELS, _is_byte_level, _is_char_level

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "README.md"
FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, CARD_FILE)
MODEL_TYPE = "rnnlm"
# config.json holds the RNNLMConfig fields plus these; anything else is refused by name.
EXTRA_KEYS = ("model_type", "rnnlm_version", "tokenizer_kind", "data", "chars_per_token", "task", "classifier")
LANGUAGE_MODEL = "language-model"  # config.json's "task" (absent: a language model)
CLASSIFIER = "classification"  # the same word as a classifier checkpoint's checkpoint["rnnlm"]["task"]
READERS = {LANGUAGE_MODEL: "rnnlm.load (and rnnlm.generate, evaluate, score, fit --model.init_from)",
           CLASSIFIER: "rnnlm.classifier.load (and python -m rnnlm.classify predict / evaluate)"}
# Data settings that describe one machine, not the data: left out of an exported config.
LOCAL_DATA_SETTINGS = ("cache_dir", "encode_workers")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PretrainedError(UserError):
    """A pretrained model (folder, Hub repo) that cannot be found or used."""


# --------------------------------------------------------------------------------------------- where it is
def looks_like_repo_id(spec: str) -> bool:
    """``OWNER/NAME`` as the Hub spells it (and no local path that exists)."""
    return bool(_REPO_ID.match(spec)) and not spec.endswith((".ckpt", ".json", ".safetensors")) and ".." not in spec


def locate(spec: str | os.PathLike, revision: str | None = None) -> tuple[str, Path]:
    """``("checkpoint", file)`` or ``("folder", folder)`` for a ``.ckpt``, an exported folder (or a file in one) or
    a Hub repo id, which is downloaded into (or read from) the Hugging Face cache."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        if path.name in FILES or path.suffix == ".safetensors":
            return "folder", path.parent  # a file of an exported folder: the folder is meant
        return "checkpoint", path
    if looks_like_repo_id(text) and not text.startswith(("./", "~")):
        return "folder", download(text, revision)
    raise PretrainedError(
        f"{text!r} does not exist: give a checkpoint (.ckpt) written by rnnlm.fit, a folder written by "
        "rnnlm.export, or a Hugging Face Hub model id (OWNER/NAME)."
    )


def download(repo_id: str, revision: str | None = None) -> Path:
    """The files of an exported model on the Hub, downloaded and cached by ``huggingface_hub`` (a cached copy is
    used when there is no network or ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local = f"(there is no local file or folder named {repo_id!r} either)"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(FILES),
                                   library_name="rnnlm", library_version=__version__)
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached (no network?)")
        raise PretrainedError(
            f"Cannot load the Hub model {repo_id!r}: {why} and it is not in the Hugging Face cache "
            f"({_hub_cache()}) {local}. Download it where there is network, e.g. `hf download {repo_id} "
            f"--local-dir {repo_id.split('/')[-1]}`, copy the folder here and give its path instead "
            f"(rnnlm.load('{repo_id.split('/')[-1]}'), --checkpoint {repo_id.split('/')[-1]})."
        ) from None
    except RevisionNotFoundError:
        raise PretrainedError(f"The Hub model {repo_id!r} has no revision {revision!r}.") from None
    except GatedRepoError:
        raise PretrainedError(
            f"The Hub model {repo_id!r} is gated: accept its conditions on its page, then log in (`hf auth login` "
            "or HF_TOKEN)."
        ) from None
    except RepositoryNotFoundError:
        raise PretrainedError(
            f"No model {repo_id!r} on the Hugging Face Hub {local}; if it is private, log in first (`hf auth login` "
            "or HF_TOKEN)."
        ) from None
    except HFValidationError as err:
        raise PretrainedError(f"{repo_id!r} is neither a local path nor a valid Hub model id ({err}).") from None
    return Path(folder)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# --------------------------------------------------------------------------------------------- tokenizer kind
def tokenizer_kind(tokenizer: Tokenizer, setting: str | None = None) -> str:
    """``char``, ``byte``, ``word``, ``bpe``, ``unigram`` or ``wordpiece``: the data setting when it names a level,
    otherwise read from the tokenizer's structure."""
    if setting in LEVELS:
        return setting  # type: ignore[return-value]
    spec = json.loads(tokenizer.to_str())
    if _is_char_level(spec):
        return "char"
    if _is_byte_level(spec):
        return "byte"
    kind = spec.get("model", {}).get("type", "unknown")
    return {"WordLevel": "word", "BPE": "bpe", "Unigram": "unigram", "WordPiece": "wordpiece"}.get(kind, kind.lower())


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give the same ids for the same text."""
    if a.get_vocab(with_added_tokens=True) != b.get_vocab(with_added_tokens=True):
        return False
    sa, sb = json.loads(a.to_str()), json.loads(b.to_str())
    return all(sa.get(k) == sb.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens"))


def describe_tokenizer(tokenizer: Tokenizer, setting: str | None = None) -> str:
    return f"{tokenizer_kind(tokenizer, setting)}, {tokenizer.get_vocab_size(with_added_tokens=True):,} tokens"


# --------------------------------------------------------------------------------------------- config.json
def folder_config(config: RNNLMConfig, tokenizer: Tokenizer, data: dict, chars_per_token: dict,
                  classifier: dict | None = None) -> dict:
    """What config.json holds: the model config with its format version, then what a loader needs (for a
    classifier, ``classifier``: its labels and head settings)."""
    data = {k: v for k, v in data.items() if k not in LOCAL_DATA_SETTINGS}
    values = {
        "model_type": MODEL_TYPE,
        **config.to_dict(),
        "rnnlm_version": __version__,
        "tokenizer_kind": tokenizer_kind(tokenizer, data.get("tokenizer")),
        "data": data,
        "chars_per_token": dict(chars_per_token),
    }
    if classifier is not None:
        values.update(task=CLASSIFIER, classifier=dict(classifier))
    return values


def _read_config(folder: Path, task: str | None = LANGUAGE_MODEL) -> dict:
    """config.json of ``folder``, checked; ``task``: the kind of model the caller reads (None: either)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise PretrainedError(
            f"{folder} is not an rnnlm model folder: it has no {CONFIG_FILE} (it holds "
            f"{', '.join(present) if present else 'nothing'}). A folder written by `python -m rnnlm.export` holds "
            f"{', '.join(FILES)}; a training checkpoint is a .ckpt file."
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainedError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(values, dict):
        raise PretrainedError(f"{path} must hold a JSON object of settings, not {type(values).__name__}.")
    if values.get("model_type") != MODEL_TYPE:
        raise PretrainedError(
            f"{path} describes a model of type {values.get('model_type')!r}, not an rnnlm one (model_type "
            f"{MODEL_TYPE!r}): it was written by another library."
        )
    version = values.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise PretrainedError(
            f"{path} has format version {version!r}, newer than this rnnlm reads ({FORMAT_VERSION}; the folder was "
            f"written by rnnlm {values.get('rnnlm_version', 'of a later version')}): upgrade rnnlm "
            "(pip install -U rnnlm) to load it."
        )
    names = {f for f in RNNLMConfig.__dataclass_fields__}
    unknown = sorted(set(values) - names - set(EXTRA_KEYS))
    if unknown:
        raise PretrainedError(
            f"{path} has unknown setting(s) {', '.join(unknown)}: it does not match this rnnlm's format "
            f"{FORMAT_VERSION} (the settings are the model's, {', '.join(sorted(names))}, and "
            f"{', '.join(EXTRA_KEYS)})."
        )
    found = values.get("task", LANGUAGE_MODEL)
    if found not in READERS:
        raise PretrainedError(f"{path} has task {found!r}; this rnnlm knows {', '.join(map(repr, READERS))}.")
    if task is not None and found != task:
        what = {LANGUAGE_MODEL: "a language model", CLASSIFIER: "a text classifier"}
        raise PretrainedError(f"{folder} holds {what[found]}, not {what[task]}: {READERS[found]} reads it.")
    return values


def folder_task(folder: str | os.PathLike) -> str:
    """What an exported folder holds: ``LANGUAGE_MODEL`` or ``CLASSIFIER`` (its config.json checked)."""
    return _read_config(Path(folder), task=None).get("task", LANGUAGE_MODEL)


def read_config(folder: str | os.PathLike, task: str | None = LANGUAGE_MODEL) -> RNNLMConfig:
    """The model config of an exported folder (a classifier's: its encoder's), checked."""
    values = _read_config(Path(folder), task)
    try:
        return RNNLMConfig.from_dict({k: v for k, v in values.items() if k not in EXTRA_KEYS})
    except ConfigError as err:
        raise PretrainedError(f"The model settings in {Path(folder) / CONFIG_FILE} cannot be used: {err}") from None


def read_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise PretrainedError(f"{Path(folder)} has no {TOKENIZER_FILE}: the model cannot read or write text "
                              "without it.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exceptions for a bad file
        raise PretrainedError(f"{path} is not a valid tokenizer file ({err}).") from None


# --------------------------------------------------------------------------------------------- weights
def _sniff_tensor_file(path: Path) -> None:
    """Refuse anything but a safetensors file before a byte of it is interpreted: a pickle or a torch.save archive
    named model.safetensors could run code in a loader that falls back to pickle."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (length,) = struct.unpack("<Q", head[:8])  # a safetensors file: the header's length, then its JSON
        if head[8:9] == b"{" and 0 < length <= path.stat().st_size - 8:
            return
    if head[:4] == b"PK\x03\x04":
        what = "a zip archive, as torch.save writes (a pickle inside)"
    elif head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        what = "a Python pickle"
    elif len(head) < 9:
        what = f"only {len(head)} bytes long"
    else:
        what = f"not a safetensors file (it begins with {head!r})"
    raise PretrainedError(
        f"Refused {path}: it is {what}. rnnlm reads weights only from safetensors files, which hold tensors and "
        "nothing that can run code; re-export the model from its checkpoint with `python -m rnnlm.export`."
    )


def _shared_groups(state: dict[str, Tensor]) -> list[set[str]]:
    """Names of the state dict that share storage (tied weights, directions sharing their embedding)."""
    by_storage: dict[tuple, set[str]] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        by_storage.setdefault(key, set()).add(name)
    return [names for names in by_storage.values() if len(names) > 1]


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Fill ``model`` from the safetensors file ``path``, refusing (with names and shapes) missing, unexpected or
    mis-shaped tensors before a weight is touched."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    if not path.is_file():
        other = [p.name for p in path.parent.glob("*.bin")] + [p.name for p in path.parent.glob("*.pt*")]
        hint = (f" ({', '.join(other)} is not read: pickle files can run code when loaded)" if other else "")
        raise PretrainedError(f"{path.parent} has no {MODEL_FILE}: the weights are missing{hint}.")
    _sniff_tensor_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise PretrainedError(f"{path} cannot be read: it is truncated or corrupt ({err}).") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    groups = _shared_groups(model.state_dict())
    alias = {name: group for group in groups for name in group}
    missing = sorted(k for k in expected if k not in shapes and not (alias.get(k, set()) & shapes.keys()))
    unexpected = sorted(k for k in shapes if k not in expected)
    wrong = [f"{k} {list(shapes[k])} (the config needs {list(expected[k])})"
             for k in sorted(shapes) if k in expected and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("tensors of the wrong shape: " + "; ".join(_first(wrong)))
        if missing:
            parts.append("missing tensors: " + ", ".join(_first(missing)))
        if unexpected:
            parts.append("tensors the config has no place for: " + ", ".join(_first(unexpected)))
        raise PretrainedError(
            f"The weights in {path} do not fit the model that {path.parent / CONFIG_FILE} describes ("
            + "; ".join(parts) + "). The files come from different models, or config.json was edited; re-export "
            "the model from its checkpoint."
        )
    try:
        load_model(model, str(path), strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise PretrainedError(f"The weights in {path} cannot be loaded: {err}") from None


def _first(items: list[str], n: int = 6) -> list[str]:
    return items if len(items) <= n else [*items[:n], f"... ({len(items) - n} more)"]


def read_folder(folder: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """The :class:`~rnnlm.inference.TrainedModel` of an exported folder, every file checked against config.json."""
    from rnnlm.inference import TrainedModel

    folder = Path(folder)
    values = _read_config(folder)
    config = read_config(folder)
    tokenizer = read_tokenizer(folder)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != config.vocab_size:
        raise PretrainedError(
            f"{folder / TOKENIZER_FILE} has {size:,} tokens but {CONFIG_FILE} says vocab_size {config.vocab_size:,}: "
            "the files come from different models."
        )
    model = RNNLM(config)
    load_weights(model, folder / MODEL_FILE)
    data, chars = values.get("data") or {}, values.get("chars_per_token") or {}
    if not isinstance(data, dict) or not isinstance(chars, dict):
        raise PretrainedError(f"{folder / CONFIG_FILE}: 'data' and 'chars_per_token' must be JSON objects.")
    return TrainedModel(model=model.to(map_location).eval(), tokenizer=tokenizer, data=dict(data),
                        chars_per_token=dict(chars))


def read_classifier_folder(folder: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """The :class:`~rnnlm.classifier.TrainedClassifier` of a folder exported from a classifier checkpoint."""
    from rnnlm.classifier import Classifier, TrainedClassifier

    folder = Path(folder)
    values = _read_config(folder, CLASSIFIER)
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


def read_pretrained_tokenizer(spec: str, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a pretrained model, without building the model."""
    kind, path = locate(spec, revision)
    if kind == "folder":
        _read_config(path)
        return read_tokenizer(path)
    checkpoint = load_safely(path)
    saved = checkpoint.get("rnnlm", {}).get("tokenizer") if isinstance(checkpoint.get("rnnlm"), dict) else None
    if not saved:
        raise CheckpointError(f"{str(path)!r} is not an rnnlm checkpoint (it lacks the model settings and tokenizer).")
    return Tokenizer.from_str(saved)


def pretrained_summary(spec: str, revision: str | None = None) -> tuple[RNNLMConfig, str]:
    """The model config of a pretrained model and its tokenizer kind, without building the model."""
    from rnnlm.inference import checked_config

    kind, path = locate(spec, revision)
    if kind == "folder":
        values = _read_config(path)
        config = read_config(path)
        return config, values.get("tokenizer_kind") or tokenizer_kind(read_tokenizer(path))
    checkpoint = load_safely(path)
    config = checked_config(checkpoint, str(path))
    setting = checkpoint.get("datamodule_hyper_parameters", {}).get("tokenizer")
    return config, tokenizer_kind(Tokenizer.from_str(checkpoint["rnnlm"]["tokenizer"]), setting)


# --------------------------------------------------------------------------------------------- writing
def write_folder(trained, out: str | os.PathLike, card: str | None = None, overwrite: bool = False) -> dict[str, int]:
    """Write ``trained`` (a TrainedModel, or a TrainedClassifier) as an exported folder; return its files and their
    sizes in bytes.

    Everything is written into a temporary folder beside ``out`` and renamed to ``out`` at the end, so ``out`` is
    either untouched or complete. An existing non-empty ``out`` is replaced only with ``overwrite``.
    """
    from safetensors.torch import save_model

    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise PretrainedError(f"{out} exists and is not a folder: choose another --out.")
        if any(out.iterdir()) and not overwrite:
            raise PretrainedError(f"{out} exists and is not empty: choose another --out, or pass --overwrite.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model = trained.model
        if any(p.device.type != "cpu" for p in model.parameters()):
            import copy

            model = copy.deepcopy(model).cpu()
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt", "rnnlm_version": __version__})
        classifier = getattr(trained, "classifier_settings", None)  # a TrainedClassifier's labels and head
        config = folder_config(trained.config, trained.tokenizer, trained.data,
                               getattr(trained, "chars_per_token", {}), classifier() if classifier else None)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / TOKENIZER_FILE).write_text(trained.tokenizer.to_str(pretty=True), encoding="utf-8")
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)  # safetensors writes its file private; the others are as usual
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sizes


# --------------------------------------------------------------------------------------------- fine-tuning
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
