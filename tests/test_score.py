"""Scoring text: per-item log-probabilities that batching never changes, the definitions of ``rnnlm.evaluate``,
and ``rnnlm.score``'s input, output and errors."""

from __future__ import annotations

import io
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_text, tiny_data, tiny_model, tiny_trainer

from rnnlm import score
from rnnlm.errors import ConfigError
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.score import Item, read_items, scores
from rnnlm.sharing.lm import TrainedModel, load
from rnnlm.text.encoding import encode_docs
from rnnlm.text.sources import DataError
from rnnlm.text.tokenization import Encoder, char_tokenizer, train_tokenizer

ITEMS = ["the cat sat on a mat", "", "a", "birds sang in tall green trees every morning", "dog ran", "x y z"]


# Not conftest's tiny_lm_checkpoint: the scores must tell training lines from noise, so this model reads whole
# lines (sample_by="line") and trains longer and wider.
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a small char-level LSTM trained on lines of English-like text, and its training lines."""
    root = tmp_path_factory.mktemp("score")
    text = make_text(600, seed=1)
    (root / "train.txt").write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
        data = tiny_data(root / "train.txt", root, sample_by="line", batch_size=16, bptt=32)
        torch.manual_seed(0)
        model = tiny_model(data.vocab_size, hidden_size=32)
        trainer = tiny_trainer(root, max_steps=120, limit_val_batches=0)
        trainer.fit(model, datamodule=data)
        path = root / "model.ckpt"
        trainer.save_checkpoint(path)
    return path, text.splitlines()


def _untrained(**settings) -> TrainedModel:
    tokenizer = char_tokenizer("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    config = RNNLMConfig(tokenizer.get_vocab_size(), embedding_dim=8, hidden_size=16, num_layers=2, **settings)
    return TrainedModel(model=RNNLM(config).eval(), tokenizer=tokenizer)


def _direct_logprob(lm: TrainedModel, text: str, direction: str = "forward") -> float:
    """The log-probability of ``text`` as a document, by one unbatched pass: [sep, ids] predicts [ids, sep]."""
    ids = lm.encoder.encode_text(text)
    if direction == "backward":
        ids = ids[::-1]
    row = torch.tensor([[lm.encoder.separator, *ids, lm.encoder.separator]])
    with torch.no_grad():
        out = lm.model(row[:, :-1], row[:, 1:], direction=direction)
    return -out.loss.item() * (len(ids) + 1)


def test_a_batch_gives_the_numbers_of_one_item_at_a_time(trained):
    lm = load(trained[0])
    alone = [scores(lm, [text])[0] for text in ITEMS]
    for batch_size in (2, 4, len(ITEMS)):
        batched = scores(lm, ITEMS, batch_size=batch_size)
        for a, b in zip(alone, batched, strict=True):
            assert (a["tokens"], a["characters"]) == (b["tokens"], b["characters"])
            assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-5, abs=1e-5)
    # Padded (a short item batched with a much longer one) == alone == one unbatched pass.
    padded = scores(lm, ["a", "birds sang in tall green trees " * 8], batch_size=2)[0]
    assert padded["logprob"] == pytest.approx(alone[2]["logprob"], rel=1e-5)
    for text, result in zip(ITEMS, alone, strict=True):
        assert result["logprob"] == pytest.approx(_direct_logprob(lm, text), rel=1e-5)


def test_items_longer_than_one_pass_carry_their_state(trained, monkeypatch):
    lm = load(trained[0])
    whole = scores(lm, ITEMS, batch_size=3)
    # Three steps per pass: items are read in pieces, rows that have ended leave the batch on the way.
    monkeypatch.setattr(score, "MAX_STEPS_PER_PASS", 3)
    pieces = scores(lm, ITEMS, batch_size=3)
    for a, b in zip(whole, pieces, strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-5, abs=1e-5)


def test_progress_is_reported_inside_a_long_item(trained, monkeypatch):
    """One long line is scored in passes; each pass reports its tokens, so a run on one huge line shows life, and
    the reports add up to every token predicted."""
    lm = load(trained[0])
    monkeypatch.setattr(score, "MAX_STEPS_PER_PASS", 4)
    counts: list[int] = []
    long_line = " ".join(ITEMS) * 3
    result = scores(lm, [long_line, "the cat"], batch_size=2, on_tokens=counts.append)
    assert len(counts) > 4 and all(c > 0 for c in counts)
    assert sum(counts) == sum(r["tokens"] for r in result)


def test_evaluate_reads_another_source_without_the_training_sources_hub_settings(trained, tmp_path):
    from rnnlm.evaluate import evaluate, evaluation_data

    # As if trained on a Hub dataset: its configuration and revision belong to that source, not to another one.
    trained_on = {**load(trained[0]).data, "config_name": "wikitext-2-raw-v1", "revision": "refs/convert/parquet"}
    own = evaluation_data(trained_on)
    assert (own.hparams.config_name, own.hparams.revision) == ("wikitext-2-raw-v1", "refs/convert/parquet")
    other = evaluation_data(trained_on, source="someone/reviews", batch_size=3)
    assert other.hparams.source == "someone/reviews" and other.hparams.eval_batch_size == 3
    assert (other.hparams.config_name, other.hparams.revision) == (None, None)
    assert other.hparams.text_field == trained_on["text_field"]  # the model's reading settings stay
    assert evaluation_data(trained_on, source="someone/wiki", config_name="en").hparams.config_name == "en"
    # A local source through the whole command.
    folder = tmp_path / "other"
    folder.mkdir()
    for name, seed in (("train.txt", 9), ("test.txt", 10)):
        (folder / name).write_text(make_text(60, seed=seed))
    result = evaluate(trained[0], split="test", source=str(folder), accelerator="cpu")
    assert result["source"] == str(folder) and result["tokens"] > 0


def test_the_definitions_of_evaluate(trained):
    lm = load(trained[0])
    results = scores(lm, ITEMS)
    # Tokens and characters are counted as the data pipeline counts a split read by line: the separator after
    # each line is one token and one character.
    _, stats = encode_docs(lm.encoder, ITEMS)
    assert sum(r["tokens"] for r in results) == stats.tokens
    assert sum(r["characters"] for r in results) == stats.characters
    for text, r in zip(ITEMS, results, strict=True):
        assert r["tokens"] == len(lm.encoder.encode_text(text)) + 1 and r["characters"] == len(text) + 1
        assert r["ppl"] == pytest.approx(math.exp(-r["logprob"] / r["tokens"]))
        assert r["bpc"] == pytest.approx(-r["logprob"] / math.log(2) / r["characters"])
    # The summary is token-weighted, as evaluate's loss over a split.
    totals = {"items": len(results), **{k: sum(r[k] for r in results) for k in ("tokens", "characters", "logprob")}}
    summary = score.summary(totals, ["forward"])
    assert summary["loss"] == pytest.approx(-totals["logprob"] / stats.tokens)
    assert summary["bpc"] == pytest.approx(summary["loss"] / math.log(2) / (stats.characters / stats.tokens))


def test_a_training_line_scores_lower_than_random_characters(trained):
    path, lines = trained
    lm = load(path)
    rng = random.Random(0)
    alphabet = sorted(set("".join(lines)))
    noise = ["".join(rng.choice(alphabet) for _ in range(len(line))) for line in lines[:20]]
    seen, random_chars = scores(lm, lines[:20]), scores(lm, noise)
    for a, b in zip(seen, random_chars, strict=True):
        assert a["ppl"] < b["ppl"]
    # Half a bit per character apart on average, after a short training.
    assert np.mean([r["bpc"] for r in seen]) < np.mean([r["bpc"] for r in random_chars]) - 0.5


def test_what_ends_an_item():
    lm = _untrained()
    sep, newline, none = (scores(lm, ["ab c", ""], end=end) for end in ("separator", "newline", "none"))
    assert [(r["tokens"], r["characters"]) for r in sep] == [(5, 5), (1, 1)]
    assert [(r["tokens"], r["characters"]) for r in newline] == [(5, 5), (1, 1)]  # "\n" is a token of its own here
    assert [(r["tokens"], r["characters"]) for r in none] == [(4, 4), (0, 0)]
    assert none[1]["logprob"] == 0.0 and none[1]["ppl"] is None and none[1]["bpc"] is None
    # Without the end, the log-probability is that of the item's own tokens: a prefix of the separator case.
    assert none[0]["logprob"] > sep[0]["logprob"]
    with pytest.raises(ConfigError, match="Unknown end"):
        scores(lm, ["a"], end="eos")


def test_bidirectional_models_score_with_both_directions():
    lm = _untrained(bidirectional=True)
    both = scores(lm, ITEMS, batch_size=4)
    for text, r in zip(ITEMS, both, strict=True):
        assert r["forward_logprob"] == pytest.approx(_direct_logprob(lm, text, "forward"), rel=1e-5)
        assert r["backward_logprob"] == pytest.approx(_direct_logprob(lm, text, "backward"), rel=1e-5)
        assert r["logprob"] == pytest.approx((r["forward_logprob"] + r["backward_logprob"]) / 2)
    backward = scores(lm, ITEMS, directions=["backward"])
    assert [r["logprob"] for r in backward] == pytest.approx([r["backward_logprob"] for r in both], rel=1e-5)
    with pytest.raises(ConfigError, match="bidirectional"):
        scores(_untrained(), ["a"], directions=["backward"])


@pytest.mark.parametrize("output", ["softmax", "adaptive"])
def test_log_probs_are_the_model_s_per_token_loss(output):
    torch.manual_seed(0)
    settings = {"output": "adaptive", "adaptive_cutoffs": [10, 20]} if output == "adaptive" else {}
    model = RNNLM(RNNLMConfig(40, embedding_dim=8, hidden_size=16, **settings)).eval()
    idx, targets = torch.randint(0, 40, (3, 7)), torch.randint(0, 40, (3, 7))
    with torch.no_grad():
        log_probs, state = model.log_probs(idx, targets)
        out = model(idx)
        expected = torch.log_softmax(out.logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        torch.testing.assert_close(log_probs, expected)
        torch.testing.assert_close(-log_probs.mean(), model(idx, targets).loss)
        torch.testing.assert_close(state, out.state)


@pytest.mark.parametrize("level", ["char", "byte", "word"])
def test_each_item_is_encoded_as_on_its_own(level):
    texts = ["the cat sat", "", "café naïve ☃", "dog  ran\tfar", "x"]
    encoder = Encoder(train_tokenizer(level, [make_text(50, seed=2), "café naïve"]))
    each = encoder.encode_each(texts)
    assert [e.tolist() for e in each] == [encoder.encode_text(t) for t in texts]
    assert np.concatenate([np.append(e, encoder.separator) for e in each]).tolist() == encoder.encode(texts).tolist()


def test_items_of_an_input():
    lines = ["first line\n", "\n", "  \n", "second\n", "paragraph\n", "\n", "\n", "third"]
    assert [(i.index, i.line, i.text) for i in read_items(lines, "line")] == [
        (0, 1, "first line"), (1, 2, ""), (2, 3, "  "), (3, 4, "second"), (4, 5, "paragraph"), (5, 6, ""),
        (6, 7, ""), (7, 8, "third")]
    assert list(read_items(lines, "paragraph")) == [
        Item(0, 1, "first line"), Item(1, 4, "second\nparagraph"), Item(2, 8, "third")]
    assert list(read_items(lines, "document")) == [Item(0, 1, "".join(lines))]
    assert list(read_items([], "document")) == []


def _main(capsys, *args: str) -> tuple[list[dict], str, dict]:
    summary = score.main(list(args))
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err, summary


def test_the_command_writes_json_lines_in_input_order(trained, tmp_path, capsys):
    path, lines = trained
    # Lengths in no order, so that sorting by length for batching has something to undo.
    items = [lines[5], "", lines[1] + " " + lines[2], "zz", lines[7]]
    text_file = tmp_path / "input.txt"
    text_file.write_text("\n".join(items) + "\n")
    records, err, summary = _main(capsys, "--checkpoint", str(path), "--input", str(text_file), "--batch_size", "2",
                                  "--include_text")
    assert [(r["index"], r["line"], r["text"]) for r in records] == [(i, i + 1, t) for i, t in enumerate(items)]
    expected = scores(load(path), items)
    for record, result in zip(records, expected, strict=True):
        assert record["logprob"] == pytest.approx(result["logprob"], rel=1e-5)
    # The summary: stderr, readable and as JSON on its last line; nothing but the items on stdout.
    assert json.loads(err.strip().splitlines()[-1]) == summary
    assert summary["items"] == 5 and summary["tokens"] == sum(r["tokens"] for r in records)
    assert summary["loss"] == pytest.approx(-sum(r["logprob"] for r in records) / summary["tokens"])
    assert summary["tokens_per_second"] > 0 and "5 lines" in err


def test_the_command_reads_standard_input_and_paragraphs(trained, monkeypatch, capsys):
    path = str(trained[0])
    monkeypatch.setattr(sys, "stdin", io.StringIO("one two\nthree\n\n\nfour\n"))
    records, _, summary = _main(capsys, "--checkpoint", path, "--input", "-", "--per", "paragraph")
    assert [(r["line"], r["characters"]) for r in records] == [(1, len("one two\nthree") + 1), (5, 5)]
    assert summary["per"] == "paragraph"


def test_an_empty_input_is_a_clear_error(trained, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty: there is nothing to score"):
        score.main(["--checkpoint", str(trained[0]), "--input", str(empty)])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    with pytest.raises(DataError, match="blank lines make none"):
        score.main(["--checkpoint", str(trained[0]), "--input", str(blank), "--per", "paragraph"])
    assert capsys.readouterr().out == ""  # nothing written
    with pytest.raises(DataError, match="does not exist"):
        score.main(["--checkpoint", str(trained[0]), "--input", str(tmp_path / "missing.txt")])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        score.main(["--checkpoint", str(trained[0]), "--input", str(latin1)])
    with pytest.raises(ConfigError, match="bidirectional"):
        score.main(["--checkpoint", str(trained[0]), "--input", str(blank), "--direction", "backward"])


def test_the_lines_before_an_undecodable_byte_are_written(trained, tmp_path, capsys):
    """The message says that the items before the bad byte were written: they are, every one of them (a text
    stream decoding blocks of 8 KB would lose those in the bad byte's block), and the count is given."""
    capsys.readouterr()
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"the cat sat\r\na dog ran\n" + "café\n".encode("latin-1") + b"the end\n")
    with pytest.raises(DataError, match=r"line 3 has a byte .*; the 2 lines before it were written\."):
        score.main(["--checkpoint", str(trained[0]), "--input", str(mixed)])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r["characters"]) for r in records] == [(1, 12), (2, 10)]
    # A paragraph the bad byte falls in is incomplete: left out, and the message counts only what was written.
    with pytest.raises(DataError, match="nothing was written"):
        score.main(["--checkpoint", str(trained[0]), "--input", str(mixed), "--per", "paragraph"])
    assert capsys.readouterr().out == ""


def test_one_item_is_one_line_not_one_lines(trained, tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("the cat sat\n")
    score.main(["--checkpoint", str(trained[0]), "--input", str(one)])
    assert "rnnlm.score: 1 line, " in capsys.readouterr().err


@pytest.mark.slow
def test_the_entry_point_pipes(trained, tmp_path):
    path, lines = trained
    done = subprocess.run([sys.executable, "-m", "rnnlm.score", "--checkpoint", str(path), "--input", "-"],
                          input="\n".join(lines[:30]) + "\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len([json.loads(line) for line in done.stdout.splitlines()]) == 30
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    done = subprocess.run([sys.executable, "-m", "rnnlm.score", "--checkpoint", str(path), "--input", str(empty)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "rnnlm: error:" in done.stderr and "is empty" in done.stderr and "Traceback" not in done.stderr
