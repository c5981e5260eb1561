"""The model config object: checks, JSON form, the one place the settings live; and the bugs found while reshaping."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from rnnlm.data.lm import LMDataModule
from rnnlm.errors import ConfigError, UserError
from rnnlm.network.config import FORMAT_VERSION, RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.training.callbacks import NonFiniteGuard, NonFiniteLossError
from rnnlm.training.lm import LanguageModel


def test_config_round_trips_through_json():
    config = RNNLMConfig(vocab_size=50, cell="gru", num_layers=3, hidden_sizes=[16, 16, 8], embedding_dim=8,
                         tie_weights=True, weight_drop=0.3, locked_dropout=True)
    text = json.dumps(config.to_dict())
    again = RNNLMConfig.from_dict(json.loads(text))
    assert again == config and hash(again) == hash(config)
    assert json.loads(text)["format_version"] == FORMAT_VERSION and json.loads(text)["hidden_sizes"] == [16, 16, 8]


def test_config_is_frozen_and_refuses_unknown_keys_and_future_formats():
    config = RNNLMConfig(vocab_size=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cell = "gru"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="Unknown model setting.*hiden_size"):
        RNNLMConfig.from_dict({"vocab_size": 10, "hiden_size": 3})
    with pytest.raises(ConfigError, match="newer than this rnnlm reads"):
        RNNLMConfig.from_dict({"vocab_size": 10, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ConfigError, match="no vocab_size"):
        RNNLMConfig.from_dict({"cell": "lstm"})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cell": "lstn"}, "Unknown cell"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"hidden_size": True}, "hidden_size must be a positive integer"),
        ({"dropout_output": 1.0}, r"dropout_output must be a probability in \[0, 1\)"),
        ({"hidden_sizes": [8]}, "hidden_sizes has 1 entries but num_layers is 2"),
        ({"input_mode": "one_hot", "tie_weights": True}, "tie_weights needs an embedding table"),
        ({"output": "adaptive"}, "below the smallest default cutoff"),
        ({"output": "adaptive", "adaptive_cutoffs": [5, 3]}, "adaptive_cutoffs must be increasing"),
    ],
)
def test_bad_settings_raise_one_error_type(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        RNNLMConfig(vocab_size=100, **settings)
    assert isinstance(info.value, UserError)


def test_architecture_leaves_out_the_regularisers():
    a = RNNLMConfig(vocab_size=10, dropout_output=0.5, weight_drop=0.2)
    b = RNNLMConfig(vocab_size=10)
    assert a.architecture() == b.architecture()
    assert a.architecture() != RNNLMConfig(vocab_size=11).architecture()


@pytest.mark.parametrize("settings", [{"weight_drop": 0.3}, {"hidden_sizes": [12, 6]},
                                      {"locked_dropout": True, "dropout_between": 0.2}])
def test_one_hot_inputs_work_with_a_layer_by_layer_stack(settings):
    """Bug: one-hot inputs read the fused module's weight_ih_l0 for their dtype, which a LayerStack lacks."""
    torch.manual_seed(0)
    model = RNNLM(RNNLMConfig(vocab_size=13, input_mode="one_hot", hidden_size=12, **settings))
    idx = torch.randint(0, 13, (2, 7))
    out = model(idx, idx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.eval()(idx).logits.shape == (2, 7, 13)


def test_lightning_module_saves_the_config_as_plain_types(corpus_dir, tmp_path):
    config = RNNLMConfig(vocab_size=20, hidden_sizes=[8, 4], embedding_dim=4, tie_weights=True)
    model = LanguageModel(config)
    assert model.hparams["config"] == config.to_dict() and model.config is config
    assert LanguageModel(config.to_dict()).config == config  # what a checkpoint holds builds the same model


class _NanGradientAt(L.Callback):
    """Makes one parameter's gradient NaN at one step, leaving the loss finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(pl_module.parameters()).grad.view(-1)[0] = float("nan")


def _tiny(corpus_dir, tmp_path, policy: str, callbacks: list) -> tuple[L.Trainer, LanguageModel, LMDataModule]:
    data = LMDataModule(source=str(corpus_dir), tokenizer="char", batch_size=4, bptt=9,
                        cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = LanguageModel(RNNLMConfig(vocab_size=data.vocab_size, embedding_dim=8, hidden_size=16),
                          on_nonfinite=policy)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, log_every_n_steps=50, callbacks=callbacks)
    return trainer, model, data


def test_a_nan_gradient_with_a_finite_loss_stops_on_any_step(corpus_dir, tmp_path):
    """Bug: gradients were checked only on the steps the loggers write (every log_every_n_steps)."""
    trainer, model, data = _tiny(corpus_dir, tmp_path, "stop", [_NanGradientAt(3)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3  # stopped before the NaN reached the weights
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_a_nan_gradient_step_is_skipped_when_asked(corpus_dir, tmp_path):
    trainer, model, data = _tiny(corpus_dir, tmp_path, "skip", [_NanGradientAt(3)])
    with pytest.warns(UserWarning, match="step skipped"):
        trainer.fit(model, datamodule=data)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped_steps == 1 and all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_old_model_setting_paths_get_a_clear_error(corpus_dir, tmp_path):
    from rnnlm.fit import main as fit_main

    with pytest.raises(ConfigError, match=r"--model.cell \(now --model.config.cell\)"):
        fit_main(["--data.source", str(corpus_dir), "--model.cell", "gru"])
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  cell: gru\n  hidden_size: 8\n")
    with pytest.raises(ConfigError, match="model: cell: in .*old.yaml \\(now model: config: cell:\\)"):
        fit_main(["--config", str(old)])


@pytest.mark.slow
@pytest.mark.parametrize("command", ["rnnlm.generate", "rnnlm.evaluate"])
def test_entry_points_report_a_bad_checkpoint_without_a_traceback(tmp_path, command):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"abc")
    done = subprocess.run([sys.executable, "-m", command, "--checkpoint", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "bad.ckpt" in done.stderr and "rnnlm: error:" in done.stderr
    debug = subprocess.run([sys.executable, "-m", command, "--checkpoint", str(bad)], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "RNNLM_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_loading_and_sampling_need_no_lightning(corpus_dir, tmp_path):
    """rnnlm.load and the model import neither Lightning nor the training code."""
    code = ("import sys, rnnlm; from rnnlm.sharing.lm import load, sample; "
            "assert not any(m == 'lightning' or m.startswith(('lightning.', 'rnnlm.training')) for m in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
