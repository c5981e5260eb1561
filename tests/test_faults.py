"""Faults that must lose nothing: corrupt, truncated, foreign or malicious checkpoints, damaged token caches,
non-finite losses. Each is a clear error that says what to do, and no file is overwritten."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fit_args, make_text, tiny_data, tiny_trainer

import rnnlm
from rnnlm import evaluate, fit
from rnnlm.data.lm import LMDataModule
from rnnlm.errors import UserError
from rnnlm.files import CheckpointError, load_safely, save_atomically
from rnnlm.network.config import RNNLMConfig
from rnnlm.text.sources import DataError
from rnnlm.training.callbacks import NonFiniteGuard, NonFiniteLossError
from rnnlm.training.checkpointing import SafeCheckpointIO
from rnnlm.training.lm import LanguageModel


def _args(tmp_path: Path, source: Path, *extra: str) -> list[str]:
    return fit_args(
        tmp_path / "run", source,
        "--model.config.hidden_size", "8",
        "--trainer.max_steps", "4",
        "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "2",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false",
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--test_after_fit", "false",
        *extra,
        cache=tmp_path / "cache",
    )  # fmt: skip


# Not conftest's tiny_lm_checkpoint: these tests damage and resume the CLI's own checkpoint folder, per test.
@pytest.fixture
def trained(corpus_dir, tmp_path) -> Path:
    """A real checkpoint folder written by the CLI."""
    fit.main(_args(tmp_path, corpus_dir))
    return tmp_path / "ckpt" / "last.ckpt"


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.ckpt"))}


def _resume_fails(tmp_path: Path, source: Path, ckpt: Path, capsys, *extra: str) -> str:
    before = _snapshot(ckpt.parent)
    with pytest.raises(SystemExit) as stop:
        fit.main(_args(tmp_path, source, "--ckpt_path", str(ckpt), "--trainer.max_steps", "8", *extra))
    assert stop.value.code == 1
    assert _snapshot(ckpt.parent) == before, "a failed resume must not touch the checkpoints"
    return capsys.readouterr().err


def test_truncated_checkpoint_is_reported_and_nothing_is_overwritten(trained, corpus_dir, tmp_path, capsys):
    data = trained.read_bytes()
    broken = trained.with_name("broken.ckpt")
    broken.write_bytes(data[: len(data) // 2])
    err = _resume_fails(tmp_path, corpus_dir, broken, capsys)
    assert "truncated or corrupt" in err and "broken.ckpt" in err
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        evaluate.main(["--checkpoint", str(broken)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        rnnlm.load(broken)


def test_garbage_and_missing_checkpoints(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="truncated or corrupt, or not a checkpoint"):
        load_safely(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safely(tmp_path / "nope.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_safely(tmp_path / "other.ckpt")


def test_a_file_that_is_not_a_checkpoint_is_reported(tmp_path):
    """Bytes that are not a zip archive went to torch's legacy unpickler, which failed with a bare IndexError
    ("abc") or KeyError (plain text); damaged pickle bytes inside a zip archive did the same."""
    tiny = tmp_path / "tiny.ckpt"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(not a zip archive.*b'abc'"):
        load_safely(tiny)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        evaluate.main(["--checkpoint", str(tiny)])
    (tmp_path / "notes.txt").write_text("hello world\n")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_safely(tmp_path / "notes.txt")

    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "good.ckpt")
    with zipfile.ZipFile(tmp_path / "good.ckpt") as good, zipfile.ZipFile(tmp_path / "bad.ckpt", "w") as bad:
        for name in good.namelist():
            bad.writestr(name, b"abc" if name.endswith("data.pkl") else good.read(name))
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*IndexError"):
        load_safely(tmp_path / "bad.ckpt")
    assert issubclass(CheckpointError, UserError)  # the entry points report it as a message, not a traceback


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_checkpoint_is_refused_without_running_it(trained, corpus_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = torch.load(trained, weights_only=True)
    ckpt["rnnlm"]["payload"] = _Payload(marker)
    evil = trained.with_name("evil.ckpt")
    torch.save(ckpt, evil)
    for attempt in (lambda: rnnlm.load(evil),
                    lambda: evaluate.main(["--checkpoint", str(evil)])):
        with pytest.raises(CheckpointError, match="could run code"):
            attempt()
    err = _resume_fails(tmp_path, corpus_dir, evil, capsys)
    assert "could run code" in err
    assert not marker.exists(), "loading executed code from the checkpoint"
    torch.load(evil, weights_only=False)  # the payload is real: unrestricted loading runs it
    assert marker.exists()


def test_resuming_with_another_tokenizer_or_model_is_refused(trained, corpus_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        # Upper-case text: another character vocabulary.
        (other / name).write_text(make_text(200, seed=9).upper())
    err = _resume_fails(tmp_path, other, trained, capsys)
    assert "different tokenizer" in err and "data settings it was trained with" in err

    err = _resume_fails(tmp_path, corpus_dir, trained, capsys, "--model.config.hidden_size", "12")
    assert "hidden_size: checkpoint 8, this run 12" in err
    err = _resume_fails(tmp_path, corpus_dir, trained, capsys, "--model.config.cell", "gru")
    assert "cell: checkpoint 'lstm', this run 'gru'" in err


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomically({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        SafeCheckpointIO().save_checkpoint({"state_dict": {}}, path)
    assert path.read_bytes() == good, "a failed write left the previous checkpoint intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temporary file left behind"


# ----------------------------------------------------------------------------------------- non-finite losses
class PoisonAt(LanguageModel):
    """Makes the loss NaN at one step, as an exploding model would."""

    poison_step = 5

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.poison_step else loss


class Weights(L.Callback):
    def __init__(self) -> None:
        self.before: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _poisoned_run(corpus: Path, root: Path, policy: str, weights: Weights) -> tuple[PoisonAt, L.Trainer]:
    data = tiny_data(corpus, root, batch_size=2, bptt=8)
    torch.manual_seed(0)
    model = PoisonAt(RNNLMConfig(data.vocab_size, num_layers=1, embedding_dim=8, hidden_size=8), on_nonfinite=policy)
    trainer = tiny_trainer(root, max_steps=8, limit_val_batches=0, enable_checkpointing=True,
                           callbacks=[weights, L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"))])
    trainer.fit(model, datamodule=data)
    return model, trainer


def test_nonfinite_loss_stops_with_a_checkpoint_of_the_last_good_state(corpus_dir, tmp_path):
    weights = Weights()
    with pytest.raises(NonFiniteLossError) as err:
        _poisoned_run(corpus_dir, tmp_path, "stop", weights)
    message = str(err.value)
    assert "at step 5" in message and "learning rate" in message and "gradient_clip_val" in message
    ckpt = tmp_path / "ckpt" / "nonfinite-step5.ckpt"
    assert str(ckpt) in message
    saved = load_safely(ckpt)
    assert saved["global_step"] == 5
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["position"] == 5, "resuming from it retries the failing chunk"
    # Exactly the weights before the failing step (so nothing NaN in them).
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(tensor, weights.before[5][name]), name


def test_nonfinite_loss_can_be_skipped(corpus_dir, tmp_path):
    weights = Weights()
    model, trainer = _poisoned_run(corpus_dir, tmp_path, "skip", weights)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert trainer.global_step == 8 and guard.skipped_steps == 1
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    # The poisoned step changed nothing.
    for name, tensor in weights.before[5].items():
        assert torch.equal(tensor, weights.before[6][name]), name
    assert not torch.equal(weights.before[4]["model.decoder.weight"], weights.before[5]["model.decoder.weight"])


# ----------------------------------------------------------------------------------------- token cache
def _prepared(corpus: Path, root: Path) -> tuple[LMDataModule, Path]:
    data = tiny_data(corpus, root, batch_size=2, bptt=8)
    data.prepare_data()
    return data, data._cache_path("train")


@pytest.mark.parametrize("damage", ["truncate", "foreign_ids", "meta_garbage", "meta_other_key"])
def test_a_damaged_token_cache_is_reported_not_used(corpus_dir, tmp_path, damage):
    data, folder = _prepared(corpus_dir, tmp_path)
    ids, meta = folder / "ids.bin", folder / "meta.json"
    if damage == "truncate":
        ids.write_bytes(ids.read_bytes()[:-10])
        expected = "truncated"
    elif damage == "foreign_ids":
        raw = bytearray(ids.read_bytes())
        raw[0:2] = (60000).to_bytes(2, "little")
        ids.write_bytes(bytes(raw))
        expected = "does not belong"
    elif damage == "meta_garbage":
        meta.write_text("{not json")
        expected = "unreadable"
    else:
        meta.write_text(meta.read_text().replace(folder.name, "train-0000-0000"))
        expected = "another dataset or tokenizer"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fresh = tiny_data(corpus_dir, tmp_path, batch_size=2, bptt=8)
    with pytest.raises(DataError, match=expected) as err:
        fresh.setup("fit")
    assert "Delete the folder" in str(err.value) and str(folder) in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "nothing overwritten"
    shutil.rmtree(folder)  # the advice works: the next run rebuilds it
    tiny_data(corpus_dir, tmp_path, batch_size=2, bptt=8).setup("fit")


PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _non_plain(value, where: str = "checkpoint") -> list[str]:
    """Where ``value`` holds anything but tensors, plain Python values and their containers."""
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _non_plain(key, f"{where} key") + _non_plain(
            item, f"{where}[{key!r}]")]
    if isinstance(value, (list, tuple)):
        return [bad for i, item in enumerate(value) for bad in _non_plain(item, f"{where}[{i}]")]
    return [] if isinstance(value, PLAIN) else [f"{where}: {type(value).__qualname__}"]


def test_a_trained_checkpoint_holds_only_tensors_and_plain_values(trained):
    """A checkpoint written by a real training run loads with ``weights_only=True`` (no pickled classes), and every
    object in it is a tensor, a plain Python value or a container of these."""
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["state_dict"] and isinstance(ckpt["rnnlm"]["tokenizer"], str)
    assert "resume" in ckpt["rnnlm"] and "loops" in ckpt and "callbacks" in ckpt  # the resumable parts are walked too
    assert _non_plain(ckpt) == []


PREPARE = """
import hashlib, sys
from rnnlm.data.lm import LMDataModule
data = LMDataModule(source=sys.argv[1], tokenizer="word", batch_size=2, bptt=8, cache_dir=sys.argv[2])
data.prepare_data()
data.setup("fit")
print("IDS", {s: hashlib.sha256(bytes(data.ids[s])).hexdigest() for s in sorted(data.ids)}, flush=True)
"""


@pytest.mark.slow  # three fresh processes
def test_processes_preparing_the_same_cache_at_once_share_one_result(corpus_dir, tmp_path):
    """Several jobs (or all ranks of one) starting together on an empty cache: one trains the tokenizer and encodes
    each split, the others wait and read it; every process sees the same complete files."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = tmp_path / "shared-cache"
    procs = [
        subprocess.Popen([sys.executable, "-c", PREPARE, str(corpus_dir), str(cache)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(3)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    both = "".join(logs)
    assert both.count("trained word tokenizer") == 1
    assert both.count("rnnlm: encoded train") == 1
    results = {line for log in logs for line in log.splitlines() if line.startswith("IDS")}
    assert len(results) == 1, results
    leftovers = [p.name for p in cache.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
