"""Bad input fails with a clear error before training starts: what was wrong, what was expected, how to fix.

Each case is checked at the Python API (``load_corpus`` / ``LMDataModule`` / ``RNNLM``) and through the CLI,
``rnnlm.fit.main(args=[...])``.

How errors reach the CLI's caller (found by running it): LightningCLI (``run=False``) has jsonargparse build
the data module and the model in ``instantiate_classes``. An exception raised in a class's ``__init__``, or
while the linked ``data.vocab_size`` is computed (which loads the corpus and trains the tokenizer), propagates
unchanged: the original ``DataError`` / ``TokenizerError`` / ``ValueError``, neither wrapped nor turned into
``SystemExit``. The size check in ``LMDataModule.setup`` runs inside ``trainer.fit`` before the first step,
and Lightning re-raises it unchanged too. Only argument *parsing* errors (a value of the wrong type) end in
``SystemExit(2)`` with the message on stderr. Every CLI test also checks that no checkpoint was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import fit_args, make_text

import rnnlm.data.lm
from rnnlm import fit
from rnnlm.data.lm import LMDataModule
from rnnlm.errors import ConfigError
from rnnlm.network.config import CELLS, RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.text.sources import DataError, load_corpus
from rnnlm.text.tokenization import LEVELS, TokenizerError
from rnnlm.training.lm import LanguageModel

HUB_NAME = "no-such-org/no-such-dataset"


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    """A few thousand characters: enough to build a tokenizer, far too little for long chunks."""
    path = tmp_path / "small.txt"
    path.write_text(make_text(60, seed=7))
    return path


def cli_args(tmp_path: Path, source: str | Path, *extra: str) -> list[str]:
    return fit_args(tmp_path / "runs", source, "--model.config.hidden_size", "8", "--trainer.max_steps", "2",
                    "--trainer.logger", "false", *extra, cache=tmp_path / "cache")


def assert_not_trained(tmp_path: Path) -> None:
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert not ckpts, f"training ran before the error: {ckpts}"


def cli_error(exc_type: type[BaseException], tmp_path: Path, source: str | Path, *extra: str) -> str:
    """Run the CLI, expect ``exc_type`` (the original exception, see above) and return its message."""
    with pytest.raises(exc_type) as info:
        fit.main(cli_args(tmp_path, source, *extra))
    assert_not_trained(tmp_path)
    return str(info.value)


def data_module(tmp_path: Path, source: str | Path, **kwargs) -> LMDataModule:
    return LMDataModule(source=str(source), cache_dir=str(tmp_path / "cache"), **kwargs)


# ----------------------------------------------------------------------------- unknown Hub dataset
def _check_hub_message(msg: str) -> None:
    assert HUB_NAME in msg
    assert "Hugging Face Hub" in msg
    assert "local file" in msg  # how to fix: check the name, or give a local file/folder


def test_unknown_hub_dataset_load_corpus(tmp_path):
    with pytest.raises(DataError) as info:
        load_corpus(HUB_NAME, cache_dir=tmp_path / "cache")
    _check_hub_message(str(info.value))


def test_unknown_hub_dataset_data_module(tmp_path):
    dm = data_module(tmp_path, HUB_NAME)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    _check_hub_message(str(info.value))


def test_unknown_hub_dataset_cli(tmp_path):
    _check_hub_message(cli_error(DataError, tmp_path, HUB_NAME))


# --------------------------------------------------------------------------- missing file / folder
@pytest.mark.parametrize("source", ["./missing/train.txt", "missing/train.txt", "./missing_folder"])
def test_missing_relative_path_load_corpus(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        load_corpus(source, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert repr(source) in msg
    assert "does not exist" in msg
    assert "existing file or folder" in msg


@pytest.mark.parametrize("name", ["missing/train.txt", "missing_folder"])
def test_missing_absolute_path_data_module(tmp_path, name):
    source = tmp_path / name
    dm = data_module(tmp_path, source)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert str(source) in msg
    assert "does not exist" in msg


@pytest.mark.parametrize("source", ["./missing/train.txt", "./missing_folder"])
def test_missing_path_cli(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    msg = cli_error(DataError, tmp_path, source)
    assert repr(source) in msg
    assert "does not exist" in msg


def test_missing_relative_folder_without_dot_says_not_found_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        load_corpus("corpora/wikitext", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "corpora/wikitext" in msg
    assert "does not exist" in msg or "no local file or folder" in msg.lower()


# ------------------------------------------------------------------------------ missing text field
@pytest.fixture
def jsonl_without_text(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": make_text(2, seed=i), "id": i}) + "\n" for i in range(40)))
    return path


def _check_field_message(msg: str) -> None:
    assert "'text'" in msg  # what was asked for
    assert "'body'" in msg and "'id'" in msg  # the fields there are
    assert "data.text_field" in msg  # how to fix


def test_missing_text_field_load_corpus(tmp_path, jsonl_without_text):
    with pytest.raises(DataError) as info:
        load_corpus(str(jsonl_without_text), cache_dir=tmp_path / "cache")
    _check_field_message(str(info.value))


def test_missing_text_field_data_module(tmp_path, jsonl_without_text):
    dm = data_module(tmp_path, jsonl_without_text, text_field="content")
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "'content'" in msg and "'body'" in msg and "'id'" in msg


def test_missing_text_field_cli(tmp_path, jsonl_without_text):
    _check_field_message(cli_error(DataError, tmp_path, jsonl_without_text))


# ------------------------------------------------------------------------------------ empty corpus
EMPTY_TEXTS = {"empty": "", "whitespace": "  \n\n\t \n \n"}


def _check_empty_message(msg: str, source: Path) -> None:
    assert str(source) in msg
    assert "no text" in msg


@pytest.mark.parametrize(
    ("content", "sample_by"),
    [
        ("", "document"),
        (EMPTY_TEXTS["whitespace"], "document"),
        (EMPTY_TEXTS["whitespace"], "paragraph"),
        (EMPTY_TEXTS["whitespace"], "line"),
    ],
)
def test_empty_text_file_load_corpus(tmp_path, content, sample_by):
    path = tmp_path / "train.txt"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_corpus(str(path), sample_by=sample_by, cache_dir=tmp_path / "cache")
    _check_empty_message(str(info.value), path)


@pytest.mark.parametrize("sample_by", ["line", "paragraph"])
def test_empty_text_file_by_line_load_corpus(tmp_path, sample_by):
    path = tmp_path / "train.txt"
    path.write_text("")
    with pytest.raises(DataError) as info:
        load_corpus(str(path), sample_by=sample_by, cache_dir=tmp_path / "cache")
    _check_empty_message(str(info.value), path)


def test_empty_train_file_in_folder_by_line_data_module(tmp_path, corpus_dir):
    (corpus_dir / "train.txt").write_text("")
    dm = data_module(tmp_path, corpus_dir, sample_by="line")
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    _check_empty_message(str(info.value), corpus_dir)


@pytest.mark.parametrize("content", EMPTY_TEXTS.values(), ids=EMPTY_TEXTS.keys())
def test_empty_train_file_in_folder_data_module(tmp_path, corpus_dir, content):
    (corpus_dir / "train.txt").write_text(content)  # valid.txt and test.txt still hold text
    dm = data_module(tmp_path, corpus_dir)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    _check_empty_message(str(info.value), corpus_dir)


@pytest.mark.parametrize("content", EMPTY_TEXTS.values(), ids=EMPTY_TEXTS.keys())
def test_empty_text_file_cli(tmp_path, content):
    path = tmp_path / "train.txt"
    path.write_text(content)
    _check_empty_message(cli_error(DataError, tmp_path, path), path)


def test_empty_text_file_by_line_cli(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("")
    _check_empty_message(cli_error(DataError, tmp_path, path, "--data.sample_by", "line"), path)


def test_empty_text_field_in_jsonl_load_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": ""}\n{"text": "   "}\n{"text": "\\n"}\n')
    with pytest.raises(DataError) as info:
        load_corpus(str(path), cache_dir=tmp_path / "cache")
    assert "no text" in str(info.value)


def test_empty_corpus_message_says_how_to_fix(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(EMPTY_TEXTS["whitespace"])
    with pytest.raises(DataError) as info:
        load_corpus(str(path), cache_dir=tmp_path / "cache")
    assert "data.source" in str(info.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("train.jsonl", ""),
        ("train.json", ""),
        ("blank.jsonl", "\n\n"),
        ("train.csv", ""),
        ("header.csv", "text\n"),
    ],
)
def test_empty_structured_file_load_corpus(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_corpus(str(path), cache_dir=tmp_path / "cache")
    _check_empty_message(str(info.value), path)


def test_empty_jsonl_cli(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    msg = cli_error(DataError, tmp_path, path)
    assert str(path) in msg


# -------------------------------------------------------------------------------- corpus too small
def test_corpus_too_small_data_module(tmp_path, small_file):
    batch_size, bptt = 4, 1000
    dm = data_module(tmp_path, small_file, batch_size=batch_size, bptt=bptt)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "train split" in msg
    assert f"at least {batch_size * (bptt + 1):,}" in msg  # the minimum number of tokens
    assert "data.batch_size" in msg and "data.bptt" in msg  # how to fix


def test_corpus_too_small_cli(tmp_path, small_file):
    batch_size, bptt = 4, 1000
    msg = cli_error(
        DataError, tmp_path, small_file, "--data.batch_size", str(batch_size), "--data.bptt", str(bptt)
    )
    assert f"at least {batch_size * (bptt + 1):,}" in msg
    assert "data.batch_size" in msg and "data.bptt" in msg


def test_validation_split_too_small_data_module(tmp_path, small_file):
    # The training split is large enough; the validation split carved from 1% of the text is not.
    dm = data_module(tmp_path, small_file, batch_size=2, bptt=8, eval_batch_size=512, val_fraction=0.01)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "validation split" in msg
    assert f"at least {512 * 2:,}" in msg
    assert "data.eval_batch_size" in msg


# ------------------------------------------------------------------------------------ unknown cell
def _check_cell_message(msg: str) -> None:
    assert "'lstmm'" in msg
    for cell in ("rnn_tanh", "rnn_relu", "lstm", "gru"):
        assert cell in msg


def test_unknown_cell_model():
    assert set(CELLS) == {"rnn_tanh", "rnn_relu", "lstm", "gru"}
    with pytest.raises(ValueError) as info:
        RNNLM(RNNLMConfig(vocab_size=10, cell="lstmm"))
    _check_cell_message(str(info.value))


def test_unknown_cell_lightning_module():
    with pytest.raises(ValueError) as info:
        LanguageModel(RNNLMConfig(vocab_size=10, cell="lstmm"))
    _check_cell_message(str(info.value))


def test_unknown_cell_cli(tmp_path, small_file):
    _check_cell_message(cli_error(ValueError, tmp_path, small_file, "--model.config.cell", "lstmm"))


# ------------------------------------------------------------------------------- unknown tokenizer
@pytest.fixture
def corpus_must_not_load(monkeypatch):
    """Loading the corpus fails the test: the check under test must come before reading and tokenizing it."""

    def load_corpus(*args, **kwargs):
        raise AssertionError("the corpus was loaded before the bad setting was reported")

    monkeypatch.setattr(rnnlm.data.lm, "load_corpus", load_corpus)


@pytest.mark.parametrize(("typo", "meant"), [("chars", "char"), ("words", "word"), ("bpee", "bpe")])
def test_unknown_tokenizer_suggests_level_and_fails_fast(tmp_path, text_file, typo, meant, corpus_must_not_load):
    with pytest.raises(TokenizerError) as info:
        data_module(tmp_path, text_file, tokenizer=typo)
    msg = str(info.value)
    assert repr(typo) in msg
    assert f"did you mean {meant!r}" in msg
    for level in LEVELS:
        assert level in msg
    assert not (tmp_path / "cache").exists()  # nothing was read or trained


def test_unknown_tokenizer_cli_fails_fast(tmp_path, text_file, corpus_must_not_load):
    msg = cli_error(TokenizerError, tmp_path, text_file, "--data.tokenizer", "chars")
    assert "did you mean 'char'" in msg
    for level in LEVELS:
        assert level in msg
    assert not (tmp_path / "cache" / "tokenizers").exists()  # failed before the corpus was tokenized


def test_unknown_tokenizer_without_close_match_lists_levels(tmp_path, small_file):
    # Not a near miss of a level, so it is tried as a tokenizer.json path / Hub tokenizer (offline here).
    dm = data_module(tmp_path, small_file, tokenizer="character")
    with pytest.raises(TokenizerError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "'character'" in msg
    for level in LEVELS:
        assert level in msg


def test_unknown_tokenizer_without_close_match_cli(tmp_path, small_file):
    msg = cli_error(TokenizerError, tmp_path, small_file, "--data.tokenizer", "character")
    assert "'character'" in msg and "tokenizer.json" in msg


# ----------------------------------------------------------------------------- sizes <= 0, dropout
@pytest.mark.parametrize(("name", "value"), [("hidden_size", 0), ("num_layers", -1), ("embedding_dim", 0)])
def test_model_size_not_positive(name, value):
    with pytest.raises(ValueError) as info:
        RNNLM(RNNLMConfig(vocab_size=10, **{name: value}))
    msg = str(info.value)
    assert name in msg and "positive integer" in msg and repr(value) in msg


def test_model_vocab_size_not_positive():
    with pytest.raises(ValueError, match=r"vocab_size must be a positive integer, got 0"):
        RNNLM(RNNLMConfig(vocab_size=0))


@pytest.mark.parametrize(
    ("name", "value"), [("batch_size", 0), ("bptt", 0), ("batch_size", -3), ("eval_batch_size", 0)]
)
def test_data_size_not_positive(tmp_path, small_file, name, value):
    with pytest.raises(DataError) as info:
        data_module(tmp_path, small_file, **{name: value})
    msg = str(info.value)
    assert f"data.{name}" in msg and "positive integer" in msg and repr(value) in msg


@pytest.mark.parametrize("name", ["dropout_embedding", "dropout_between", "dropout_output"])
@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_dropout_out_of_range(name, value):
    with pytest.raises(ValueError) as info:
        RNNLM(RNNLMConfig(vocab_size=10, **{name: value}))
    msg = str(info.value)
    assert name in msg and "[0, 1)" in msg and repr(value) in msg


@pytest.mark.parametrize(
    ("option", "value", "exc_type", "expected"),
    [
        ("--model.config.hidden_size", "0", ValueError, "hidden_size must be a positive integer, got 0"),
        ("--model.config.num_layers", "-1", ValueError, "num_layers must be a positive integer, got -1"),
        ("--data.batch_size", "0", DataError, "data.batch_size must be a positive integer, got 0"),
        ("--data.bptt", "0", DataError, "data.bptt must be a positive integer, got 0"),
        ("--model.config.dropout_output", "1.5", ValueError, "dropout_output must be a probability in [0, 1), got 1.5"),
        ("--model.config.dropout_between", "-0.1", ValueError,
         "dropout_between must be a probability in [0, 1), got -0.1"),
    ],
)
def test_bad_size_or_dropout_cli(tmp_path, small_file, option, value, exc_type, expected):
    assert expected in cli_error(exc_type, tmp_path, small_file, option, value)


def test_wrongly_typed_value_cli_exits_with_parser_message(tmp_path, small_file, capsys):
    # A type error is caught by jsonargparse while parsing: one message (exit status 1 from the entry point), no
    # usage dump.
    with pytest.raises(ConfigError) as info:
        fit.main(cli_args(tmp_path, small_file, "--data.batch_size", "zero"))
    assert "data.batch_size" in str(info.value) and "zero" in str(info.value)
    assert "usage:" not in capsys.readouterr().err
    assert_not_trained(tmp_path)


# --------------------------------------------------------------------------- tie_weights + one_hot
def _check_tie_message(msg: str) -> None:
    assert "tie_weights" in msg and "one_hot" in msg
    assert "input_mode='embedding'" in msg or "tie_weights=false" in msg  # how to fix


def test_tie_weights_with_one_hot():
    with pytest.raises(ValueError) as info:
        RNNLMConfig(vocab_size=10, input_mode="one_hot", tie_weights=True)
    _check_tie_message(str(info.value))


def test_tie_weights_with_one_hot_cli(tmp_path, small_file):
    msg = cli_error(
        ValueError, tmp_path, small_file, "--model.config.tie_weights", "true", "--model.config.input_mode", "one_hot"
    )
    _check_tie_message(msg)


# ------------------------------------------------------------------------- unknown built-in corpus
def _check_builtin_message(msg: str) -> None:
    assert "'builtin:nope'" in msg
    assert "builtin:python-docs" in msg  # the choices


def test_unknown_builtin_load_corpus(tmp_path):
    with pytest.raises(DataError) as info:
        load_corpus("builtin:nope", cache_dir=tmp_path / "cache")
    _check_builtin_message(str(info.value))


def test_unknown_builtin_data_module(tmp_path):
    dm = data_module(tmp_path, "builtin:nope")
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    _check_builtin_message(str(info.value))


def test_unknown_builtin_cli(tmp_path):
    _check_builtin_message(cli_error(DataError, tmp_path, "builtin:nope"))
