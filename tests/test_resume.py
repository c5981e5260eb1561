"""A run stopped at any step and resumed ends exactly like a run that was never stopped.

The reference is an uninterrupted run; the other is stopped by a real signal mid-epoch, writes last.ckpt and is
resumed from it by a fresh Trainer. Both must log the same losses after the stop and end with bit-identical
weights (same process, same CPU kernels: nothing justifies a tolerance).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import FIT, fit_args, make_text, sigterm_once_training, tiny_data, tiny_trainer
from lightning.pytorch.plugins import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from rnnlm import fit
from rnnlm.data.lm import LMDataModule
from rnnlm.network.config import RNNLMConfig
from rnnlm.text.streams import ChunkLoader
from rnnlm.training.averaging import NTASGD
from rnnlm.training.checkpointing import (
    ResumableCheckpoints,
    SafeCheckpointIO,
    TrainingInterrupted,
    newest_checkpoint,
    with_safe_checkpoint_io,
)
from rnnlm.training.cli import LanguageModelCLI
from rnnlm.training.lm import LanguageModel


class PlateauModel(LanguageModel):
    """SGD with momentum and lr/2 on plateau: optimizer and lr-controller state both matter for resuming."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=2.0, momentum=0.5)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}


class Recorder(L.Callback):
    """Training loss per step and validation loss per pass, as logged."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}
        self.val: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train[trainer.global_step] = float(outputs["loss"])

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append(float(trainer.callback_metrics["val/loss"]))


class SignalAt(L.Callback):
    """Sends a real signal to this process after a given step (before the checkpointing callback runs)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


AWD = {"hidden_sizes": [16, 8], "weight_drop": 0.3, "locked_dropout": True, "dropout_words": 0.1}
AR_TAR = {"activation_regularization": 1.0, "temporal_activation_regularization": 1.0}


def _fit(corpus: Path, root: Path, callbacks: list, ckpt_path: str | None = None, cell: str = "lstm",
         bidirectional: bool = False, awd: bool = False, **limits) -> tuple[PlateauModel, L.Trainer]:
    L.seed_everything(7)
    data = tiny_data(corpus, root, batch_size=3, bptt=8, bidirectional=bidirectional, variable_bptt=awd)
    config = RNNLMConfig(data.vocab_size, cell=cell, num_layers=2, embedding_dim=8, hidden_size=16,
                         dropout_embedding=0.1, dropout_between=0.2, dropout_output=0.2, bidirectional=bidirectional,
                         **(AWD if awd else {}))
    model = PlateauModel(config, **(AR_TAR if awd else {}))
    trainer = tiny_trainer(
        root, **{"max_epochs": 2, **limits}, limit_train_batches=20, val_check_interval=10, limit_val_batches=4,
        num_sanity_val_steps=0, enable_checkpointing=True, plugins=[SafeCheckpointIO()],
        reload_dataloaders_every_n_epochs=int(awd),
        callbacks=[ResumableCheckpoints(every_n_minutes=None), *callbacks,
                   L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), monitor="val/loss", save_last=True)],
    )  # fmt: skip
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return model, trainer


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize(
    ("stop_step", "signum", "cell", "bidirectional", "awd"),
    [
        (14, signal.SIGTERM, "lstm", False, False),  # mid first epoch, after a validation pass
        (33, signal.SIGINT, "gru", False, False),  # mid second epoch: plateau scheduler and momentum carry over
        (17, signal.SIGTERM, "lstm", True, False),  # both directions' carried states
        # Per-layer stack (a list of states), weight drop, AR/TAR and variable-length chunks drawn per epoch.
        (27, signal.SIGTERM, "lstm", False, True),
    ],
    ids=["sigterm-epoch1", "sigint-epoch2-gru", "bidirectional", "awd-variable-bptt"],
)
def test_stop_and_resume_equals_uninterrupted(corpus_dir, tmp_path, stop_step, signum, cell, bidirectional, awd):
    ref = Recorder()
    ref_model, _ = _fit(corpus_dir, tmp_path / "ref", [ref], cell=cell, bidirectional=bidirectional, awd=awd)

    first = Recorder()
    with pytest.raises(TrainingInterrupted) as stop:
        _fit(corpus_dir, tmp_path / "cut", [SignalAt(stop_step, signum), first], cell=cell,
             bidirectional=bidirectional, awd=awd)
    assert stop.value.step == stop_step and stop.value.signum == signum
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert Path(stop.value.path) == last
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == stop_step
    assert saved["rnnlm"]["resume"]["carried"], "the carried hidden state is in the checkpoint"

    second = Recorder()
    model, trainer = _fit(corpus_dir, tmp_path / "cut", [second], ckpt_path=str(last), cell=cell,
                          bidirectional=bidirectional, awd=awd)
    assert min(second.train) == stop_step + 1, "resumed at the next step"
    assert {**first.train, **second.train} == ref.train
    assert first.val + second.val == ref.val
    assert trainer.global_step == 40
    _assert_same_weights(model, ref_model)


