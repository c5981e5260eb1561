"""``from_pretrained``, ``save_pretrained`` and ``push_to_hub`` on the networks themselves (huggingface_hub's
``ModelHubMixin``), reading and writing the network's part of the folder ``python -m rnnlm.export`` writes:

    model.safetensors   the weights (safetensors only: loading runs no code; tied weights stored once)
    config.json         ``model_type``, the :class:`~rnnlm.network.config.RNNLMConfig` fields, and for a classifier
                        its ``task`` and head settings (``classifier``)

An exported folder holds more (the tokenizer, the data settings, a card): the sharing layer owns those keys and
files, and ``from_pretrained`` passes over them. A folder ``save_pretrained`` writes is read back by
``from_pretrained``; ``rnnlm.load`` reads its config.json too, and asks for the tokenizer a network does not have.

Not ``PyTorchModelHubMixin``: it loads with ``strict=False`` by default, prints to stdout, falls back to pickled
``pytorch_model.bin`` files, and writes config.json from ``__init__``'s arguments, not in the exported layout.
The loading checks here (:func:`load_weights`) are the ones every rnnlm loader uses.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import ModelHubMixin
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor

from rnnlm.errors import ConfigError, PretrainedError
from rnnlm.files import atomic_folder
from rnnlm.network.config import MODEL_TYPE, RNNLMConfig, check_size
from rnnlm.version import __version__

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
LANGUAGE_MODEL = "language-model"  # config.json's "task" (absent: a language model)
CLASSIFIER = "classification"
# What each task is called in messages, and which class's from_pretrained reads it.
TASKS = {LANGUAGE_MODEL: ("a language model", "RNNLM.from_pretrained"),
         CLASSIFIER: ("a text classifier", "Classifier.from_pretrained (rnnlm.network.classifier)")}
_CARD = """---
{{ card_data }}
---

An rnnlm network saved with `save_pretrained`: its weights and model settings. Load it with
`RNNLM.from_pretrained` (or `Classifier.from_pretrained` for a classifier). It has no tokenizer: a folder written by
`python -m rnnlm.export` has one, and `rnnlm.load` reads that.
"""


# --------------------------------------------------------------------------------------------- weights
def sniff_tensor_file(path: Path) -> None:
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


def shared_groups(state: dict[str, Tensor]) -> list[set[str]]:
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
    sniff_tensor_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise PretrainedError(f"{path} cannot be read: it is truncated or corrupt ({err}).") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    groups = shared_groups(model.state_dict())
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




def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write ``model``'s weights (on the CPU) as the safetensors file ``path``; tensors that share storage (tied
    weights) are stored once, and :func:`load_weights` ties them again."""
    save_model(model, str(path), metadata={"format": "pt", "rnnlm_version": __version__})


# --------------------------------------------------------------------------------------------- the mixin
def _hub_file(repo_id: str, filename: str, **download) -> Path:
    """``filename`` of the Hub model ``repo_id``, downloaded into (or read from) the Hugging Face cache; every way
    that fails is said in words, with what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename, library_name="rnnlm", library_version=__version__, **download))
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its parent: here the cache is what lacks the file
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached (no network?)"
        raise PretrainedError(
            f"Cannot load {filename} of the Hub model {repo_id!r}: {why} and it is not in the Hugging Face cache (and "
            f"there is no local folder {repo_id!r}). Download it where there is network (`hf download {repo_id} "
            f"--local-dir {repo_id.split('/')[-1]}`), copy the folder here and give its path instead."
        ) from None
    except RevisionNotFoundError:
        raise PretrainedError(f"The Hub model {repo_id!r} has no revision {download.get('revision')!r}.") from None
    except GatedRepoError:
        raise PretrainedError(f"The Hub model {repo_id!r} is gated: accept its conditions on its page, then log in "
                              "(`hf auth login` or HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise PretrainedError(f"No model {repo_id!r} on the Hugging Face Hub, and no local folder of that name; if it "
                              "is private, log in first (`hf auth login` or HF_TOKEN).") from None
    except EntryNotFoundError:
        raise PretrainedError(f"The Hub model {repo_id!r} has no {filename}: it was not written by rnnlm's "
                              "save_pretrained or export (rnnlm reads no pickled weights).") from None
    except HFValidationError:
        raise PretrainedError(f"{repo_id!r} is neither a local folder nor a Hub model id (OWNER/NAME).") from None


def read_folder_config(path: Path, task: str) -> dict:
    """The checked config.json at ``path`` of a model of kind ``task`` (the other kind is refused by name)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainedError(f"{path} cannot be read as JSON ({err}).") from None
    if not isinstance(values, dict):
        raise PretrainedError(f"{path} must hold a JSON object of settings, not {type(values).__name__}.")
    if values.get("model_type") != MODEL_TYPE:
        raise PretrainedError(f"{path} describes a model of type {values.get('model_type')!r}, not an rnnlm one "
                              f"(model_type {MODEL_TYPE!r}): it was written by another library.")
    found = values.get("task", LANGUAGE_MODEL)
    if found not in TASKS:
        raise PretrainedError(f"{path} has task {found!r}; this rnnlm knows {', '.join(map(repr, TASKS))}.")
    if found != task:
        raise PretrainedError(f"{path.parent} holds {TASKS[found][0]}, not {TASKS[task][0]}: "
                              f"{TASKS[found][1]} reads it.")
    return values


