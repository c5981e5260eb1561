"""The Hugging Face Hub: where a model named by the user is (a local checkpoint, a folder, or a Hub repo downloaded
and cached by ``huggingface_hub``), and uploading an exported folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rnnlm.sharing.folders import FILES, ONNX_FILE, PretrainedError
from rnnlm.version import __version__

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    from huggingface_hub import snapshot_download  # deferred: ~0.5 s to import; local models never need it
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local = f"(there is no local file or folder named {repo_id!r} either)"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=[*FILES, ONNX_FILE],
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
    from huggingface_hub import constants  # deferred: ~0.5 s to import; local models never need it

    return str(constants.HF_HUB_CACHE)


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, kept: bool = True) -> str:
    """Upload an exported folder to the Hub model repo ``repo_id`` (created if needed); return its URL. ``kept``:
    whether the folder stays after a failed push (an error then says how to push it later)."""
    from huggingface_hub import HfApi  # deferred: ~0.5 s to import; local models never need it
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    api = HfApi(library_name="rnnlm", library_version=__version__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          allow_patterns=[*FILES, ONNX_FILE],
                          commit_message=f"Upload rnnlm model (rnnlm {__version__})")
    except OfflineModeIsEnabled:
        why = "HF_HUB_OFFLINE is set"
    except LocalTokenNotFoundError:
        why = "you are not logged in (run `hf auth login` or set HF_TOKEN)"
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        why = ("the Hub refused the token (log in with a token that can write: `hf auth login`)"
               if status in (401, 403) else f"the Hub answered: {err}")
    except (HTTPError, OSError) as err:
        why = f"the Hub could not be reached ({type(err).__name__}: {err})"
    else:
        return str(url)
    later = (f"The exported folder {folder} is complete; push it later with `python -m rnnlm.export --checkpoint "
             f"{folder} --push_to_hub {repo_id}`." if kept else
             "Nothing was kept: give --out DIR as well to keep the exported folder and push it later.")
    raise PretrainedError(f"Could not push to the Hub model {repo_id!r}: {why}. {later}")
