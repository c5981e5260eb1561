"""What only a CUDA GPU can show: the fused head on the device, its memory, cuDNN with weight drop, training and
evaluation on the GPU. Marked ``cuda`` (skipped without a GPU); ``scripts/gpu_check.sh`` runs them with
``pytest -m cuda``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_data, tiny_model, tiny_trainer

from rnnlm import evaluate
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.head import linear_cross_entropy
from rnnlm.network.lm import RNNLM, detach_state

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _problem(rows: int, dim: int, vocab: int, seed: int = 0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, device=CUDA, requires_grad=True)
    w = (torch.randn(vocab, dim, generator=g, device=CUDA) * 0.1).requires_grad_()
    b = (torch.randn(vocab, generator=g, device=CUDA) * 0.1).requires_grad_()
    y = torch.randint(0, vocab, (rows,), generator=g, device=CUDA)
    return x, w, b, y


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_fused_head_equals_the_plain_head_on_the_gpu(block):
    x, w, b, y = _problem(301, 32, 997)
    fused = linear_cross_entropy(x, w, b, y, block)
    plain = F.cross_entropy(F.linear(x, w, b), y)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(fused, (x, w, b)), torch.autograd.grad(plain, (x, w, b)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_fused_head_under_bf16_autocast_on_the_gpu():
    x, w, b, y = _problem(257, 64, 5003)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = linear_cross_entropy(x, w, b, y, 100)
        plain = F.cross_entropy(F.linear(x, w, b).float(), y)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    for got, want in zip(torch.autograd.grad(fused, (x, w, b)), torch.autograd.grad(plain, (x, w, b)), strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=1e-4)


def test_fused_head_needs_a_fraction_of_the_plain_heads_gpu_memory():
    rows, vocab, dim = 4096, 32_000, 256  # logits: 500 MiB in float32
    x, w, b, y = _problem(rows, dim, vocab)
    peaks = {}
    for name, loss_of in (("plain", lambda: F.cross_entropy(F.linear(x, w, b), y)),
                          ("fused", lambda: linear_cross_entropy(x, w, b, y, 256))):
        x.grad = w.grad = b.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_of().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["fused"] * 3 < peaks["plain"], peaks


def test_weight_drop_runs_on_packed_cudnn_weights_without_warnings():
    torch.manual_seed(0)
    model = RNNLM(RNNLMConfig(500, num_layers=3, hidden_sizes=[64, 64, 32], embedding_dim=32, tie_weights=True,
                              weight_drop=0.5, locked_dropout=True, dropout_between=0.2)).to(CUDA).train()
    idx = torch.randint(0, 500, (4, 20), device=CUDA)
    state = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = model(idx[:, :-1], idx[:, 1:], state)
            out.loss.backward()
            state = detach_state(out.state)
    assert not [w for w in caught if "contiguous chunk of memory" in str(w.message)]
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_and_validation_on_the_gpu_fused_and_plain(corpus_dir, tmp_path, precision):
    """Both heads train on the GPU; from the same weights they report the same validation loss."""
    data = tiny_data(corpus_dir, tmp_path, tokenizer="word", batch_size=4, bptt=9)
    losses = {}
    for name, rows in (("fused", 5), ("plain", 0)):
        torch.manual_seed(0)
        model = tiny_model(data.vocab_size, loss_block_rows=rows)
        tiny_trainer(tmp_path, accelerator="gpu", max_steps=10, limit_val_batches=0,
                     precision=precision).fit(model, datamodule=data)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if name == "fused":
            trained = {k: v.clone() for k, v in model.model.state_dict().items()}
        else:
            model.model.load_state_dict(trained)
        losses[name] = tiny_trainer(tmp_path, accelerator="gpu", limit_val_batches=5, precision=precision).validate(
            model, datamodule=data, verbose=False)[0]["val/loss"]
    tolerance = 1e-5 if precision == "32-true" else 1e-2
    assert losses["fused"] == pytest.approx(losses["plain"], rel=tolerance)


def test_evaluate_on_the_gpu_equals_the_cpu(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path, tokenizer="word")
    torch.manual_seed(0)
    model = tiny_model(data.vocab_size, loss_block_rows=7)
    trainer = tiny_trainer(tmp_path, max_steps=5, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    on_gpu = evaluate.evaluate(str(ckpt), "test", accelerator="cuda")
    on_cpu = evaluate.evaluate(str(ckpt), "test", accelerator="cpu")
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)


@pytest.mark.parametrize("pooling", ["none", "concat"])
def test_embed_reads_in_pieces_on_the_gpu_as_on_the_cpu(monkeypatch, pooling):
    from rnnlm import embed
    from rnnlm.text.batching import make_batch

    monkeypatch.setattr(embed, "PIECE", 7)
    torch.manual_seed(0)
    model = RNNLM(RNNLMConfig(13, num_layers=2, embedding_dim=5, hidden_size=6, bidirectional=True)).eval()
    batch = make_batch([torch.randint(1, 13, (n,)).numpy() for n in (29, 20, 1, 14)], separator=0)

    def features(device):
        writer = embed.FeatureWriter(embed.FeatureModel(model.to(device), None, 1 << 20, "language model"), pooling,
                                     "all")
        return writer.features(batch.ids.to(device), batch.lengths.to(device))

    on_cpu = features("cpu")
    on_gpu = features(CUDA)  # handed back in host memory, piece by piece
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-4)  # cuDNN may use TF32
