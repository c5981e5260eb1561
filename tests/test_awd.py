"""AWD-LSTM parts: weight drop, locked and word dropout, per-layer sizes, AR/TAR, variable-length BPTT, NT-ASGD and
the continuous pointer."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_data, tiny_trainer

import rnnlm
from rnnlm import evaluate
from rnnlm.errors import UserError
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM, LayerStack, LockedDropout, detach_state
from rnnlm.network.pointer import ContinuousPointer
from rnnlm.text.sources import DataError
from rnnlm.text.streams import ChunkLoader, draw_spans, rank_rows
from rnnlm.training.averaging import NTASGD
from rnnlm.training.lm import LanguageModel


# ----------------------------------------------------------------------------------------- model
def test_layer_stack_without_regularisation_equals_the_fused_stack():
    """Run layer by layer (as weight drop needs) with the fused module's weights: the same function."""
    torch.manual_seed(0)
    fused = RNNLM(RNNLMConfig(30, num_layers=3, embedding_dim=8, hidden_size=12)).eval()
    stacked = RNNLM(RNNLMConfig(30, num_layers=3, embedding_dim=8, hidden_size=12, weight_drop=0.5)).eval()
    assert isinstance(stacked.rnn, LayerStack) and not isinstance(fused.rnn, LayerStack)
    weights = {}
    for name, value in fused.state_dict().items():
        if name.startswith("rnn."):
            base, layer = name[4:].rsplit("_l", 1)
            name = f"rnn.layers.{layer}.{base}_l0"
        weights[name] = value
    stacked.load_state_dict(weights)
    idx = torch.randint(0, 30, (3, 17))
    torch.testing.assert_close(stacked(idx).logits, fused(idx).logits)


def test_weight_drop_is_dropconnect_on_the_recurrent_weights():
    """In training, each layer runs with W_hh masked by one DropConnect mask for the whole chunk (drawn in layer
    order from torch's RNG); gradients reach W_hh only through the kept entries."""
    torch.manual_seed(1)
    model = RNNLM(RNNLMConfig(20, num_layers=2, embedding_dim=6, hidden_size=8, weight_drop=0.5))
    idx = torch.randint(0, 20, (2, 11))
    torch.manual_seed(5)
    result = model(idx)
    out, state = result.logits, result.state
    out.sum().backward()

    reference = RNNLM(RNNLMConfig(20, num_layers=2, embedding_dim=6, hidden_size=8)).eval()
    torch.manual_seed(5)
    masks = [F.dropout(torch.ones_like(layer.weight_hh_l0), 0.5) for layer in model.rnn.layers]
    with torch.no_grad():
        reference.embedding.weight.copy_(model.embedding.weight)
        reference.decoder.load_state_dict(model.decoder.state_dict())
        for i, (layer, mask) in enumerate(zip(model.rnn.layers, masks, strict=True)):
            for name in ("weight_ih", "bias_ih", "bias_hh"):
                getattr(reference.rnn, f"{name}_l{i}").copy_(getattr(layer, f"{name}_l0"))
            reference.rnn.get_parameter(f"weight_hh_l{i}").copy_(layer.weight_hh_l0 * mask)
    expected = reference(idx).logits
    torch.testing.assert_close(out, expected)
    for layer, mask in zip(model.rnn.layers, masks, strict=True):
        assert 0.3 < (mask == 0).float().mean() < 0.7
        assert torch.all(layer.weight_hh_l0.grad[mask == 0] == 0)
        assert layer.weight_hh_l0.grad[mask > 0].abs().sum() > 0
    assert len(state) == 2 and state[0][0].shape == (1, 2, 8)  # one (h, c) per layer
    model.eval()
    torch.testing.assert_close(model(idx).logits, model(idx).logits)  # no dropping at evaluation


def test_locked_dropout_uses_one_mask_for_all_time_steps():
    drop = LockedDropout(0.5).train()
    out = drop(torch.ones(4, 30, 16))
    assert torch.all(out == out[:, :1])  # the same for every t
    assert set(out.unique().tolist()) == {0.0, 2.0}
    drop.eval()
    assert torch.equal(drop(torch.ones(2, 3, 4)), torch.ones(2, 3, 4))


