"""The exported folder, the layout people share models in, read and written with every file checked:

    model.safetensors   the weights: tensors only, so loading runs no code (tied weights stored once)
    config.json         the model config (RNNLMConfig, with format_version) plus what a loader needs: the
                        tokenizer kind, the data settings, the characters per token of each split
    tokenizer.json      the Hugging Face tokenizer, its separator, unknown and padding tokens marked special
    tokenizer_config.json   which tokens those are, for transformers' AutoTokenizer
    modeling_rnnlm.py   the model for transformers (``trust_remote_code=True``), torch and transformers only: a
                        copy of ``rnnlm/sharing/remote/modeling_rnnlm.py``, named in config.json's ``auto_map``
    README.md           a model card (``rnnlm.sharing.card``)

A text classifier is exported the same way: its config.json adds ``"task": "classification"`` and the head's
settings and labels (``classifier``). :func:`read_values` checks config.json before a weight is used, and refuses
the other kind of model by name; :func:`write_folder` writes a folder so that a reader sees either nothing or all
of it. ``rnnlm.sharing.lm.from_folder`` and ``rnnlm.sharing.classifier.from_folder`` build the models.

Nothing here imports Lightning: ``rnnlm.load`` stays usable without it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer
from torch import Tensor

from rnnlm.errors import ConfigError, UserError
from rnnlm.network.config import FORMAT_VERSION, RNNLMConfig
from rnnlm.sharing.checkpoints import CLASSIFIER, check_size
from rnnlm.text.tokenization import special_tokens, tokenizer_kind, with_special_tokens
from rnnlm.version import __version__

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "README.md"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODELING_FILE = "modeling_rnnlm.py"
# Folders written before transformers could read them lack the last two; rnnlm needs neither.
FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, CARD_FILE, TOKENIZER_CONFIG_FILE, MODELING_FILE)
MODELING_SOURCE = Path(__file__).with_name("remote") / MODELING_FILE
ONNX_FILE = "model.onnx"  # written on request (rnnlm.export --onnx) for serving; no rnnlm loader reads it
MODEL_TYPE = "rnnlm"
# What transformers reads in config.json (rnnlm does not): the classes to load, the special tokens' ids, whether
# the embedding is shared, a classifier's labels.
TRANSFORMERS_KEYS = ("architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
                     "tie_word_embeddings", "id2label", "label2id", "transformers_version")
# config.json holds the RNNLMConfig fields plus these; anything else is refused by name.
EXTRA_KEYS = ("model_type", "rnnlm_version", "tokenizer_kind", "data", "chars_per_token", "task", "classifier",
              *TRANSFORMERS_KEYS)
LANGUAGE_MODEL = "language-model"  # config.json's "task" (absent: a language model)
READERS = {LANGUAGE_MODEL: "rnnlm.load (and rnnlm.generate, evaluate, score, fit --model.init_from)",
           CLASSIFIER: "rnnlm.sharing.classifier.load (and python -m rnnlm.classify predict / evaluate)"}
# Data settings that describe one machine, not the data: left out of an exported config.
LOCAL_DATA_SETTINGS = ("cache_dir", "encode_workers")


def shareable(value):
    """``value`` (a setting, or a dict or list of them) with every absolute local path cut to its base name: an
    exported folder is read on other machines, and the path it was made on says nothing there but tells where the
    author keeps their files (their user name, often). Relative paths and Hub ids are kept as they are."""
    if isinstance(value, dict):
        return {k: shareable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shareable(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return Path(value.rstrip("/\\")).name or value
    return value


class PretrainedError(UserError):
    """A pretrained model (folder, Hub repo) that cannot be found or used."""


# --------------------------------------------------------------------------------------------- config.json
def folder_config(config: RNNLMConfig, tokenizer: Tokenizer, data: dict, chars_per_token: dict,
                  classifier: dict | None = None) -> dict:
    """What config.json holds: the model config with its format version, then what a loader needs (for a
    classifier, ``classifier``: its labels and head settings)."""
    data = shareable({k: v for k, v in data.items() if k not in LOCAL_DATA_SETTINGS})
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
    values.update(transformers_settings(config, tokenizer, classifier))
    return values


def transformers_settings(config: RNNLMConfig, tokenizer: Tokenizer, classifier: dict | None = None) -> dict:
    """What transformers needs in config.json to load the folder with its modelling code (``MODELING_FILE``)."""
    names = special_tokens(tokenizer)
    module = Path(MODELING_FILE).stem
    if classifier is None:
        architecture, auto = "RnnlmForCausalLM", "AutoModelForCausalLM"
        tied = config.tie_weights
    else:
        architecture, auto = "RnnlmForSequenceClassification", "AutoModelForSequenceClassification"
        tied = config.bidirectional and config.share_directions and config.input_mode == "embedding"
    values = {
        "architectures": [architecture],
        "auto_map": {"AutoConfig": f"{module}.RnnlmConfig", auto: f"{module}.{architecture}"},
        **{f"{role}_id": tokenizer.token_to_id(token) for role, token in names.items()},
        "tie_word_embeddings": tied,
    }
    if classifier is not None:
        # transformers keys labels by position and names them with strings.
        labels = [str(label) for label in classifier["labels"]]
        values.update(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    return values


def tokenizer_config(tokenizer: Tokenizer, max_length: int | None = None) -> dict:
    """tokenizer_config.json: the special tokens by name, special tokens spelled out in text read as text (as
    rnnlm's Encoder reads them, so every text gets the ids the model was trained with), padding after the text
    (rnnlm's classifier pads there) and, for a classifier, the tokens it reads per text (the separator
    included)."""
    values = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens(tokenizer),
        "split_special_tokens": True,
        "padding_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
        # rnnlm decodes with the tokenizer's own decoder and nothing after it.
        "clean_up_tokenization_spaces": False,
    }
    if max_length is not None:
        values["model_max_length"] = max_length + 1
    return values


def read_values(folder: Path, task: str | None = LANGUAGE_MODEL) -> dict:
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
    return read_values(Path(folder), task=None).get("task", LANGUAGE_MODEL)


def read_config(folder: str | os.PathLike, task: str | None = LANGUAGE_MODEL) -> RNNLMConfig:
    """The model config of an exported folder (a classifier's: its encoder's), checked."""
    values = read_values(Path(folder), task)
    try:
        config = RNNLMConfig.from_dict({k: v for k, v in values.items() if k not in EXTRA_KEYS})
        check_size(config, str(Path(folder) / CONFIG_FILE))
        return config
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


# --------------------------------------------------------------------------------------------- writing
def write_folder(trained, out: str | os.PathLike, card: str | None = None, overwrite: bool = False,
                 extra=None) -> dict[str, int]:
    """Write ``trained`` (a TrainedModel, or a TrainedClassifier) as an exported folder; return its files and their
    sizes in bytes. ``extra``, when given, is called with the temporary folder to write more files into it (the
    ONNX model), so that they appear together with the others.

    Everything is written into a temporary folder beside ``out`` and renamed to ``out`` at the end, so ``out`` is
    either untouched or complete. An existing non-empty ``out`` is replaced only with ``overwrite``.
    """

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
            model = copy.deepcopy(model).cpu()
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt", "rnnlm_version": __version__})
        classifier = getattr(trained, "classifier_settings", None)  # a TrainedClassifier's labels and head
        config = folder_config(trained.config, trained.tokenizer, trained.data,
                               getattr(trained, "chars_per_token", {}), classifier() if classifier else None)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / TOKENIZER_FILE).write_text(with_special_tokens(trained.tokenizer).to_str(pretty=True),
                                          encoding="utf-8")
        settings = tokenizer_config(trained.tokenizer, classifier().get("max_length") if classifier else None)
        (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(MODELING_SOURCE, tmp / MODELING_FILE)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        if extra is not None:
            extra(tmp)
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
