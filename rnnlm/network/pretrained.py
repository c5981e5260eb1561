"""The network's part of the exported folder, read and written below the sharing layer so that the networks can
load themselves (``from_pretrained``, next):

    model.safetensors   the weights (safetensors only: loading runs no code; tied weights stored once)
    config.json         ``model_type``, the :class:`~rnnlm.network.config.RNNLMConfig` fields, and for a classifier
                        its ``task`` and head settings

:func:`load_weights` holds the checks every rnnlm loader makes before a weight is used.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor

from rnnlm.errors import PretrainedError
from rnnlm.version import __version__

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
LANGUAGE_MODEL = "language-model"  # config.json's "task" (absent: a language model)
CLASSIFIER = "classification"


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