def config_from_values(values: dict, where: str) -> RNNLMConfig:
    """The model settings among config.json's ``values``: the RNNLMConfig fields; the other keys belong to the
    sharing layer (tokenizer, data, transformers) and are not the network's to judge."""
    fields = RNNLMConfig.__dataclass_fields__
    try:
        config = RNNLMConfig.from_dict({k: v for k, v in values.items() if k in fields})
        check_size(config, where)
    except (ConfigError, TypeError) as err:
        raise PretrainedError(f"The model settings in {where} cannot be used: {err}") from None
    return config


class Pretrained(ModelHubMixin, library_name="rnnlm", tags=["rnnlm", "recurrent-neural-network"],
                 model_card_template=_CARD):
    """``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` for a network (an ``nn.Module`` listing this class
    after it). A subclass says which ``task`` it is and gives :meth:`_folder_values` (its config.json) and
    :meth:`_from_values` (itself, built from a checked config.json)."""

    task: ClassVar[str]

    def _folder_values(self) -> dict:
        raise NotImplementedError

    @classmethod
    def _from_values(cls, values: dict, where: str):
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False,
                        config: Any = None, repo_id: str | None = None, push_to_hub: bool = False,
                        model_card_kwargs: dict | None = None, **push_to_hub_kwargs) -> str | None:
        """Write the weights, config.json and a short card into the folder ``save_directory``, atomically: it is
        either left as it was or complete. As ``python -m rnnlm.export`` does, an existing non-empty folder is
        replaced only with ``overwrite=True`` (and then as a whole). ``push_to_hub=True`` also uploads the model
        to ``repo_id`` (default: the folder's name) with :meth:`push_to_hub`."""
        if config is not None:
            raise TypeError("config is the model's own (its RNNLMConfig): save_pretrained takes no other.")
        out = Path(save_directory).expanduser()
        if out.exists():
            if not out.is_dir():
                raise PretrainedError(f"{out} exists and is not a folder: choose another one.")
            if any(out.iterdir()) and not overwrite:
                raise PretrainedError(f"{out} exists and is not empty: choose another folder, or pass "
                                      "overwrite=True to replace it.")
        with atomic_folder(out) as tmp:
            self._save_pretrained(tmp)
            self.generate_model_card(**(model_card_kwargs or {})).save(tmp / CARD_FILE)
        if push_to_hub:
            return self.push_to_hub(repo_id or out.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        model: torch.nn.Module = self  # type: ignore[assignment]
        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).cpu()
        save_weights(model, save_directory / MODEL_FILE)
        text = json.dumps(self._folder_values(), indent=2) + "\n"
        (save_directory / CONFIG_FILE).write_text(text, encoding="utf-8")

    def _base_values(self) -> dict:
        """config.json's keys every network writes: what it is, its settings, and which rnnlm wrote it."""
        return {"model_type": MODEL_TYPE, **self.config.to_dict(), "rnnlm_version": __version__}  # type: ignore

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *,
                        map_location: str | torch.device = "cpu", revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, force_download: bool = False,
                        token: str | bool | None = None, local_files_only: bool = False):
        """The network saved in a folder (by :meth:`save_pretrained` or ``python -m rnnlm.export``) or in the Hub
        model ``OWNER/NAME`` (its config.json and model.safetensors downloaded and cached by huggingface_hub;
        ``HF_HUB_OFFLINE=1`` reads the cache only), in eval mode on ``map_location``. Every tensor is checked:
        one missing, unexpected or of the wrong shape is an error that names it. The other kind of network
        (a classifier's folder for an RNNLM, or the reverse) is refused by name."""
        # The mixin's own from_pretrained is bypassed: it would read config.json into __init__'s arguments, which
        # are not what the exported layout holds, and pass a failed download of it by with a log line.
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, map_location=map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | os.PathLike | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str | torch.device = "cpu", **unused):
        folder = Path(model_id).expanduser()
        if folder.is_dir():
            def locate(filename: str) -> Path:
                return folder / filename

            if not (folder / CONFIG_FILE).is_file():
                raise PretrainedError(f"{folder} is not an rnnlm model folder: it has no {CONFIG_FILE}.")
        elif folder.exists():
            raise PretrainedError(f"{folder} is a file: from_pretrained reads the folder that holds {CONFIG_FILE} "
                                  f"and {MODEL_FILE}.")
        else:
            download = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
                            local_files_only=local_files_only)

            def locate(filename: str) -> Path:
                return _hub_file(model_id, filename, **download)

        config_path = locate(CONFIG_FILE)
        # The settings first: a wrong kind of model or bad settings are refused before the weights are fetched.
        model = cls._from_values(read_folder_config(config_path, cls.task), str(config_path))
        load_weights(model, locate(MODEL_FILE))
        return model.to(map_location).eval()
