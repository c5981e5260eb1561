"""The faster paths give what the plain ones give: adaptive softmax, bf16-mixed, encoding in worker processes and
streamed, and the benchmark's hand-written training loop."""

from __future__ import annotations

import importlib.util
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text, tiny_data, tiny_model, tiny_trainer

import rnnlm
from rnnlm import evaluate
from rnnlm.data.lm import LMDataModule
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.text.encoding import EncodeStats, encode_to_file
from rnnlm.text.sources import DataError
from rnnlm.text.tokenization import Encoder, train_tokenizer


# --------------------------------------------------------------------------------------------- adaptive softmax
def _adaptive(**kwargs) -> RNNLM:
    torch.manual_seed(0)
    settings = dict(cell="lstm", num_layers=2, embedding_dim=8, hidden_size=12, output="adaptive",
                    adaptive_cutoffs=[5, 20], adaptive_div_value=2.0)
    return RNNLM(RNNLMConfig(60, **{**settings, **kwargs})).eval()


def test_adaptive_softmax_is_a_distribution_and_its_loss_is_the_mean_nll():
    model = _adaptive()
    idx, targets = torch.randint(0, 60, (3, 7)), torch.randint(0, 60, (3, 7))
    out = model(idx)
    log_probs, state = out.logits, out.state
    assert log_probs.shape == (3, 7, 60)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 7))
    scored = model(idx, targets)
    loss, state2 = scored.loss, scored.state
    expected = -log_probs.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, expected)
    # Treated as logits, the log-probabilities give the same cross-entropy (so callers need not care).
    torch.testing.assert_close(torch.nn.functional.cross_entropy(log_probs.reshape(-1, 60), targets.reshape(-1)),
                               expected)
    torch.testing.assert_close(state[0], state2[0])
    # Its parameters are a head plus narrower clusters, fewer than a full 12 x 60 decoder.
    assert sum(p.numel() for p in model.decoder.parameters()) < 12 * 60 + 60


def test_adaptive_softmax_settings_are_checked():
    with pytest.raises(ValueError, match="tie_weights is not supported with output='adaptive'"):
        _adaptive(tie_weights=True)
    with pytest.raises(ValueError, match="adaptive_cutoffs must be increasing"):
        _adaptive(adaptive_cutoffs=[20, 5])
    with pytest.raises(ValueError, match="adaptive_cutoffs must be increasing"):
        _adaptive(adaptive_cutoffs=[5, 59])
    with pytest.raises(ValueError, match="below the smallest default cutoff"):
        _adaptive(adaptive_cutoffs=None)
    with pytest.raises(ValueError, match="adaptive_div_value=4.0 leaves cluster 2 with no dimensions"):
        _adaptive(adaptive_div_value=4.0)
    with pytest.raises(ValueError, match="Unknown output"):
        _adaptive(output="sampled")
    assert RNNLM(RNNLMConfig(30_000, output="adaptive")).decoder.cutoffs == [2000, 10000, 30_000]


