"""The fused softmax head (rnnlm/network/head.py): the same loss and gradients as F.cross_entropy(F.linear(...)), in
blocks, without the full logits, in every place the model computes a loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_data, tiny_model, tiny_trainer
from torch.utils._python_dispatch import TorchDispatchMode

import rnnlm
from rnnlm import evaluate
from rnnlm.errors import ConfigError
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.head import MIN_BLOCK_ROWS, auto_block_rows, linear_cross_entropy
from rnnlm.network.lm import RNNLM


def _problem(rows: int, dim: int = 6, vocab: int = 23, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, requires_grad=True)
    w = (torch.randn(vocab, dim, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (rows,), generator=g)
    return x, w, b, y


def _grads(loss: torch.Tensor, *tensors) -> list:
    return list(torch.autograd.grad(loss, [t for t in tensors if t is not None]))


# --------------------------------------------------------------------------------------------- the function
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("rows", "block"), [(37, 1), (37, 5), (37, 7), (37, 36), (37, 37), (37, 100), (1, 4)])
def test_loss_and_every_gradient_equal_the_plain_head(rows, block, bias):
    x, w, b, y = _problem(rows, bias=bias)
    fused = linear_cross_entropy(x, w, b, y, block)
    plain = F.cross_entropy(F.linear(x, w, b), y)
    torch.testing.assert_close(fused, plain)
    for got, want in zip(_grads(fused, x, w, b), _grads(plain, x, w, b), strict=True):
        torch.testing.assert_close(got, want)


def test_batched_features_ignored_targets_and_a_scaled_loss_as_in_cross_entropy():
    x, w, b, y = _problem(3 * 11)
    x3, y3 = x.view(3, 11, -1), y.view(3, 11).clone()
    y3[0, 2] = y3[2, 5] = -100  # F.cross_entropy's ignore_index: left out of the mean
    fused = linear_cross_entropy(x3, w, b, y3, 4)
    plain = F.cross_entropy(F.linear(x3, w, b).reshape(33, -1), y3.reshape(-1))
    torch.testing.assert_close(fused, plain)
    # The stored gradients are scaled by the incoming one (a loss weight, AR/TAR added, accumulation's 1/k).
    for got, want in zip(_grads(2.5 * fused + x.sum(), x, w, b), _grads(2.5 * plain + x.sum(), x, w, b), strict=True):
        torch.testing.assert_close(got, want)


def test_gradients_accumulate_over_calls_and_a_kept_graph_gives_them_again():
    x, w, b, y = _problem(20)
    loss = linear_cross_entropy(x, w, b, y, 3)
    loss.backward(retain_graph=True)
    loss.backward()  # accumulated twice, as autograd does for any loss
    reference = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    F.cross_entropy(F.linear(*reference), y).mul(2).backward()
    for got, want in zip((x, w, b), reference, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_only_the_gradients_asked_for_are_computed():
    x, w, b, y = _problem(9)
    frozen = w.detach()  # e.g. a frozen decoder: no weight gradient, but the features still get theirs
    fused = linear_cross_entropy(x, frozen, b, y, 2)
    plain = F.cross_entropy(F.linear(x, frozen, b), y)
    for got, want in zip(_grads(fused, x, b), _grads(plain, x, b), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_evaluation_computes_only_the_loss(mode):
    x, w, b, y = _problem(25)
    with getattr(torch, mode)():
        fused = linear_cross_entropy(x, w, b, y, 4)
        plain = F.cross_entropy(F.linear(x, w, b), y)
    assert fused.grad_fn is None
    torch.testing.assert_close(fused, plain)


class _Sizes(TorchDispatchMode):
    """Records the number of elements of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("grad", [True, False], ids=["training", "evaluation"])
def test_the_full_logits_never_exist(grad):
    rows, vocab, block = 60, 500, 17  # a block larger than the weight gradient's padded rows (16 floats)
    x, w, b, y = _problem(rows, dim=4, vocab=vocab)
    with torch.set_grad_enabled(grad), _Sizes() as sizes:
        loss = linear_cross_entropy(x, w, b, y, block)
        if grad:
            loss.backward()
    assert sizes.largest == block * vocab  # one block's logits, nothing of [rows, vocab]
    with _Sizes() as plain:
        F.cross_entropy(F.linear(x, w, b), y)
    assert plain.largest == rows * vocab


