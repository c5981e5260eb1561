"""Bidirectional language models: no look-ahead at any layer, state carried in both directions, every token once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIG_DIR, run_fit, tiny_data, tiny_trainer

from rnnlm.network.config import CELLS, RNNLMConfig
from rnnlm.network.lm import RNNLM, detach_state
from rnnlm.text.streams import ChunkLoader, cut_streams
from rnnlm.training.lm import LanguageModel


def bilm(cell: str, num_layers: int, **kwargs) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(RNNLMConfig(17, cell=cell, num_layers=num_layers, embedding_dim=6, hidden_size=16,
                             bidirectional=True, **kwargs)).eval()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_no_look_ahead_at_any_layer(cell, num_layers):
    """Forward output at t has zero gradient w.r.t. inputs after t; backward output at t w.r.t. inputs before t."""
    model = bilm(cell, num_layers)
    idx = torch.randint(0, 17, (2, 9))
    T = idx.size(1)
    for direction in ("forward", "backward"):
        x = model._embed(idx, direction).detach().requires_grad_(True)  # original (left-to-right) order
        read = x if direction == "forward" else x.flip(1)
        layers = model._layer_outputs(read, direction)[0]
        assert len(layers) == num_layers
        for layer, out in enumerate(layers):
            if direction == "backward":
                out = out.flip(1)  # back to original positions: out[:, t] has read tokens t..T-1
            readable = 0.0
            for t in range(T):
                (grad,) = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
                seen = grad.abs().sum(dim=(0, 2))
                unseen = seen[t + 1 :] if direction == "forward" else seen[:t]
                assert torch.all(unseen == 0), f"{direction} layer {layer} position {t} sees {unseen}"
                readable += float(seen[: t + 1].sum() if direction == "forward" else seen[t:].sum())
            assert readable > 0  # the check is not vacuous: outputs do depend on the tokens they may read


@pytest.mark.parametrize("cell", CELLS)
def test_layer_outputs_match_the_fused_stack(cell):
    model = bilm(cell, 3)
    idx = torch.randint(0, 17, (2, 8))
    for direction in ("forward", "backward"):
        h, state = model._parts(direction)[1](model._embed(idx, direction))
        layers, layers_state = model.read_layers(idx, direction=direction)
        torch.testing.assert_close(layers[-1], h)
        torch.testing.assert_close(layers_state, state)  # the same format, so either can carry on from the other


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["fused", "layer by layer"])
def test_layers_read_in_pieces_match_one_pass(cell, per_layer):
    # Layers of two sizes make the stack run layer by layer (LayerStack), whose state is a list with one entry per
    # layer; the fused module's stacks its layers in one tensor.
    model = bilm(cell, 2, **({"hidden_sizes": [16, 12]} if per_layer else {}))
    assert model.config.per_layer == per_layer
    idx = torch.randint(0, 17, (3, 11))
    for direction in ("forward", "backward"):
        whole, _ = model.read_layers(idx, direction=direction)
        first, state = model.read_layers(idx[:, :4], direction=direction)
        second, _ = model.read_layers(idx[:, 4:], state, direction)
        for layer, (a, b, c) in enumerate(zip(whole, first, second, strict=True)):
            torch.testing.assert_close(torch.cat([b, c], dim=1), a, msg=f"{direction} layer {layer}")


def test_representations_concatenate_left_and_right_context():
    model = bilm("lstm", 2)
    idx = torch.randint(0, 17, (3, 10))
    top = model.representations(idx)
    layers = model.representations(idx, all_layers=True)
    assert top.shape == (3, 10, 32) and len(layers) == 2
    torch.testing.assert_close(layers[-1], top)
    # Forward half at t depends on idx[:, :t+1] only; backward half on idx[:, t:] only.
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 17
    other = model.representations(changed)
    torch.testing.assert_close(other[:, :6, :16], top[:, :6, :16])  # forward before 6: unchanged
    torch.testing.assert_close(other[:, 7:, 16:], top[:, 7:, 16:])  # backward after 6: unchanged
    assert not torch.allclose(other[:, 6:, :16], top[:, 6:, :16])
    assert not torch.allclose(other[:, :7, 16:], top[:, :7, 16:])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_carried_state_equals_one_long_pass_in_both_directions(cell, num_layers):
    model = bilm(cell, num_layers, share_directions=False)
    idx = torch.randint(0, 17, (3, 40))
    for direction, stream in (("forward", idx), ("backward", idx.flip(1))):
        full = model(stream, direction=direction).logits
        outs, state = [], None
        for start in range(0, stream.size(1), 6):
            out = model(stream[:, start : start + 6], state=state, direction=direction)
            state = detach_state(out.state)
            outs.append(out.logits)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_directions_have_their_own_stacks_and_share_io_unless_asked():
    shared = bilm("gru", 2)
    assert shared.rnn is not shared.rnn_backward
    assert shared.decoder_backward is shared.decoder and shared.embedding_backward is shared.embedding
    assert not shared.rnn.bidirectional and not shared.rnn_backward.bidirectional
    untied = bilm("gru", 2, share_directions=False)
    assert untied.decoder_backward is not untied.decoder and untied.embedding_backward is not untied.embedding


@pytest.mark.parametrize(("length", "streams", "bptt"), [(101, 3, 7), (64, 2, 9), (50, 1, 49)])
def test_each_direction_sees_every_token_once(length, streams, bptt):
    ids = np.arange(length)
    rows = cut_streams(ids, streams)
    loader = ChunkLoader(rows, bptt, bidirectional=True)
    batches = list(loader)
    fwd_targets = np.concatenate([b[1].numpy().ravel() for b in batches])
    bwd_targets = np.concatenate([b[3].numpy().ravel() for b in batches])
    assert sorted(fwd_targets) == sorted(rows[:, 1:].ravel())  # all but the first of each row, once
    assert sorted(bwd_targets) == sorted(rows[:, :-1].ravel())  # all but the last of each row, once
    for b in batches:
        assert torch.equal(b[3], b[2] - 1)  # backward targets are the previous tokens
    # Backward chunks continue right to left, no gap, no overlap (each chunk with the next: one pair fewer).
    for prev, nxt in zip(batches, batches[1:], strict=False):
        assert torch.equal(nxt[2][:, 0], prev[3][:, -1])


def test_trainer_reports_both_directions_and_their_mean(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path, batch_size=3, bptt=7, bidirectional=True)
    torch.manual_seed(1)
    model = LanguageModel(RNNLMConfig(data.vocab_size, num_layers=2, embedding_dim=8, hidden_size=12,
                                      bidirectional=True))
    trainer = tiny_trainer(tmp_path, max_steps=4, limit_val_batches=1.0)
    trainer.fit(model, datamodule=data)
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]

    rows = torch.from_numpy(data.loader("validation").rows.astype(np.int64))
    expected = {}
    with torch.no_grad():
        for direction, stream in (("forward", rows), ("backward", rows.flip(1))):
            logits = model.model.eval()(stream[:, :-1], direction=direction).logits
            expected[direction] = F.cross_entropy(logits.reshape(-1, logits.size(-1)), stream[:, 1:].reshape(-1))
    for direction in ("forward", "backward"):
        assert metrics[f"val/{direction}/loss"] == pytest.approx(expected[direction].item(), rel=1e-5)
    mean = (expected["forward"] + expected["backward"]).item() / 2
    assert metrics["val/loss"] == pytest.approx(mean, rel=1e-5)


def test_a_bidirectional_model_refuses_unidirectional_data(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path, batch_size=3, bptt=7)
    model = LanguageModel(RNNLMConfig(data.vocab_size, num_layers=1, embedding_dim=8, hidden_size=8,
                                      bidirectional=True))
    trainer = tiny_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="bidirectional"):
        trainer.fit(model, datamodule=data)


def test_bilm_config_runs_through_the_cli(corpus_dir, tmp_path, capsys):
    from rnnlm import evaluate

    cli = run_fit(
        tmp_path / "run", corpus_dir,
        "--model.config.embedding_dim", "16",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--sample.max_new_tokens", "5",
        config=CONFIG_DIR / "wikitext2_bilm.yaml", cache=tmp_path / "cache",
    )  # fmt: skip
    assert cli.datamodule.hparams.bidirectional  # linked from model.bidirectional
    ckpt = str(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")  # the run's final state
    result = evaluate.main(["--checkpoint", ckpt, "--split", "validation", "--batch_size", "2"])
    assert result["loss"] == pytest.approx((result["forward_loss"] + result["backward_loss"]) / 2, rel=1e-5)
    assert "backward" in capsys.readouterr().out