def test_chunk_loader_resumes_at_its_position():
    rows = np.arange(2 * 41).reshape(2, 41)
    loader = ChunkLoader(rows, bptt=4)
    chunks = [x for x, _ in loader]
    loader.position = 6
    state = loader.state_dict()

    fresh = ChunkLoader(rows, bptt=4)
    fresh.load_state_dict(state)
    assert len(fresh) == len(loader) == 10  # Lightning counts the whole epoch
    rest = [x for x, _ in fresh]
    assert len(rest) == 4 and all(torch.equal(a, b) for a, b in zip(rest, chunks[6:], strict=True))
    assert len([x for x, _ in fresh]) == 10, "the next epoch starts at chunk 0 again"

    for boundary in (0, 10):  # checkpoints written at an epoch boundary start the next epoch afresh
        fresh.load_state_dict({**state, "position": boundary})
        assert len(list(fresh)) == 10

    other = ChunkLoader(np.arange(3 * 27).reshape(3, 27), bptt=4)
    with pytest.raises(ValueError, match="same data, data.batch_size, data.bptt and number of processes"):
        other.load_state_dict(state)


def _cli_args(corpus: Path, out: Path, epochs: int) -> list[str]:
    return fit_args(
        out, corpus,
        "--data.batch_size", "4",
        "--data.bptt", "32",
        "--model.config.hidden_size", "128",
        "--model.config.embedding_dim", "32",
        "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", str(epochs),
        "--trainer.limit_val_batches", "3",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false",
        "--checkpoint.dirpath", str(out / "ckpt"),
        "--resumable.every_n_train_steps", "2",
        "--test_after_fit", "false",
        cache=out.parent / "cache",
    )  # fmt: skip


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_from_outside_stops_cleanly_and_resumes_exactly(corpus_dir, tmp_path):
    """A scheduler-style SIGTERM at an arbitrary moment of a real `python -m rnnlm.fit` process."""
    fit = FIT
    ref = tmp_path / "ref"
    done = subprocess.run([*fit, *_cli_args(corpus_dir, ref, 2)], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "cut"
    last = out / "ckpt" / "last.ckpt"
    code, log = sigterm_once_training([*fit, *_cli_args(corpus_dir, out, 2)], last, env=_env())
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "stopped by SIGTERM" in log and "--ckpt_path" in log, log[-3000:]
    total = torch.load(ref / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    stopped = torch.load(last, weights_only=True)["global_step"]
    assert 0 < stopped < total

    resumed = subprocess.run([*fit, *_cli_args(corpus_dir, out, 2), "--ckpt_path", "last"], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(ref / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert b["global_step"] == total
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def _checkpointing_off(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [*_cli_args(corpus, out, 1), "--trainer.enable_checkpointing", "false", "--trainer.max_steps", "6",
            "--trainer.val_check_interval", "3", *extra]  # fmt: skip


def test_checkpointing_off_trains_without_checkpoints_and_a_signal_stops_unsaved(corpus_dir, tmp_path, capsys):
    """--trainer.enable_checkpointing false (the CLI added its ModelCheckpoint anyway, which Lightning refused)."""
    cli = fit.main(_checkpointing_off(corpus_dir, tmp_path / "off", "--test_after_fit", "true"))
    assert cli.trainer.checkpoint_callback is None and cli.trainer.global_step == 6
    assert "test/loss" in cli.trainer.callback_metrics, "the final weights were tested (there is no best checkpoint)"
    assert not list(tmp_path.rglob("*.ckpt"))
    capsys.readouterr()

    with pytest.raises(SystemExit) as stop:
        fit.main(_checkpointing_off(corpus_dir, tmp_path / "stopped", "--trainer.callbacks+=test_resume.SignalAt",
                                    "--trainer.callbacks.step", "3", "--trainer.callbacks.signum", "15"))  # fmt: skip
    assert stop.value.code == 128 + signal.SIGTERM
    log = capsys.readouterr().out
    assert "SIGTERM received: finishing this step, then stopping WITHOUT a checkpoint" in log
    assert "stopped by SIGTERM after step 3; nothing was saved: checkpointing is off" in log
    assert "--ckpt_path" not in log
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_cli_passes_safe_checkpoint_io_to_the_trainer_unless_one_was_chosen(corpus_dir, tmp_path):
    def trainer(*extra: str) -> L.Trainer:
        args = [*_cli_args(corpus_dir, tmp_path / "run", 1), *extra]
        return LanguageModelCLI(LanguageModel, LMDataModule, run=False, args=args).trainer

    assert type(trainer().strategy.checkpoint_io) is SafeCheckpointIO
    environment = "lightning.pytorch.plugins.environments.LightningEnvironment"
    assert type(trainer("--trainer.plugins", environment).strategy.checkpoint_io) is SafeCheckpointIO
    chosen = trainer("--trainer.plugins+=lightning.pytorch.plugins.TorchCheckpointIO",
                     f"--trainer.plugins+={environment}")
    assert type(chosen.strategy.checkpoint_io) is TorchCheckpointIO, "the user's choice is kept"
    # On a strategy object: set there when it has none (Lightning refuses one in both places), kept when it has one.
    strategy = DDPStrategy(start_method="spawn")
    assert with_safe_checkpoint_io(None, strategy) == [] and type(strategy.checkpoint_io) is SafeCheckpointIO
    own = AsyncCheckpointIO()
    assert with_safe_checkpoint_io(None, DDPStrategy(checkpoint_io=own)) == []
    assert with_safe_checkpoint_io([own]) == [own]


def test_one_last_checkpoint_whoever_writes_it(corpus_dir, tmp_path):
    """--resumable and --checkpoint both write last.ckpt: one file, holding the latest state, never last-v1.ckpt."""
    out = tmp_path / "run"
    fit.main([*_cli_args(corpus_dir, out, 1), "--trainer.max_steps", "6", "--trainer.val_check_interval", "5"])
    assert sorted(p.name for p in (out / "ckpt").glob("last*")) == ["last.ckpt"]
    assert torch.load(out / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6


class TriggerAtFirstCheck(NTASGD):
    @staticmethod
    def should_start(history, loss, patience):
        return len(history) == 0


def test_ntasgd_stopped_mid_averaging_resumes_exactly(corpus_dir, tmp_path, capsys):
    """Averages, count and training weights all travel in last.ckpt: the resumed run ends like the uninterrupted one."""
    ntasgd = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "10", "--model.config.hidden_size", "16",
              "--model.config.embedding_dim", "8", "--optimizer", "torch.optim.SGD", "--optimizer.lr", "1.0",
              "--optimizer.momentum", "0.5", "--trainer.callbacks+=test_resume.TriggerAtFirstCheck"]  # fmt: skip
    fit.main([*_cli_args(corpus_dir, tmp_path / "ref", 1), *ntasgd])
    cut = [*_cli_args(corpus_dir, tmp_path / "cut", 1), *ntasgd]
    with pytest.raises(SystemExit):
        fit.main([*cut, "--trainer.callbacks+=test_resume.SignalAt", "--trainer.callbacks.step", "17",
                  "--trainer.callbacks.signum", "15"])  # fmt: skip
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 17 and int(saved["averaging_state"]["n_averaged"]) == 7

    # The hand-written NTASGD kept the training weights in its own state: such a checkpoint is refused, not misread.
    old = {k: v for k, v in saved.items() if k not in ("current_model_state", "averaging_state")}
    torch.save(old, tmp_path / "old.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        fit.main([*cut, "--ckpt_path", str(tmp_path / "old.ckpt")])
    assert refused.value.code == 1 and "earlier rnnlm" in capsys.readouterr().err

    fit.main([*cut, "--ckpt_path", "last"])
    a, b = (torch.load(run / "ckpt" / "last.ckpt", weights_only=True) for run in (tmp_path / "ref", tmp_path / "cut"))
    assert a["global_step"] == b["global_step"] == 30 and int(b["averaging_state"]["n_averaged"]) == 20
    for key in ("state_dict", "current_model_state"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


# ----------------------------------------------------------------------------------------- the final checkpoint
class StopAt(L.Callback):
    """Asks the Trainer to stop after a given step, as its max_time timer does (``should_stop`` at the batch end)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Recorder, PlateauModel]:
    """``_fit`` run to its end once for the tests below that compare against it (the corpus is ``corpus_dir``'s)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, lines, seed in (("train", 600, 1), ("valid", 80, 2), ("test", 80, 3)):
        (corpus / f"{name}.txt").write_text(make_text(lines, seed=seed))
    recorder = Recorder()
    model, _ = _fit(corpus, root / "run", [recorder])
    return recorder, model


@pytest.mark.parametrize(
    ("limits", "stopper", "final_step"),
    [
        ({"max_steps": 13}, None, 13),  # between the validations at steps 10 and 20
        ({"max_epochs": 1}, None, 20),  # the end of an epoch, after its validation
        ({}, StopAt(27), 27),  # a stop request mid-epoch (max_time's timer, early stopping), validated after
    ],
    ids=["max_steps-between-validations", "end-of-epoch", "stop-request"],
)
def test_last_checkpoint_holds_the_final_state_and_continues_exactly(corpus_dir, tmp_path, uninterrupted, limits,
                                                                     stopper, final_step):  # fmt: skip
    ref, ref_model = uninterrupted
    model, trainer = _fit(corpus_dir, tmp_path / "cut", [stopper] if stopper else [], **limits)
    assert trainer.global_step == final_step
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == final_step, "last.ckpt holds the step the run ended with"
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved["state_dict"][name], tensor), name

    # A longer run from it continues the epoch where it stopped and ends like the run that was never stopped.
    second = Recorder()
    model, trainer = _fit(corpus_dir, tmp_path / "cut", [second], ckpt_path=str(last))
    assert min(second.train) == final_step + 1
    assert {k: v for k, v in ref.train.items() if k > final_step} == second.train
    assert trainer.global_step == 40
    _assert_same_weights(model, ref_model)


def test_last_checkpoint_after_max_time_and_early_stopping_holds_the_final_step(corpus_dir, tmp_path):
    """Lightning's own stoppers: its max_time timer and EarlyStopping (which decides after a validation)."""
    for name, limits, callbacks in [
        ("timer", {"max_time": {"seconds": 1}, "max_epochs": -1}, []),
        ("early", {"max_epochs": 4}, [L.pytorch.callbacks.EarlyStopping("val/loss", patience=0, min_delta=10.0)]),
    ]:
        model, trainer = _fit(corpus_dir, tmp_path / name, callbacks, **limits)
        assert trainer.should_stop and trainer.global_step > 0, name
        saved = torch.load(tmp_path / name / "ckpt" / "last.ckpt", weights_only=True)
        assert saved["global_step"] == trainer.global_step, name
        for key, tensor in model.state_dict().items():
            assert torch.equal(saved["state_dict"][key], tensor), (name, key)


def test_ntasgd_final_checkpoint_holds_the_averages_and_resumes_exactly(corpus_dir, tmp_path):
    """At the end of training the model takes the averaged weights: last.ckpt, written at the end, has them as its
    weights and the training weights beside them, so a longer run resumed from it ends like an uninterrupted one.
    Both ends: max_steps mid-epoch, and max_epochs (where Lightning's ModelCheckpoint would otherwise write
    last.ckpt after the averages replaced the training weights)."""
    common = ["--trainer.val_check_interval", "4", "--trainer.limit_train_batches", "12", "--optimizer",
              "torch.optim.SGD", "--optimizer.lr", "1.0", "--optimizer.momentum", "0.5",
              "--model.config.hidden_size", "16", "--model.config.embedding_dim", "8",
              "--trainer.callbacks+=test_resume.TriggerAtFirstCheck"]  # fmt: skip
    ref = fit.main([*_cli_args(corpus_dir, tmp_path / "ref", 3), *common])
    a = torch.load(tmp_path / "ref" / "ckpt" / "last.ckpt", weights_only=True)
    assert a["global_step"] == ref.trainer.global_step == 36
    for name, end in [("steps", ["--trainer.max_steps", "17"]), ("epochs", ["--trainer.max_epochs", "2"])]:
        cut = fit.main([*_cli_args(corpus_dir, tmp_path / name, 3), *common, *end])
        last = tmp_path / name / "ckpt" / "last.ckpt"
        saved = torch.load(last, weights_only=True)
        assert saved["global_step"] == cut.trainer.global_step == (17 if name == "steps" else 24)
        averages = dict(cut.model.state_dict())  # what the run ended with
        for key, tensor in averages.items():
            assert torch.equal(saved["state_dict"][key], tensor), (name, key)
        assert any(not torch.equal(saved["current_model_state"][k], averages[k]) for k in averages), \
            "the training weights are kept beside the averages"

        fit.main([*_cli_args(corpus_dir, tmp_path / name, 3), *common, "--ckpt_path", str(last)])
        b = torch.load(last, weights_only=True)
        assert b["global_step"] == 36, name
        for key in ("state_dict", "current_model_state"):
            for param, tensor in a[key].items():
                assert torch.equal(tensor, b[key][param]), (name, key, param)


# ----------------------------------------------------------------------------------------- --ckpt_path last
def _wandb_args(root: Path, corpus: Path, steps: int) -> list[str]:
    return fit_args(root, corpus, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "4",
                    "--trainer.limit_val_batches", "2", "--test_after_fit", "false", "--ckpt_path", "last")


def test_ckpt_path_last_in_a_new_process_continues_the_run_or_starts_it(corpus_dir, tmp_path, capsys, recwarn):
    """What a requeued or resubmitted job runs: the same command, --ckpt_path last. The first time there is nothing
    to continue (one line says so, no warning); the next time it continues the newest checkpoint of the run, in
    the same W&B run and checkpoint folder, exactly."""
    run = tmp_path / "run"
    first = fit.main(_wandb_args(run, corpus_dir, 6))
    out = capsys.readouterr().out
    assert f"rnnlm: --ckpt_path last: no checkpoint of this run in {run} yet: starting it from scratch\n" in out
    assert not [w for w in recwarn if "checkpoint" in str(w.message)], [str(w.message) for w in recwarn]
    folder = Path(first.trainer.checkpoint_callback.dirpath)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6

    second = fit.main(_wandb_args(run, corpus_dir, 10))
    assert f"rnnlm: --ckpt_path last: continuing from {folder / 'last.ckpt'} (step 6)" in capsys.readouterr().out
    assert second.trainer.logger.version == first.trainer.logger.version, "the same W&B run"
    assert Path(second.trainer.checkpoint_callback.dirpath) == folder
    assert [p.name for p in (run / "rnnlm").iterdir()] == [folder.parent.name], "one run folder"

    ref = fit.main(_wandb_args(tmp_path / "ref", corpus_dir, 10))
    a = torch.load(Path(ref.trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=True)
    b = torch.load(folder / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 10
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def _fake_checkpoint(path: Path, step: int, mtime: float, full: bool = True, run: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": {"w": torch.zeros(2)}, "global_step": step}
    if full:
        checkpoint.update(optimizer_states=[{}], loops={})
    if run:
        checkpoint["rnnlm"] = {"wandb_run": {"id": run, "name": "x"}}
    torch.save(checkpoint, path)
    os.utime(path, (mtime, mtime))
    return path


def test_newest_checkpoint_of_the_run_whoever_wrote_it(tmp_path):
    root = tmp_path / "runs"
    hpc = _fake_checkpoint(root / "hpc_ckpt_1.ckpt", 3, 1000)
    last = _fake_checkpoint(root / "rnnlm" / "abc" / "checkpoints" / "last.ckpt", 6, 2000, run="abc")
    found = newest_checkpoint(root)
    assert (found.path, found.step, found.wandb_run["id"]) == (last, 6, "abc")
    os.utime(hpc, (3000, 3000))
    assert newest_checkpoint(root).path == hpc, "Lightning's HPC checkpoint, when it is the newer"

    # Passed over: the state before a NaN, weights-only files, unreadable files (said why), W&B's and hidden folders.
    _fake_checkpoint(root / "rnnlm" / "abc" / "checkpoints" / "nonfinite-step9.ckpt", 9, 4000)
    _fake_checkpoint(root / "rnnlm" / "abc" / "checkpoints" / "epoch0-step8.ckpt", 8, 5000, full=False)
    (root / "rnnlm" / "abc" / "checkpoints" / "broken.ckpt").write_bytes(b"PK\x03\x04 not really")
    os.utime(root / "rnnlm" / "abc" / "checkpoints" / "broken.ckpt", (6000, 6000))
    _fake_checkpoint(root / "wandb" / "run-1" / "checkpoints" / "last.ckpt", 1, 7000)
    _fake_checkpoint(root / ".hidden" / "checkpoints" / "last.ckpt", 1, 7000)
    said = []
    assert newest_checkpoint(root, report=said.append).path == hpc
    assert len(said) == 1 and "broken.ckpt cannot be read" in said[0]

    # A W&B run named: that run's checkpoints (and the run folder's HPC checkpoints, which name no run).
    other = _fake_checkpoint(root / "rnnlm" / "xyz" / "checkpoints" / "last.ckpt", 2, 8000, run="xyz")
    assert newest_checkpoint(root).path == other
    os.utime(hpc, (500, 500))
    assert newest_checkpoint(root, run_id="abc").path == last
    # A fixed checkpoint folder, and a logger's folder outside the run folder.
    fixed = _fake_checkpoint(tmp_path / "fixed" / "last.ckpt", 4, 600)
    assert newest_checkpoint(root, dirpath=tmp_path / "fixed").path == fixed
    elsewhere = _fake_checkpoint(tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                                 5, 9000)  # fmt: skip
    assert newest_checkpoint(root, save_dirs=(tmp_path / "logs",)).path == elsewhere
    assert newest_checkpoint(tmp_path / "empty") is None


# ----------------------------------------------------------------------------------------- SLURM's warning
class SignalsAt(SignalAt):
    """Sends several signals to this process after a given step, all within that step."""

    def __init__(self, step: int, signums: list[int]) -> None:
        super().__init__(step)
        self.signums = signums

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for signum in self.signums:
                # SIGUSR1's default action ends the process: make sure the handler is there first.
                assert signal.getsignal(signum) not in (signal.SIG_DFL, None), signal.Signals(signum).name
                os.kill(os.getpid(), signum)


@pytest.fixture
def slurm_job(tmp_path, monkeypatch) -> Path:
    """The environment of task 0 of a one-task SLURM job 4242, and a stand-in scontrol that records its arguments
    (in the returned file) and fails when $SCONTROL_FAIL is set, as scontrol does for a job without --requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n'
                        'if [ -n "$SCONTROL_FAIL" ]; then echo "Requested operation is presently disabled" >&2; '
                        'exit 1; fi\n')  # fmt: skip
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(record))
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rnnlm", "SLURM_NTASKS": "1",
                       "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    return record


@pytest.mark.parametrize(
    ("signums", "fail", "requeued"),
    [
        ([signal.SIGUSR1, signal.SIGTERM], False, True),  # the warning, then SLURM's SIGTERM: one save, one requeue
        ([signal.SIGTERM, signal.SIGUSR1], False, None),  # scancel or pre-emption first: the job must end
        ([signal.SIGUSR1], True, False),  # a job submitted without --requeue: said so
    ],
    ids=["usr1-then-term", "term-then-usr1", "requeue-refused"],
)
def test_slurm_warning_saves_at_the_step_requeues_once_and_resumes_exactly(corpus_dir, tmp_path, slurm_job,
                                                                           uninterrupted, monkeypatch, signums, fail,
                                                                           requeued):  # fmt: skip
    if fail:
        monkeypatch.setenv("SCONTROL_FAIL", "1")
    with pytest.raises(TrainingInterrupted) as stop:
        _fit(corpus_dir, tmp_path / "cut", [SignalsAt(14, signums)])
    assert stop.value.step == 14 and stop.value.signum == signums[0] and stop.value.requeued is requeued
    assert torch.load(stop.value.path, weights_only=True)["global_step"] == 14
    calls = slurm_job.read_text().splitlines() if slurm_job.exists() else []
    assert calls == (["requeue 4242"] if requeued is not None else [])
    if requeued is False:
        assert "not requeued" in str(stop.value) and "presently disabled" in str(stop.value)
    assert not list((tmp_path / "cut").glob("hpc_ckpt_*")), "Lightning's own handler did not run"
    if not requeued:
        return

    newest = newest_checkpoint(tmp_path / "cut", dirpath=tmp_path / "cut" / "ckpt").path
    model, _ = _fit(corpus_dir, tmp_path / "cut", [], ckpt_path=str(newest))
    _assert_same_weights(model, uninterrupted[1])
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, "the handler is given back after training"


def test_slurm_warning_with_checkpointing_off_stops_without_requeueing(corpus_dir, tmp_path, slurm_job):
    """A requeued job with nothing to continue would start over, and be warned again, and start over..."""
    data = tiny_data(corpus_dir, tmp_path)
    model = LanguageModel(RNNLMConfig(data.vocab_size, num_layers=1, embedding_dim=8, hidden_size=16))
    trainer = tiny_trainer(tmp_path, max_steps=10, limit_val_batches=0,
                           callbacks=[SignalsAt(3, [signal.SIGUSR1]), ResumableCheckpoints()])  # fmt: skip
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit(model, datamodule=data)
    assert stop.value.path is None and stop.value.requeued is False and "a requeued job would start over" in str(
        stop.value)
    assert not slurm_job.exists() and not list(tmp_path.rglob("*.ckpt"))
