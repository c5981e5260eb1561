"""The model card of an export, read as the Hub reads it (``huggingface_hub.ModelCard.load``): license, language,
datasets, base_model and model-index metrics in its metadata, the model's name as its title, no path of the machine
it was made on in any exported file, and the run's test result whichever checkpoint of the run is exported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_fit
from huggingface_hub import ModelCard

from rnnlm.export import main as export_main
from rnnlm.files import load_safely, save_atomically
from rnnlm.training.run import record_test_metrics

TEST_METRICS = {"loss": 1.5, "ppl": 4.4817, "bits_per_token": 2.164, "bpc": 2.164}
VAL_METRICS = {"step": 60, "loss": 1.6, "ppl": 4.953, "bits_per_token": 2.308, "bpc": 2.308}


def _checkpoint_with(source: Path, target: Path, **changes) -> Path:
    """A copy of ``source`` with top-level entries (and ``hyper_parameters`` ones) changed."""
    saved = load_safely(source)
    saved["hyper_parameters"].update(changes.pop("hyper_parameters", {}))
    saved.update(changes)
    # The shared checkpoint was saved without validation: its record gets the metrics a run's checkpoint has.
    saved["rnnlm"]["metrics"] = {"val": {**VAL_METRICS, "step": saved["global_step"]}}
    save_atomically(saved, target)
    return target


def _exported_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_card_has_the_hubs_metadata_and_no_local_path(tiny_lm_checkpoint, tmp_path, capsys):
    checkpoint = _checkpoint_with(tiny_lm_checkpoint, tmp_path / "run" / "last.ckpt")
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--license", "apache-2.0",
                 "--language", "en", "--name", "tiny-char-lstm"])
    assert "no license" not in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]
    assert card.data.library_name == "rnnlm" and card.data.pipeline_tag == "text-generation"
    assert card.data.datasets is None and card.data.base_model is None  # local data, trained from scratch
    assert card.text.lstrip().startswith("# tiny-char-lstm\n")
    assert "AutoModelForCausalLM.from_pretrained('out', trust_remote_code=True)" in card.text
    assert "rnnlm.load('out')" in card.text
    # The validation metrics measured on these very weights are the model-index.
    results = {(r.dataset_split, r.metric_type): r for r in card.data.eval_results}
    assert results[("validation", "perplexity")].metric_value == pytest.approx(VAL_METRICS["ppl"])
    assert results[("validation", "bpc")].metric_value == pytest.approx(VAL_METRICS["bpc"])
    assert results[("validation", "perplexity")].dataset_name == "corpus"  # the local folder, by its base name
    # No file of the folder holds the machine's path of the run (its data, cache) or of the export.
    for name, content in _exported_files(tmp_path / "out").items():
        for path in (tiny_lm_checkpoint.parent, tmp_path):
            assert str(path).encode() not in content, (name, path)


def test_without_license_or_language_the_card_says_so(tiny_lm_checkpoint, tmp_path, capsys):
    export_main(["--checkpoint", str(tiny_lm_checkpoint), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "no license" in line] == [
        "rnnlm: the model card has no license (give one with --license, e.g. apache-2.0 or mit)"]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license is None and card.data.language is None
    assert "- License: none was given" in card.text and "- Language: not recorded" in card.text


def test_a_bad_language_code_is_refused_before_anything_is_written(tiny_lm_checkpoint, tmp_path):
    from rnnlm.sharing.folders import PretrainedError

    with pytest.raises(PretrainedError, match="ISO 639 codes"):
        export_main(["--checkpoint", str(tiny_lm_checkpoint), "--out", str(tmp_path / "out"), "--language",
                     "English"])
    assert not (tmp_path / "out").exists()


def test_a_model_fine_tuned_from_a_hub_model_names_it_as_base_model(tiny_lm_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("rnnlm.sharing.export.push", lambda folder, repo, *args, **kwargs: f"https://hf.co/{repo}")
    tuned = _checkpoint_with(tiny_lm_checkpoint, tmp_path / "tuned.ckpt",
                             hyper_parameters={"init_from": "someone/tiny-base-lm", "init_vocab": "same"})
    export_main(["--checkpoint", str(tuned), "--push_to_hub", "me/tuned-lm", "--out", str(tmp_path / "out")])
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "someone/tiny-base-lm"
    assert "Fine-tuned from the model `someone/tiny-base-lm`" in card.text
    assert card.text.lstrip().startswith("# tuned-lm\n")  # the Hub repo's name, not the folder's
    assert "rnnlm.load('me/tuned-lm')" in card.text


def test_a_model_fine_tuned_from_a_local_model_shows_no_path(tiny_lm_checkpoint, tmp_path):
    base = tmp_path / "private" / "base.ckpt"
    base.parent.mkdir()
    shutil.copy(tiny_lm_checkpoint, base)
    tuned = _checkpoint_with(tiny_lm_checkpoint, tmp_path / "tuned.ckpt", hyper_parameters={"init_from": str(base)})
    export_main(["--checkpoint", str(tuned), "--out", str(tmp_path / "out")])
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None and "Fine-tuned from the local model `base.ckpt`" in card.text
    for name, content in _exported_files(tmp_path / "out").items():
        assert str(tmp_path).encode() not in content, name


def test_the_runs_test_result_shows_in_the_card_of_another_checkpoint(tiny_lm_checkpoint, tmp_path):
    """The run tests its best checkpoint; last.ckpt (a later step) gets the result too, labelled with the
    checkpoint measured, and its model-index keeps only what was measured on its own weights."""
    best = _checkpoint_with(tiny_lm_checkpoint, tmp_path / "epoch0-step30.ckpt", global_step=30)
    last = _checkpoint_with(tiny_lm_checkpoint, tmp_path / "last.ckpt")
    record_test_metrics(str(best), {**TEST_METRICS, "step": 60}, [str(best), str(last)])
    for path in (best, last):
        assert load_safely(path)["rnnlm"]["metrics"]["test"]["checkpoint"] == "epoch0-step30.ckpt"

    export_main(["--checkpoint", str(last), "--out", str(tmp_path / "from-last")])
    card = ModelCard.load(tmp_path / "from-last" / "README.md")
    assert "| test (`epoch0-step30.ckpt`, step 30) | 1.5000 | 4.48 |" in card.text
    assert "not on these weights (step 60)" in card.text
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}

    export_main(["--checkpoint", str(best), "--out", str(tmp_path / "from-best")])
    card = ModelCard.load(tmp_path / "from-best" / "README.md")
    assert "| test (`epoch0-step30.ckpt`, step 30) |" in card.text and "not on these weights" not in card.text
    test = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_split == "test"}
    assert test == {"perplexity": pytest.approx(4.4817), "bpc": pytest.approx(2.164)}


@pytest.mark.slow  # a training run through the CLI
def test_a_training_run_records_its_test_result_in_last_ckpt_and_exports_no_local_path(corpus_dir, tmp_path):
    cli = run_fit(tmp_path, corpus_dir, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                  "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2", "--trainer.logger", "false",
                  "--trainer.accelerator", "cpu", "--trainer.check_val_every_n_epoch", "null")
    folder = Path(cli.trainer.checkpoint_callback.dirpath)
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    tested = load_safely(best)["rnnlm"]["metrics"]["test"]
    assert tested["checkpoint"] == best.name and tested["step"] == load_safely(best)["global_step"]
    assert load_safely(folder / "last.ckpt")["rnnlm"]["metrics"]["test"] == tested

    export_main(["--checkpoint", str(folder / "last.ckpt"), "--out", str(tmp_path / "exported")])
    card = ModelCard.load(tmp_path / "exported" / "README.md")
    assert f"| test (`{best.name}`, step {tested['step']}) |" in card.text
    assert card.text.lstrip().startswith("# quickstart\n")  # the config's name, not the folder's
    assert "Config file: `configs/quickstart.yaml`" in card.text or "Config file: `quickstart.yaml`" in card.text
    for name, content in _exported_files(tmp_path / "exported").items():
        for path in (tmp_path, ROOT):
            assert str(path).encode() not in content, (name, path)