def test_adaptive_softmax_trains_checkpoints_generates_and_evaluates(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path, tokenizer="word")
    torch.manual_seed(0)
    model = tiny_model(data.vocab_size, output="adaptive", adaptive_cutoffs=[4, 12], adaptive_div_value=2.0)
    trainer = tiny_trainer(tmp_path, max_steps=30, limit_val_batches=0)
    first = model.model(*next(iter(data.loader("train")))).loss.item()
    trainer.fit(model, datamodule=data)
    assert model.model(*next(iter(data.loader("train")))).loss.item() < first  # it learns
    ckpt = tmp_path / "adaptive.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = rnnlm.load(ckpt)
    assert loaded.config.output == "adaptive" and loaded.model.decoder.cutoffs == [4, 12, data.vocab_size]
    for a, b in zip(model.model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    text = loaded.sample("the", max_new_tokens=5, seed=1)
    assert text == loaded.sample("the", max_new_tokens=5, seed=1) and text.strip()
    result = evaluate.evaluate(str(ckpt), "test", accelerator="cpu")
    rows = torch.from_numpy(data.loader("test").rows.astype("int64"))
    with torch.no_grad():
        log_probs = loaded.model(rows[:, :-1]).logits
    exact = -log_probs.gather(-1, rows[:, 1:, None]).mean().item()
    assert result["loss"] == pytest.approx(exact, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(exact), rel=1e-5)


# --------------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("output", ["softmax", "adaptive"])
def test_bf16_mixed_trains_on_cpu(corpus_dir, tmp_path, output):
    data = tiny_data(corpus_dir, tmp_path, tokenizer="word")
    torch.manual_seed(0)
    extra = {"adaptive_cutoffs": [4, 12], "adaptive_div_value": 2.0} if output == "adaptive" else {}
    model = tiny_model(data.vocab_size, output=output, **extra)
    tiny_trainer(tmp_path, max_steps=5, limit_val_batches=2, precision="bf16-mixed").fit(model, datamodule=data)
    logged = tiny_trainer(tmp_path, limit_val_batches=2, precision="bf16-mixed").validate(
        model, datamodule=data, verbose=False
    )[0]
    assert math.isfinite(logged["val/loss"]) and logged["val/loss"] < math.log(data.vocab_size) + 1
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed: the weights stay float32


# --------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("level", ["char", "byte", "word", "bpe"])
def test_encoding_in_worker_processes_gives_the_same_ids_and_counts(level):
    docs = [line for line in make_text(400, seed=5).split("\n")] + ["naïve café ☕", "", "tail"]
    tok = train_tokenizer(level, iter(docs), vocab_size=300 if level == "bpe" else None)
    enc = Encoder(tok)
    batches = [docs[i : i + 37] for i in range(0, len(docs), 37)]
    one, two = io.BytesIO(), io.BytesIO()
    stats_one = encode_to_file(batches, enc, one, workers=1, task_chars=500)
    stats_two = encode_to_file(batches, enc, two, workers=2, task_chars=500)  # many small tasks, kept in order
    assert one.getvalue() == two.getvalue() and stats_one == stats_two
    ids = np.frombuffer(two.getvalue(), dtype=enc.dtype)
    np.testing.assert_array_equal(ids, enc.encode(docs))  # the in-memory reference
    assert stats_two == EncodeStats(len(ids), len(docs), sum(len(d) + 1 for d in docs),
                                    sum(len(d.encode()) + 1 for d in docs))


def test_streaming_reads_the_same_ids_as_the_cached_dataset(corpus_dir, tmp_path):
    settings = dict(source=str(corpus_dir), tokenizer="word", sample_by="line", batch_size=4, bptt=8)
    plain = LMDataModule(**settings, cache_dir=str(tmp_path / "a"))
    streamed = LMDataModule(**settings, cache_dir=str(tmp_path / "b"), streaming=True, encode_workers=2)
    plain.setup("fit")
    streamed.setup("fit")
    assert streamed.tokenizer.to_str() == plain.tokenizer.to_str()
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(streamed.ids[split], plain.ids[split])
        assert isinstance(streamed.ids[split], np.memmap)
        for key in ("tokens", "documents", "characters", "bytes"):
            assert streamed.stats[split][key] == plain.stats[split][key]
    assert streamed.stats["train"]["workers"] == 2


def test_streaming_without_validation_split_is_refused_clearly(text_file, tmp_path):
    data = LMDataModule(source=str(text_file), streaming=True, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="has no validation and test split.*val_fraction"):
        data.setup("fit")
    ok = LMDataModule(source=str(text_file), streaming=True, val_fraction=0.0, test_fraction=0.0,
                      cache_dir=str(tmp_path / "c"), batch_size=4, bptt=8)
    ok.setup("fit")
    assert list(ok.ids) == ["train"] and ok.stats["train"]["tokens"] > 1000


# --------------------------------------------------------------------------------------------- the benchmark's loop
def _bench():
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_hand_written_loop_trains_the_same_model_as_rnnlm(corpus_dir, tmp_path):
    """The benchmark's hand-written loop and rnnlm, from the same weights, take the same SGD steps."""
    bench = _bench()
    data = tiny_data(corpus_dir, tmp_path, batch_size=3, bptt=7)
    data.setup("fit")
    torch.manual_seed(0)
    model = tiny_model(data.vocab_size)
    hand = bench.HandWrittenLM(model.config)
    hand.load_state_dict(model.model.state_dict())  # the same parameter names: embedding, rnn, decoder
    loop = bench.HandWrittenLoop(hand, data.ids["train"], 3, 7, torch.optim.SGD(hand.parameters(), lr=1.0), 0.5)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=1.0)
    tiny_trainer(tmp_path, max_steps=6, gradient_clip_val=0.5, limit_val_batches=0).fit(model, datamodule=data)
    for _ in range(6):
        loop.step()
    for name, p in hand.state_dict().items():
        torch.testing.assert_close(p, model.model.state_dict()[name], rtol=1e-4, atol=1e-5)
    val = loop.evaluate(data.ids["validation"], 4)
    metrics = tiny_trainer(tmp_path).validate(model, dataloaders=data.loader("validation", batch_size=4),
                                               verbose=False)[0]
    assert val == pytest.approx(metrics["val/loss"], rel=1e-4)


def test_hand_written_awd_loop_trains_the_same_model_as_rnnlm(corpus_dir, tmp_path):
    """With AWD-LSTM settings (per-layer sizes, tied weights, weight drop, locked and word dropout, AR/TAR) the
    hand-written loop, from the same weights and the same random stream, takes rnnlm's steps."""
    bench = _bench()
    data = tiny_data(corpus_dir, tmp_path, tokenizer="word", batch_size=3, bptt=7)
    data.setup("fit")
    torch.manual_seed(0)
    awd = dict(num_layers=3, hidden_sizes=[12, 10, 8], embedding_dim=8, tie_weights=True, locked_dropout=True,
               dropout_embedding=0.3, dropout_between=0.2, dropout_output=0.25, dropout_words=0.1, weight_drop=0.5)
    model = tiny_model(data.vocab_size, **awd, activation_regularization=2.0, temporal_activation_regularization=1.0)
    hand = bench.HandWrittenLM(model.config)
    hand.load_state_dict(model.model.state_dict())
    assert hand.decoder.weight is hand.embedding.weight
    loop = bench.HandWrittenLoop(hand, data.ids["train"], 3, 7, torch.optim.SGD(hand.parameters(), lr=1.0), 0.5,
                                 ar=2.0, tar=1.0)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=1.0)
    torch.manual_seed(5)
    tiny_trainer(tmp_path, max_steps=6, gradient_clip_val=0.5, limit_val_batches=0).fit(model, datamodule=data)
    torch.manual_seed(5)
    for _ in range(6):
        loop.step()
    for name, p in hand.state_dict().items():
        torch.testing.assert_close(p, model.model.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