def test_bf16_autocast_runs_the_products_in_bf16_and_the_loss_in_float32():
    x, w, b, y = _problem(40, dim=16, vocab=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(x, w, b, y, 9)
        plain = F.cross_entropy(F.linear(x, w, b).float(), y)
    assert fused.dtype == torch.float32
    # The logits are the bf16 products in both, so the losses agree to float32 rounding.
    torch.testing.assert_close(fused, plain)
    grads = _grads(fused, x, w, b)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    exact = _grads(F.cross_entropy(F.linear(x, w, b), y), x, w, b)
    for got, want, bf16 in zip(grads, exact, _grads(plain, x, w, b), strict=True):
        # bf16 rounding of the products' operands: no further from the float32 gradient than the plain head is.
        limit = max((bf16 - want).abs().max().item() * 1.5, 1e-6)
        assert (got - want).abs().max().item() <= limit


def test_block_rows_is_checked():
    x, w, b, y = _problem(5)
    with pytest.raises(ValueError, match="block_rows must be >= 1"):
        linear_cross_entropy(x, w, b, y, 0)
    with pytest.raises(ValueError, match="5 positions but targets 4"):
        linear_cross_entropy(x, w, b, y[:4], 2)


def test_the_automatic_rule():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert auto_block_rows(105, 3200, cpu) == auto_block_rows(2000, 700, cpu) == 0  # the plain head
    rows = auto_block_rows(33_278, 700, cpu)  # the WikiText-2 word vocabulary: blocks of a few tens of MB
    assert MIN_BLOCK_ROWS <= rows < 700 and rows * 33_278 * 4 <= 32 << 20
    assert auto_block_rows(267_735, 700, cpu) == MIN_BLOCK_ROWS
    assert auto_block_rows(33_278, 700, gpu) == 0  # 93 MB of logits on a GPU: the plain head
    assert auto_block_rows(267_735, 80 * 70, gpu) > 0  # 6 GB of logits: blocks


# --------------------------------------------------------------------------------------------- the setting
def test_loss_block_rows_is_checked_and_changes_no_weight():
    for bad in (-1, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="loss_block_rows must be a whole number >= 0"):
            RNNLMConfig(50, loss_block_rows=bad)
    with pytest.raises(ConfigError, match="output='adaptive' computes its loss its own way"):
        RNNLMConfig(50, output="adaptive", adaptive_cutoffs=[10], loss_block_rows=8)
    assert RNNLMConfig(50, output="adaptive", adaptive_cutoffs=[10], loss_block_rows=0).loss_block_rows == 0
    fused, plain = RNNLMConfig(50, loss_block_rows=8), RNNLMConfig(50, loss_block_rows=0)
    assert fused.architecture() == plain.architecture() == RNNLMConfig(50).architecture()
    assert RNNLMConfig.from_dict(fused.to_dict()) == fused
    old = {k: v for k, v in RNNLMConfig(50).to_dict().items() if k != "loss_block_rows"}
    assert RNNLMConfig.from_dict(old).loss_block_rows is None  # configs written before the setting existed


# --------------------------------------------------------------------------------------------- the model
MODELS = {
    "untied": {},
    "tied": {"tie_weights": True, "embedding_dim": 8, "hidden_size": 8},
    "tied-projected": {"tie_weights": True, "embedding_dim": 6, "hidden_size": 10},
    "bidirectional": {"bidirectional": True},
    "per-layer-gru": {"cell": "gru", "hidden_sizes": [12, 8], "embedding_dim": 8, "tie_weights": True},
}


def _twins(vocab: int = 41, **settings) -> tuple[RNNLM, RNNLM]:
    base = {"cell": "lstm", "num_layers": 2, "embedding_dim": 8, "hidden_size": 12, **settings}
    torch.manual_seed(0)
    fused = RNNLM(RNNLMConfig(vocab, loss_block_rows=5, **base))
    plain = RNNLM(RNNLMConfig(vocab, loss_block_rows=0, **base))
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("settings", MODELS.values(), ids=MODELS.keys())
def test_model_loss_and_parameter_gradients_equal_the_plain_head(settings):
    """Every parameter's gradient (the embedding's through a tied decoder included), with AR/TAR-style terms on
    the outputs and features, in each direction."""
    fused, plain = _twins(**settings)
    idx, targets = torch.randint(0, 41, (3, 13)), torch.randint(0, 41, (3, 13))
    directions = ["forward", "backward"] if settings.get("bidirectional") else ["forward"]
    for model in (fused, plain):
        total = 0.0
        for direction in directions:
            out = model(idx, targets, direction=direction)
            tar = (out.outputs[:, 1:] - out.outputs[:, :-1]).pow(2).mean()
            total = total + out.loss + 0.5 * out.features.pow(2).mean() + tar
        total.backward()
        model.total = total.detach()
    torch.testing.assert_close(fused.total, plain.total)
    if settings.get("tie_weights"):
        assert fused.decoder.weight is fused.embedding.weight
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_without_targets_the_model_still_returns_the_logits():
    fused, plain = _twins()
    idx = torch.randint(0, 41, (2, 5))
    out = fused(idx)
    assert out.loss is None and out.logits.shape == (2, 5, 41)
    torch.testing.assert_close(out.logits, plain(idx).logits)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_with_the_fused_head_takes_the_plain_heads_steps(corpus_dir, tmp_path, accumulate):
    """Same weights in, the same weights out after several clipped SGD steps, with gradient accumulation too; then
    the same validation loss."""
    data = tiny_data(corpus_dir, tmp_path, tokenizer="word", batch_size=3, bptt=7)
    torch.manual_seed(3)
    fused = tiny_model(data.vocab_size, loss_block_rows=4, activation_regularization=1.0,
                       temporal_activation_regularization=1.0)
    plain = tiny_model(data.vocab_size, loss_block_rows=0, activation_regularization=1.0,
                       temporal_activation_regularization=1.0)
    plain.model.load_state_dict(fused.model.state_dict())
    initial = fused.model.decoder.weight.detach().clone()
    for model in (fused, plain):
        model.configure_optimizers = (lambda m: lambda: torch.optim.SGD(m.parameters(), lr=1.0))(model)
        tiny_trainer(tmp_path, max_steps=6, gradient_clip_val=0.5, limit_val_batches=0,
                     accumulate_grad_batches=accumulate).fit(model, datamodule=data)
    for (name, a), b in zip(fused.model.state_dict().items(), plain.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(fused.model.decoder.weight, initial)  # it trained
    metrics = [tiny_trainer(tmp_path, limit_val_batches=5).validate(m, datamodule=data, verbose=False)[0]
               for m in (fused, plain)]
    assert metrics[0]["val/loss"] == pytest.approx(metrics[1]["val/loss"], rel=1e-6)


def test_evaluate_with_the_fused_head_gives_the_exact_loss(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path, tokenizer="word", eval_batch_size=3)
    torch.manual_seed(0)
    model = tiny_model(data.vocab_size, loss_block_rows=5)
    trainer = tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "fused.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = rnnlm.load(ckpt)
    assert loaded.config.loss_block_rows == 5
    result = evaluate.evaluate(str(ckpt), "test", batch_size=3, accelerator="cpu")
    rows = torch.from_numpy(data.loader("test", batch_size=3).rows.astype("int64"))
    with torch.no_grad():
        logits = RNNLM(RNNLMConfig(**{**loaded.config.to_dict(), "loss_block_rows": 0})).eval()
        logits.load_state_dict(loaded.model.state_dict())
        out = logits(rows[:, :-1]).logits
    exact = F.cross_entropy(out.reshape(-1, out.size(-1)), rows[:, 1:].reshape(-1)).item()
    assert result["loss"] == pytest.approx(exact, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(exact), rel=1e-5)


def test_bf16_mixed_training_with_the_fused_head(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path, tokenizer="word")
    torch.manual_seed(0)
    model = tiny_model(data.vocab_size, loss_block_rows=6, tie_weights=True, embedding_dim=16)
    first = model.model(*next(iter(data.loader("train")))).loss.item()
    tiny_trainer(tmp_path, max_steps=20, limit_val_batches=0, precision="bf16-mixed").fit(model, datamodule=data)
    assert model.model(*next(iter(data.loader("train")))).loss.item() < first
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
