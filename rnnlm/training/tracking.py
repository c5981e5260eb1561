"""Experiment tracking: pick the W&B mode before W&B starts, and read back what an offline run wrote.

A wrong guess is expensive: with a stored key and no network ``wandb.init`` waits ~100 s and then fails, and
with no key and no terminal it raises at once. So: ``WANDB_MODE`` wins when set; otherwise a run goes online
only when credentials are present, and offline (to be synced later) when they are not.
"""

from __future__ import annotations

import netrc
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger


def has_wandb_credentials() -> bool:
    """An API key in the environment, or a netrc entry for the W&B host (where ``wandb login`` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def choose_wandb_mode() -> str:
    """Set ``WANDB_MODE`` (online/offline) unless the user already did, and return the mode in force."""
    mode = os.environ.get("WANDB_MODE")
    if not mode:
        mode = "online" if has_wandb_credentials() else "offline"
        os.environ["WANDB_MODE"] = mode
    return mode


# ------------------------------------------------------------------------------------------ reading offline runs
_BLOCK = 32 * 1024
_HEADER = 7  # b":W&B", a 2-byte magic, a 1-byte version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: str | Path) -> Iterator:
    """The records of a ``run-*.wandb`` file, as ``wandb_internal_pb2.Record`` messages.

    ``wandb.Api()`` cannot read offline runs. The file is a log of length-prefixed records in 32 KiB blocks
    (the LevelDB log layout: 4-byte checksum, 2-byte length, 1-byte type, payload; a record that does not fit
    in a block continues in the next one, and a block's tail shorter than a header is padding).
    """
    from wandb.proto import wandb_internal_pb2  # deferred: heavy, needed only to read an offline run back

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            pending = payload
        elif kind == _FIRST:
            pending = payload
            continue
        elif kind == _MIDDLE:
            pending += payload
            continue
        else:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        yield record


def wandb_run_facts(logger: WandbLogger) -> dict:
    """The W&B run's id and name (what resuming needs), and where it lives when known (for a model card).

    (``WandbLogger.name`` is the project's name; the run's own name is the experiment's.)"""
    run = logger.experiment
    facts = {"id": logger.version, "name": getattr(run, "name", None) or logger.name}
    # An offline run has no URL (and warns when asked for one). (Not `run.offline`: reading that property during
    # training left the offline run's file unwritten at finish, wandb 0.31.)
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
    for key in ("project", "entity") if offline else ("project", "entity", "url"):
        try:
            value = getattr(run, key, None)
        except Exception:  # noqa: BLE001 - an offline or disabled run may not know it
            value = None
        if isinstance(value, str) and value:
            facts[key] = value
    return facts