def test_word_dropout_drops_whole_words():
    torch.manual_seed(2)
    model = RNNLM(RNNLMConfig(6, embedding_dim=5, hidden_size=5, dropout_words=0.5)).train()
    idx = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5] * 4])
    dropped = model._drop_words(model._embed(idx, "forward"), idx)
    ratio = dropped / model._embed(idx, "forward")
    scale = ratio[0, :, 0]
    assert torch.allclose(ratio, scale[None, :, None].expand_as(ratio))  # the whole vector is kept or dropped
    for word in range(6):
        assert scale[idx[0] == word].unique().numel() == 1  # a word is dropped everywhere in the chunk or nowhere
    assert set(scale.unique().tolist()) <= {0.0, 2.0}


def test_per_layer_sizes_tie_without_projection_and_carry_state():
    torch.manual_seed(3)
    model = RNNLM(RNNLMConfig(40, num_layers=3, embedding_dim=8, hidden_sizes=[16, 12, 8], tie_weights=True,
                              cell="gru")).eval()
    assert model.projection is None and model.decoder.weight is model.embedding.weight
    assert [layer.hidden_size for layer in model.rnn.layers] == [16, 12, 8]
    idx = torch.randint(0, 40, (3, 23))
    full = model(idx).logits
    outs, state = [], None
    for start in range(0, 23, 5):
        out = model(idx[:, start : start + 5], state=state)
        state = detach_state(out.state)
        outs.append(out.logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert [s.shape[-1] for s in state] == [16, 12, 8]
    with pytest.raises(ValueError, match="hidden_sizes has 2 entries but num_layers is 3"):
        RNNLM(RNNLMConfig(40, num_layers=3, hidden_sizes=[16, 8]))


def test_bidirectional_representations_with_per_layer_sizes():
    model = RNNLM(RNNLMConfig(30, num_layers=2, embedding_dim=6, hidden_sizes=[10, 6], bidirectional=True,
                              weight_drop=0.3)).eval()
    idx = torch.randint(0, 30, (2, 9))
    reps = model.representations(idx, all_layers=True)
    assert [r.shape for r in reps] == [(2, 9, 20), (2, 9, 12)]
    top = model(idx).outputs
    torch.testing.assert_close(reps[-1][..., :6], top)


def test_training_with_ar_tar_equals_a_hand_written_loop(corpus_dir, tmp_path):
    """The Trainer's loss is cross-entropy + alpha * mean(h_dropped^2) + beta * mean((h_t - h_{t-1})^2)."""
    data = tiny_data(corpus_dir, tmp_path, batch_size=3, bptt=7)
    torch.manual_seed(4)
    model = LanguageModel(RNNLMConfig(data.vocab_size, embedding_dim=8, hidden_size=16),
                          activation_regularization=2.0, temporal_activation_regularization=1.0)
    reference = RNNLM(RNNLMConfig(data.vocab_size, embedding_dim=8, hidden_size=16))
    reference.load_state_dict(model.model.state_dict())
    steps = 8
    tiny_trainer(tmp_path, max_steps=steps, limit_val_batches=0).fit(model, datamodule=data)

    opt = torch.optim.AdamW(reference.parameters(), lr=2e-3)
    state = None
    for step, (x, y) in enumerate(data.loader("train")):
        if step == steps:
            break
        out = reference(x, state=state)
        top, logits, state = out.outputs, out.logits, detach_state(out.state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss = loss + 2.0 * top.pow(2).mean() + 1.0 * (top[:, 1:] - top[:, :-1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(model.model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------- variable-length BPTT
def test_variable_spans_are_contiguous_cover_every_target_and_look_like_the_paper():
    spans = draw_spans(200_000, 70, seed=3, epoch=0)
    starts, lengths = np.array([s for s, _ in spans]), np.array([n for _, n in spans])
    assert starts[0] == 0 and np.array_equal(starts[1:], starts[:-1] + lengths[:-1])  # no gap, no overlap
    assert starts[-1] + lengths[-1] == 200_000 and lengths[:-1].min() >= 5 and lengths[-1] >= 1
    # 95% around 70, 5% around 35, standard deviation 5.
    assert 0.03 < (lengths < 52).mean() < 0.07
    long = lengths[lengths >= 52]
    assert abs(long.mean() - 69.5) < 0.5 and abs(long.std() - 5) < 0.5
    assert spans == draw_spans(200_000, 70, seed=3, epoch=0)
    assert spans != draw_spans(200_000, 70, seed=3, epoch=1)
    assert spans != draw_spans(200_000, 70, seed=4, epoch=0)


def test_variable_chunks_serve_every_target_once_in_order_and_ranks_agree():
    ids = np.arange(2 * 3 * 500, dtype=np.int64)
    loaders = [ChunkLoader(rank_rows(ids, 3, 2, r), 20, variable_length=True, seed=7, epoch=2) for r in (0, 1)]
    assert loaders[0].spans() == loaders[1].spans()  # equal steps on every DDP rank
    batches = list(loaders[1])
    assert len(batches) == len(loaders[1]) > 10
    assert len({x.size(1) for x, _ in batches}) > 3
    rows = loaders[1].rows
    assert np.array_equal(torch.cat([y for _, y in batches], 1).numpy(), rows[:, 1:])  # every target once
    assert np.array_equal(torch.cat([x for x, _ in batches], 1).numpy(), rows[:, :-1])  # x_{k+1} follows x_k
    again = ChunkLoader(rows, 20, variable_length=True, seed=7, epoch=0)
    again.set_epoch(2)  # a resumed run redraws the epoch's schedule
    assert again.spans() == loaders[1].spans()
    fixed = ChunkLoader(rows, 20)
    assert [n for _, n in fixed.spans()] == [20] * 24 + [19]


class _LengthProbe(L.Callback):
    """Records each step's chunk length and the learning rate its update used (plain SGD: the change of a weight
    divided by its gradient)."""

    def __init__(self):
        self.steps = []  # (epoch, chunk length, lr used by the step)
        self.batches_per_epoch = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.length = batch[0].size(1)
        bias = pl_module.model.decoder.bias
        self.before = bias.detach().clone()

    def on_after_backward(self, trainer, pl_module):
        self.grad = pl_module.model.decoder.bias.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        change = self.before - pl_module.model.decoder.bias.detach()
        used = (change[self.grad.abs() > 1e-6] / self.grad[self.grad.abs() > 1e-6]).median().item()
        self.steps.append((trainer.current_epoch, self.length, used))

    def on_train_epoch_start(self, trainer, pl_module):
        self.batches_per_epoch.append(trainer.num_training_batches)


def test_variable_bptt_through_the_trainer_scales_the_learning_rate(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path, batch_size=32, bptt=12, variable_bptt=True, variable_bptt_seed=5)
    model = LanguageModel(RNNLMConfig(data.vocab_size, embedding_dim=8, hidden_size=8))
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=2e-3)
    probe = _LengthProbe()
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[probe],
                           reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, datamodule=data)
    rows = data.loader("train").rows
    for epoch in (0, 1):
        expected = ChunkLoader(rows, 12, variable_length=True, seed=5, epoch=epoch).spans()
        assert len(expected) > 20
        steps = [s for s in probe.steps if s[0] == epoch]
        assert [n for _, n, _ in steps] == [n for _, n in expected]  # the epoch's whole schedule, in order
        assert probe.batches_per_epoch[epoch] == len(expected)  # the Trainer knew the epoch's exact length
        for _, n, lr in steps:
            assert lr == pytest.approx(2e-3 * n / 12, rel=1e-3)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 2e-3  # restored after every step
    with pytest.raises(DataError, match="reload_dataloaders_every_n_epochs: 1"):
        tiny_trainer(tmp_path, max_steps=1).fit(LanguageModel(RNNLMConfig(data.vocab_size, embedding_dim=8,
                                                                          hidden_size=8)),
                                                datamodule=data)


# ----------------------------------------------------------------------------------------- NT-ASGD
@pytest.mark.parametrize(
    ("history", "loss", "patience", "start"),
    [
        ([5.0, 4.0, 3.0], 3.5, 5, False),  # not enough checks yet
        ([5.0, 4.0, 3.0, 2.9, 2.8, 2.7], 4.9, 5, False),  # far worse than lately, but better than 5.0
        ([5.0, 4.0, 3.0, 2.9, 2.8, 2.7], 5.1, 5, True),
        ([3.0, 2.0, 2.5], 2.4, 1, True),  # best before the last check is 2.0
        ([3.0, 2.0, 1.5], 1.9, 1, False),
    ],
)
def test_non_monotone_trigger(history, loss, patience, start):
    """Averaging starts when the loss is worse than the best of the checks made more than `patience` checks ago."""
    assert NTASGD.should_start(history, loss, patience) is start


class _TriggerAtFirstCheck(NTASGD):
    @staticmethod
    def should_start(history, loss, patience):
        return len(history) == 0


class _Snapshots(L.Callback):
    def __init__(self):
        self.params = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _ntasgd_run(data, tmp_path, epochs, ckpt_path=None, snapshots=None):
    torch.manual_seed(6)
    model = LanguageModel(RNNLMConfig(data.vocab_size, embedding_dim=8, hidden_size=8))
    averager = _TriggerAtFirstCheck()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [averager, checkpoint] + ([snapshots] if snapshots else [])
    trainer = tiny_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True,
                           limit_train_batches=12, limit_val_batches=3, num_sanity_val_steps=0,
                           reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, averager, trainer


def test_ntasgd_averages_evaluates_with_averages_and_resumes_exactly(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path, bptt=12, variable_bptt=True)
    snapshots = _Snapshots()
    model, averager, trainer = _ntasgd_run(data, tmp_path / "a", 3, snapshots=snapshots)
    per_epoch = trainer.global_step // 3
    # Averaging starts at the first validation, at the end of epoch 0.
    assert averager.start_step is not None and averager.count == trainer.global_step - averager.start_step
    since = snapshots.params[averager.start_step :]
    assert len(since) == averager.count and averager.start_step == per_epoch
    for name, avg in averager.averages.items():
        torch.testing.assert_close(avg, torch.stack([s[name] for s in since]).mean(0), rtol=1e-5, atol=1e-6)
    # After training the model holds the averages; the checkpoint's weights are the averages too.
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, averager.averages[name])
    last = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True)
    for name, avg in averager.averages.items():
        torch.testing.assert_close(last["state_dict"][name], avg)
    # Validation ran on the averaged weights: the checkpoint's model reproduces the logged loss.
    trained = rnnlm.load(tmp_path / "a" / "ckpt" / "last.ckpt")
    loaded = LanguageModel(trained.config)
    loaded.model.load_state_dict(trained.model.state_dict())
    metrics = tiny_trainer(tmp_path, limit_val_batches=3).validate(loaded, datamodule=data, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(averager.history[-1], rel=1e-5)

    # Stop after 2 epochs (averaging under way), resume to 3: the same weights and averages as one uninterrupted run.
    _ntasgd_run(data, tmp_path / "b", 2)
    resumed, resumed_averager, _ = _ntasgd_run(data, tmp_path / "b", 3, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert resumed_averager.start_step == averager.start_step and resumed_averager.count == averager.count
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


# ----------------------------------------------------------------------------------------- continuous pointer
def test_pointer_matches_a_hand_computed_example():
    hidden = torch.tensor([[[1.0], [2.0], [0.0], [1.0]]])  # [B=1, T=4, D=1]
    targets = torch.tensor([[5, 6, 5, 6]])
    model_lp = torch.full((1, 4), math.log(0.1))
    cache = ContinuousPointer(window=2, theta=1.0, lam=0.5)
    got = cache.log_probs(hidden, targets, model_lp).exp()[0]
    e2 = math.exp(2)
    expected = [
        0.1,  # t=0: an empty pointer memory leaves the model alone
        0.5 * 0.1 + 0.5 * 0.0,  # t=1: the only slot (h=1, next=5) predicts 5, not 6
        0.5 * 0.1 + 0.5 * 0.5,  # t=2: h=0 scores both slots 0; the one predicting 5 has half the mass
        0.5 * 0.1 + 0.5 * e2 / (e2 + 1),  # t=3: window 2 sees slots 1 (score 2, next 6) and 2 (score 0, next 5)
    ]
    torch.testing.assert_close(got, torch.tensor(expected))
    assert cache.keys.shape == (1, 2, 1) and cache.values.tolist() == [[5, 6]]  # the last `window` pairs kept


def test_pointer_distribution_sums_to_one_and_agrees_with_the_mixture():
    torch.manual_seed(7)
    hidden, targets = torch.randn(3, 9, 5), torch.randint(0, 11, (3, 9))
    lp = torch.log_softmax(torch.randn(3, 9, 11), -1).gather(-1, targets[..., None]).squeeze(-1)
    cache = ContinuousPointer(window=6, theta=0.7, lam=1.0)
    cache.update(torch.randn(3, 4, 5), torch.randint(0, 11, (3, 4)))
    dist = cache.distribution(hidden, targets, 11)
    torch.testing.assert_close(dist.sum(-1), torch.ones(3, 9))
    mixed = cache.log_probs(hidden, targets, lp)  # lambda = 1: the pointer alone
    torch.testing.assert_close(mixed.exp(), dist.gather(-1, targets[..., None]).squeeze(-1))
    # Chunk by chunk equals all at once (the memory carries across chunks, the window slides).
    whole, parts = ContinuousPointer(4, 0.7, 0.3), ContinuousPointer(4, 0.7, 0.3)
    all_at_once = whole.log_probs(hidden, targets, lp)
    chunked = torch.cat([parts.log_probs(hidden[:, i : i + 2], targets[:, i : i + 2], lp[:, i : i + 2])
                         for i in range(0, 9, 2)], 1)
    torch.testing.assert_close(chunked, all_at_once)
    zero = ContinuousPointer(4, 0.7, 0.0)
    assert torch.equal(zero.log_probs(hidden, targets, lp), lp)  # lambda = 0 is exactly the model


def test_evaluate_with_pointer_reports_both_perplexities(corpus_dir, tmp_path, capsys):
    data = tiny_data(corpus_dir, tmp_path)
    torch.manual_seed(8)
    model = LanguageModel(RNNLMConfig(data.vocab_size, embedding_dim=8, hidden_sizes=[16, 8], tie_weights=True,
                                      weight_drop=0.2))
    trainer = tiny_trainer(tmp_path / "t", max_steps=30, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    plain = evaluate.evaluate(str(ckpt), "test", accelerator="cpu")
    off = evaluate.evaluate(str(ckpt), "test", accelerator="cpu", pointer_window=50, pointer_lambda=0.0)
    assert off["loss"] == pytest.approx(plain["loss"], rel=1e-5)  # the log-softmax path = the loss path
    tested = tiny_trainer(tmp_path / "t").test(model, datamodule=data, verbose=False)[0]
    assert plain["loss"] == pytest.approx(tested["test/loss"], rel=1e-5)  # rnnlm.evaluate == the Trainer's test
    assert off["pointer_loss"] == pytest.approx(off["loss"], rel=1e-6)
    result = evaluate.main(["--checkpoint", str(ckpt), "--pointer_window", "100", "--pointer_theta", "0.5",
                            "--pointer_lambda", "0.2"])
    out = capsys.readouterr().out
    assert "with the continuous pointer (window 100, theta 0.5, lambda 0.2)" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["pointer_ppl"] == pytest.approx(result["pointer_ppl"]) and last["ppl"] == pytest.approx(plain["ppl"])
    assert last["pointer_ppl"] != pytest.approx(last["ppl"])
    with pytest.raises(ValueError, match="window must be a positive"):
        ContinuousPointer(0, 1.0, 0.1)
    for old, new in (("--cache_window", "--pointer_window"), ("--cache_lambda", "--pointer_lambda")):
        with pytest.raises(UserError, match=f"{old} is now {new}"):  # one message, exit status 1 from cli()
            evaluate.main(["--checkpoint", str(ckpt), old, "100"])
