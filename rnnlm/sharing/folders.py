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
from pathlib import Path

from tokenizers import Tokenizer

from rnnlm.errors import ConfigError, PretrainedError
from rnnlm.files import atomic_folder
from rnnlm.network.config import FORMAT_VERSION, MODEL_TYPE, RNNLMConfig, check_size
from rnnlm.network.pretrained import (
    CARD_FILE,
    CLASSIFIER,
    CONFIG_FILE,
    LANGUAGE_MODEL,
    MODEL_FILE,
    save_weights,
)
from rnnlm.text.tokenization import special_tokens, tokenizer_kind, with_special_tokens
from rnnlm.version import __version__

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODELING_FILE = "modeling_rnnlm.py"
# Folders written before transformers could read them lack the last two; rnnlm needs neither.
FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, CARD_FILE, TOKENIZER_CONFIG_FILE, MODELING_FILE)
MODELING_SOURCE = Path(__file__).with_name("remote") / MODELING_FILE
ONNX_FILE = "model.onnx"  # written on request (rnnlm.export --onnx) for serving; no rnnlm loader reads it
# What transformers reads in config.json (rnnlm does not): the classes to load, the special tokens' ids, whether
# the embedding is shared, a classifier's labels.
TRANSFORMERS_KEYS = ("architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
                     "tie_word_embeddings", "id2label", "label2id", "transformers_version")
# config.json holds the RNNLMConfig fields plus these; anything else is refused by name.
EXTRA_KEYS = ("model_type", "rnnlm_version", "tokenizer_kind", "data", "chars_per_token", "task", "classifier",
              *TRANSFORMERS_KEYS)
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
    with atomic_folder(out) as tmp:
        model = trained.model
        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).cpu()
        save_weights(model, tmp / MODEL_FILE)
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
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    return sizes
