"""Export: a checkpoint written as the Hub's model folder (weights, config, tokenizer, card), read back and checked
against the checkpoint's logits bit for bit, and optionally pushed to the Hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from rnnlm.files import load_safely
from rnnlm.network.lm import DIRECTIONS
from rnnlm.network.serving import ClassifierStep, LMStep
from rnnlm.sharing import classifier, lm
from rnnlm.sharing.card import classifier_card, model_card
from rnnlm.sharing.checkpoints import is_classifier_checkpoint
from rnnlm.sharing.folders import CLASSIFIER, FILES, ONNX_FILE, PretrainedError, folder_task, write_folder
from rnnlm.sharing.hub import locate, push
from rnnlm.sharing.serving import onnx_difference, write_onnx

# ONNX against eager PyTorch: the runtimes sum in other orders, so float32 rounding differs (1e-7 seen); more is a bug.
ONNX_TOLERANCE = 1e-5


@torch.no_grad()
def logits_difference(a: lm.TrainedModel, b: lm.TrainedModel, length: int = 64, seed: int = 0) -> tuple[bool, float]:
    """Whether two models give bit-identical logits (every direction) on a fixed random id sequence, and the
    largest absolute difference."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(a.config.vocab_size, (2, length), generator=generator)
    equal, worst = True, 0.0
    for direction in DIRECTIONS[: 2 if a.config.bidirectional else 1]:
        x = a.model(ids.to(next(a.model.parameters()).device), direction=direction).logits.cpu()
        y = b.model(ids.to(next(b.model.parameters()).device), direction=direction).logits.cpu()
        equal = equal and torch.equal(x, y)
        worst = max(worst, (x - y).abs().max().item())
    return equal, worst


@torch.no_grad()
def classifier_logits_difference(a, b, length: int = 40, seed: int = 0) -> tuple[bool, float]:
    """The same check for two classifiers, on texts of three lengths in one padded batch."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(a.config.vocab_size, (3, length), generator=generator)
    lengths = torch.tensor([length, length // 2, 3])
    x = a.model(ids.to(next(a.model.parameters()).device), lengths).cpu()
    y = b.model(ids.to(next(b.model.parameters()).device), lengths).cpu()
    return torch.equal(x, y), (x - y).abs().max().item()


def check_out_folder(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an ``--out`` that would destroy what the user has: the folder
    they are in (or one above it), a folder holding the checkpoint being exported, or a file."""
    target, here = out.expanduser().resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise PretrainedError(f"--out {out} is the folder you are in (or holds it): replacing it would delete your "
                              "files. Give a new folder name, e.g. --out exported/my-model.")
    if target.exists() and not target.is_dir():
        raise PretrainedError(f"--out {out} exists and is not a folder: choose another --out.")
    if target == checkpoint.resolve().parent or target in checkpoint.resolve().parents:
        raise PretrainedError(f"--out {out} holds the checkpoint being exported ({checkpoint}): "
                              + ("--overwrite would delete it. " if overwrite else "")
                              + "Export to a new folder outside the run's checkpoints.")
    existing = next((p for p in (target.parent, *target.parent.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise PretrainedError(f"--out {out}: cannot write in {existing} (permission denied).")


def export(
    checkpoint: str,
    out: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    *,
    license: str | None = None,
    language: str | list[str] | None = None,
    name: str | None = None,
    onnx: bool = False,
) -> dict:
    """Write the exported folder of ``checkpoint`` to ``out`` (checked against the checkpoint's logits), and push
    it to ``push_to_hub`` when given. ``license`` (a Hub license id), ``language`` (ISO 639 codes) and ``name`` (the
    card's title; default: the Hub repo's name, else the run's or its config's) go into the model card. With
    ``onnx`` the folder also holds ``model.onnx`` (the LM's step or the classifier, :mod:`rnnlm.sharing.serving`),
    checked with onnxruntime against the eager model. Returns what was done: the folder, its files and sizes, the
    checks, the repo URL and whether the card has a license."""
    kind, path = locate(checkpoint)
    if kind == "folder":  # already exported: check it loads, and push it as it is
        if out is not None or onnx:
            raise PretrainedError(f"{checkpoint} is an exported folder already: give a .ckpt to export, or only "
                                  "--push_to_hub to upload the folder as it is.")
        (classifier.from_folder if folder_task(path) == CLASSIFIER else lm.from_folder)(path)
        result = {"folder": str(path), "files": {p.name: p.stat().st_size for p in sorted(path.iterdir())
                                                 if p.name in (*FILES, ONNX_FILE)}}
        if push_to_hub:
            result["url"] = push(path, push_to_hub, private)
        return result
    if out is None and push_to_hub is None:
        raise PretrainedError("Say where the exported model goes: --out DIR, --push_to_hub OWNER/NAME, or both.")
    if out is not None:
        check_out_folder(Path(out), path, overwrite)
    saved = load_safely(path)
    if is_classifier_checkpoint(saved):
        trained = classifier.from_checkpoint(saved, str(path))
        card_of, read_back, difference = classifier_card, classifier.from_folder, classifier_logits_difference
    else:
        trained = lm.from_checkpoint(saved, str(path))
        card_of, read_back, difference = model_card, lm.from_folder, logits_difference
    # Wrapped before anything is written, so that a model the serving path refuses leaves no folder behind.
    step = (ClassifierStep if card_of is classifier_card else LMStep)(trained.model) if onnx else None
    with tempfile.TemporaryDirectory(prefix="rnnlm-export-") as scratch:
        folder = Path(out) if out is not None else Path(scratch) / push_to_hub.split("/")[-1]
        # The card shows how to load the model: by its Hub id, or by the folder's name (never the machine's path).
        load_as = push_to_hub or Path(out).expanduser().resolve().name
        title = name or (push_to_hub.split("/")[-1] if push_to_hub else None)
        card = card_of(saved, trained, load_as=load_as, title=title, license=license, language=language)
        files = write_folder(trained, folder, card, overwrite=overwrite,
                             extra=(lambda tmp: write_onnx(step, tmp / ONNX_FILE)) if onnx else None)
        again = read_back(folder)
        identical, worst = difference(trained, again)
        if not identical:  # a bug, never a user's mistake: say so loudly
            raise RuntimeError(f"The exported folder {folder} gives other logits than {path} (max |diff| {worst}).")
        result = {"checkpoint": str(path), "folder": str(folder) if out is not None else None, "files": files,
                  "parameters": sum(p.numel() for p in trained.model.parameters()),
                  "logits_identical": identical, "max_abs_logit_diff": worst, "license": license or None}
        if onnx:
            off = onnx_difference(step, folder / ONNX_FILE)
            if off > ONNX_TOLERANCE:  # a bug of the exporter or of rnnlm, not the user's
                raise RuntimeError(f"{folder / ONNX_FILE} run by onnxruntime differs from the model by {off:.3g} "
                                   f"(more than {ONNX_TOLERANCE}).")
            result["onnx_max_abs_diff"] = off
        if push_to_hub:
            result["url"] = push(folder, push_to_hub, private, kept=out is not None)
    return result
