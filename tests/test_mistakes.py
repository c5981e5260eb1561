"""Fault injection: a user's mistake, a hostile file system or a damaged model, against every command it applies
to. Each case ends as promised: exit status 1, one message on stderr (no traceback), and every file that existed
before is byte-identical after (and no temporary file is left beside it)."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, ROOT

from rnnlm import classify, embed, evaluate, export, fit, generate, score
from rnnlm.training.run import run_lock

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture
def home(tmp_path, tiny_lm_checkpoint) -> Path:
    """A user's folder: a language model, its exported folder, a classifier, texts and earlier outputs."""
    shutil.copy(tiny_lm_checkpoint, tmp_path / "lm.ckpt")
    shutil.copy(LEGACY / "classifier_last.ckpt", tmp_path / "clf.ckpt")
    shutil.copytree(LEGACY / "lm_folder", tmp_path / "lm_folder")
    (tmp_path / "texts.txt").write_text("the cat sat\nabx dog\n")
    (tmp_path / "existing.jsonl").write_text('{"label": 1}\n')
    (tmp_path / "existing.parquet").write_bytes(b"PAR1 an earlier result")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(module, args, monkeypatch, capsys) -> str:
    """Run a command's entry point as the shell does; return its stderr after checking it failed as promised."""
    monkeypatch.setattr(sys, "argv", [f"python -m {module.__name__}", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        module.cli()
    err = capsys.readouterr().err
    assert stop.value.code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("rnnlm: error:")]
    assert len(lines) == 1, err
    return lines[0]


def expect(module, args, match: str, home: Path, monkeypatch, capsys) -> None:
    before = snapshot(home)
    message = run(module, args, monkeypatch, capsys)
    assert match.lower() in message.lower(), message
    after = snapshot(home)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed was changed"
    leftovers = [k for k in after if k not in before and (".tmp" in k or k.endswith((".jsonl", ".parquet")))]
    assert not leftovers, leftovers


# ------------------------------------------------------------------------------------------------ lost data
def test_a_missing_input_leaves_an_existing_output_as_it_was(home, monkeypatch, capsys):
    expect(classify, ["predict", "--checkpoint", home / "clf.ckpt", "--input", home / "missing.txt",
                      "--output", home / "existing.jsonl"], "does not exist", home, monkeypatch, capsys)
    expect(embed, ["--checkpoint", home / "lm.ckpt", "--input", home / "missing.txt",
                   "--out", home / "existing.parquet"], "does not exist", home, monkeypatch, capsys)


def test_an_output_that_is_the_input_is_refused(home, monkeypatch, capsys):
    expect(classify, ["predict", "--checkpoint", home / "clf.ckpt", "--input", home / "texts.txt",
                      "--output", home / "texts.txt"], "is the input", home, monkeypatch, capsys)


def test_export_never_replaces_the_folder_holding_its_checkpoint_or_the_working_folder(home, monkeypatch, capsys):
    run_dir = home / "run"
    run_dir.mkdir()
    shutil.copy(home / "lm.ckpt", run_dir / "last.ckpt")
    expect(export, ["--checkpoint", run_dir / "last.ckpt", "--out", run_dir, "--overwrite"],
           "holds the checkpoint", home, monkeypatch, capsys)
    monkeypatch.chdir(home)
    expect(export, ["--checkpoint", home / "lm.ckpt", "--out", ".", "--overwrite"], "the folder you are in",
           home, monkeypatch, capsys)


def test_an_output_that_is_a_folder_or_cannot_be_written_is_refused_before_any_work(home, monkeypatch, capsys):
    expect(classify, ["predict", "--checkpoint", home / "clf.ckpt", "--input", home / "texts.txt",
                      "--output", home / "lm_folder"], "is a folder", home, monkeypatch, capsys)
    expect(embed, ["--checkpoint", home / "lm.ckpt", "--input", home / "texts.txt", "--out",
                   home / "texts.txt" / "x.npz"], "is a file, not a folder", home, monkeypatch, capsys)
    locked = home / "locked"
    locked.mkdir()
    real_access = __import__("os").access
    monkeypatch.setattr("rnnlm.files.os.access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    expect(classify, ["predict", "--checkpoint", home / "clf.ckpt", "--input", home / "texts.txt",
                      "--output", locked / "out.jsonl"], "permission denied", home, monkeypatch, capsys)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_the_old_output_and_no_partial_file(home, monkeypatch, capsys):
    monkeypatch.setattr("rnnlm.files.os.fsync", _disk_full)
    expect(classify, ["predict", "--checkpoint", home / "clf.ckpt", "--input", home / "texts.txt",
                      "--output", home / "existing.jsonl"], "no space left", home, monkeypatch, capsys)
    expect(embed, ["--checkpoint", home / "lm.ckpt", "--input", home / "texts.txt",
                   "--out", home / "existing.parquet"], "no space left", home, monkeypatch, capsys)


