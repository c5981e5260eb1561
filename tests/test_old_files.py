"""Files written by rnnlm before its modules moved into layers still work: checkpoints (a language model and a
classifier, both stopped mid-epoch) load, resume and export, exported folders load, and a config with an old class
path is answered with the new one. The files in tests/fixtures/legacy were made by its make.sh at commit 6f15990."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, ROOT

import rnnlm
from rnnlm import classify, export, fit
from rnnlm.errors import ConfigError
from rnnlm.sharing import classifier
from rnnlm.sharing.export import classifier_logits_difference, logits_difference

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
TINY = ("--data.batch_size", "2", "--data.bptt", "8", "--model.config.embedding_dim", "8",
        "--model.config.hidden_size", "16", "--sample.max_new_tokens", "0")  # as make.sh trained them


@pytest.fixture
def copies(tmp_path) -> Path:
    """The fixtures copied, so that nothing a test does can change them."""
    shutil.copytree(LEGACY, tmp_path / "legacy")
    return tmp_path / "legacy"


def test_an_old_lm_checkpoint_and_its_folder_load_with_the_same_logits(copies):
    ckpt, folder = rnnlm.load(copies / "lm_last.ckpt"), rnnlm.load(copies / "lm_folder")
    assert logits_difference(ckpt, folder) == (True, 0.0)
    assert ckpt.sample("the ", max_new_tokens=10, seed=0) == folder.sample("the ", max_new_tokens=10, seed=0)


def test_an_old_classifier_checkpoint_and_its_folder_predict_alike(copies):
    ckpt, folder = classifier.load(copies / "classifier_last.ckpt"), classifier.load(copies / "classifier_folder")
    assert classifier_logits_difference(ckpt, folder) == (True, 0.0)
    texts = ["abxcd", "gfe dab", "x"]
    assert ckpt.predict(texts) == folder.predict(texts)


def test_old_checkpoints_export_again(copies, tmp_path):
    for name in ("lm_last.ckpt", "classifier_last.ckpt"):
        result = export.main(["--checkpoint", str(copies / name), "--out", str(tmp_path / f"{name}.out")])
        assert result["logits_identical"]


def test_an_old_lm_checkpoint_resumes_mid_epoch(copies, tmp_path):
    run = tmp_path / "run"
    cli = fit.main(["--config", str(QUICKSTART), "--data.source", str(copies / "data" / "train.txt"),
                    "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(run),
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *TINY,
                    "--trainer.max_steps", "9", "--trainer.val_check_interval", "5", "--trainer.max_epochs", "1",
                    "--test_after_fit", "false", "--ckpt_path", str(copies / "lm_last.ckpt")])
    assert cli.trainer.global_step == 9  # went on from step 7


def test_an_old_classifier_checkpoint_resumes_mid_epoch(copies, tmp_path):
    cli = classify.main([
        "--config", str(ROOT / "configs" / "nsmc_sentiment_scratch.yaml"),
        "--data.source", str(copies / "data" / "labels.tsv"), "--data.text_field", "text",
        "--data.label_field", "label", "--data.revision", "null", "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "clf"),
        "--checkpoint.dirpath", str(tmp_path / "clf" / "checkpoints"), "--trainer.enable_progress_bar", "false",
        "--model.config.embedding_dim", "8", "--model.config.hidden_size", "16", "--model.head_hidden", "8",
        "--data.batch_size", "8", "--data.max_vocab_size", "50", "--trainer.max_epochs", "1",
        "--trainer.max_steps", "7", "--trainer.val_check_interval", "3", "--test_after_fit", "false",
        "--ckpt_path", str(copies / "classifier_last.ckpt"),
    ])  # fmt: skip
    assert cli.trainer.global_step == 7  # went on from step 5


def test_an_old_class_path_is_answered_with_the_new_one(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text((ROOT / "configs" / "nsmc_sentiment.yaml").read_text().replace(
        "rnnlm.training.ulmfit.SlantedTriangularLR", "rnnlm.ulmfit.SlantedTriangularLR"))
    with pytest.raises(ConfigError, match=r"rnnlm\.ulmfit\.SlantedTriangularLR is now "
                                          r"rnnlm\.training\.ulmfit\.SlantedTriangularLR"):
        classify.main(["--config", str(config)])
    with pytest.raises(ConfigError, match=r"rnnlm\.averaging\.NTASGD is now rnnlm\.training\.averaging\.NTASGD"):
        fit.main(["--config", str(QUICKSTART), "--trainer.callbacks+=rnnlm.averaging.NTASGD"])


def test_the_fixtures_were_not_rewritten():
    """The fixtures are old files on purpose: the package's current version must not have re-written them."""
    saved = torch.load(LEGACY / "lm_last.ckpt", weights_only=True, map_location="cpu")
    assert saved["rnnlm"]["version"] == "0.1.0" and "wandb_run" not in saved["rnnlm"]