def test_a_full_disk_during_a_checkpoint_write_is_one_message(home, tiny_lm_corpus, monkeypatch, capsys):
    monkeypatch.setattr("rnnlm.files.os.fsync", _disk_full)
    args = ["--config", QUICKSTART, "--data.source", tiny_lm_corpus, "--data.cache_dir", home / "cache",
            "--trainer.default_root_dir", home / "run", "--trainer.logger", "false", "--data.batch_size", "2",
            "--data.bptt", "8", "--model.config.hidden_size", "8", "--model.config.embedding_dim", "8",
            "--sample.max_new_tokens", "0", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false"]
    expect(fit, args, "no space left", home, monkeypatch, capsys)
    assert not list((home / "run").rglob("*.ckpt"))


# ------------------------------------------------------------------------------------------------ bad input
def test_text_that_is_not_utf8_is_one_message(home, monkeypatch, capsys):
    expect(classify, ["predict", "--checkpoint", home / "clf.ckpt", "--input", home / "latin1.txt"], "utf-8",
           home, monkeypatch, capsys)
    expect(embed, ["--checkpoint", home / "lm.ckpt", "--input", home / "latin1.txt", "--out", home / "f.npz"],
           "utf-8", home, monkeypatch, capsys)


def test_empty_input_is_refused_by_every_command_that_reads_lines(home, monkeypatch, capsys):
    expect(classify, ["predict", "--checkpoint", home / "clf.ckpt", "--input", home / "empty.txt",
                      "--output", home / "existing.jsonl"], "no line", home, monkeypatch, capsys)
    expect(embed, ["--checkpoint", home / "lm.ckpt", "--input", home / "empty.txt", "--out", home / "f.npz"],
           "no line", home, monkeypatch, capsys)
    expect(score, ["--checkpoint", home / "lm.ckpt", "--input", home / "empty.txt"], "nothing to score", home,
           monkeypatch, capsys)


def test_an_alphabet_too_large_for_a_unigram_vocabulary_is_one_message(home, monkeypatch, capsys):
    hangul = home / "hangul.txt"  # 50 syllables, the space and the newline, against a vocabulary of 20
    hangul.write_text("".join(" ".join(chr(0xAC00 + (i * 7 + j) % 50) * 3 for j in range(6)) + "\n" for i in range(60)))
    expect(fit, ["--config", QUICKSTART, "--data.source", hangul, "--data.cache_dir", home / "cache",
                 "--trainer.default_root_dir", home / "run", "--trainer.logger", "false", "--data.tokenizer", "unigram",
                 "--data.vocab_size", "20", "--sample.max_new_tokens", "0"],
           "has 52 distinct characters, more than data.vocab_size=20", home, monkeypatch, capsys)


# ------------------------------------------------------------------------------------------------ wrong model
def test_a_classifier_checkpoint_where_a_language_model_is_expected_is_named(home, tiny_lm_corpus, monkeypatch,
                                                                             capsys):
    for module, args in ((generate, ["--prompt", "a"]), (score, ["--input", home / "texts.txt"]),
                         (evaluate, [])):
        expect(module, ["--checkpoint", home / "clf.ckpt", *args], "text classifier", home, monkeypatch, capsys)
    expect(fit, ["--config", QUICKSTART, "--data.source", tiny_lm_corpus, "--trainer.default_root_dir",
                 home / "run", "--model.init_from", home / "clf.ckpt"], "text classifier", home, monkeypatch, capsys)


def test_a_folder_as_ckpt_path_is_answered_with_its_checkpoints(home, tiny_lm_corpus, monkeypatch, capsys):
    (home / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(home / "lm.ckpt", home / "run" / "checkpoints" / "last.ckpt")
    expect(fit, ["--config", QUICKSTART, "--data.source", tiny_lm_corpus, "--trainer.default_root_dir", home / "run",
                 "--ckpt_path", home / "run"], "is a folder", home, monkeypatch, capsys)


def test_settings_too_large_to_allocate_are_refused_before_the_model_is_built(home, monkeypatch, capsys):
    config = json.loads((home / "lm_folder" / "config.json").read_text())
    config["hidden_size"] = 10**7
    (home / "lm_folder" / "config.json").write_text(json.dumps(config))
    expect(generate, ["--checkpoint", home / "lm_folder", "--prompt", "a"], "GiB", home, monkeypatch, capsys)


def test_non_finite_weights_are_an_error_not_a_bare_nan(home, monkeypatch, capsys):
    saved = torch.load(home / "lm.ckpt", weights_only=True)
    for name, t in saved["state_dict"].items():
        if t.is_floating_point():
            saved["state_dict"][name] = torch.full_like(t, float("nan"))
    torch.save(saved, home / "nan.ckpt")
    expect(generate, ["--checkpoint", home / "nan.ckpt", "--prompt", "a"], "not finite", home, monkeypatch, capsys)
    expect(score, ["--checkpoint", home / "nan.ckpt", "--input", home / "texts.txt"], "not finite", home,
           monkeypatch, capsys)
    assert "NaN" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ arguments
def test_a_mistyped_flag_is_one_line_naming_the_closest(home, monkeypatch, capsys):
    expect(generate, ["--checkpoint", home / "lm.ckpt", "--temprature", "0.5"], "did you mean --temperature",
           home, monkeypatch, capsys)
    expect(fit, ["--config", QUICKSTART, "--trainer.max_stepz", "3"], "did you mean --trainer.max_steps",
           home, monkeypatch, capsys)


def test_a_malformed_config_names_the_file_and_line(home, monkeypatch, capsys):
    bad = home / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n data: [\n")
    expect(fit, ["--config", bad], "bad.yaml is not valid YAML, line", home, monkeypatch, capsys)
    expect(classify, ["--config", bad], "not valid YAML", home, monkeypatch, capsys)


# ------------------------------------------------------------------------------------------------ concurrency
def test_a_second_run_in_a_busy_run_folder_is_refused_with_who_holds_it(home, tiny_lm_corpus, monkeypatch, capsys):
    with run_lock(home / "run", "rnnlm.fit"):
        expect(fit, ["--config", QUICKSTART, "--data.source", tiny_lm_corpus, "--data.cache_dir", home / "cache",
                     "--trainer.default_root_dir", home / "run", "--trainer.logger", "false",
                     "--sample.max_new_tokens", "0"], "in use by process", home, monkeypatch, capsys)


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_start(home, tiny_lm_corpus):
    stale = home / "run" / "checkpoints" / ".last.ckpt.12345-0123abcd.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    keep = home / "run" / "notes.tmp"
    keep.write_text("not ours")
    fit.main(["--config", str(QUICKSTART), "--data.source", str(tiny_lm_corpus), "--data.cache_dir",
              str(home / "cache"), "--trainer.default_root_dir", str(home / "run"), "--trainer.logger", "false",
              "--data.batch_size", "2", "--data.bptt", "8", "--model.config.hidden_size", "8",
              "--sample.max_new_tokens", "0", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
              "--test_after_fit", "false", "--trainer.enable_progress_bar", "false"])
    assert not stale.exists() and keep.exists()


def test_the_fixtures_of_this_file_exist():
    assert (ROOT / "tests" / "fixtures" / "legacy" / "classifier_last.ckpt").is_file()
