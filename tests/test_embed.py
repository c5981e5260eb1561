"""python -m rnnlm.embed: per-token and pooled features of forward and bidirectional models, in every format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text, tiny_data, tiny_model, tiny_trainer

import rnnlm
from rnnlm.embed import main
from rnnlm.errors import ConfigError

LINES = ["the cat sat", "", "a dog ran to the park", "birds"]


def _lm(root: Path, **settings) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(make_text(200, seed=7))
    bidirectional = settings.get("bidirectional", False)
    data = tiny_data(root / "train.txt", root, bidirectional=bidirectional)
    model = tiny_model(data.vocab_size, **settings)
    trainer = tiny_trainer(root, max_steps=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(root / "lm.ckpt")
    return root / "lm.ckpt"


@pytest.fixture
def forward_lm(tiny_lm_checkpoint) -> Path:
    return tiny_lm_checkpoint


@pytest.fixture(scope="module")
def bilm(tmp_path_factory) -> Path:
    # Its own model: embedding both directions needs a bidirectional LM (conftest's shared one is forward only).
    return _lm(tmp_path_factory.mktemp("bi"), bidirectional=True, num_layers=2)


@pytest.fixture
def lines(tmp_path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


def _ids(lm, text: str) -> torch.Tensor:
    return torch.tensor([[lm.encoder.separator, *lm.encoder.encode_text(text)]])


def test_per_token_states_of_a_forward_lm_to_parquet(forward_lm, lines, tmp_path, capsys):
    import pyarrow.parquet as pq

    summary = main(["--checkpoint", str(forward_lm), "--input", str(lines), "--out", str(tmp_path / "f.parquet"),
                    "--batch_size", "2"])
    assert summary["lines"] == 4 and summary["empty"] == 1
    assert "; 1 empty line\n" in capsys.readouterr().err  # not "1 empty lines"
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.column_names == ["line", "tokens", "states"]
    assert json.loads(table.schema.metadata[b"rnnlm"])["shape"] == [16]
    rows = table.to_pylist()
    assert [row["line"] for row in rows] == [1, 2, 3, 4]  # numbered from 1, as rnnlm.score numbers them
    lm = rnnlm.load(forward_lm)
    for row, text in zip(rows, LINES, strict=True):
        assert "".join(row["tokens"]) == text
        if not text:
            assert row["states"] == []
            continue
        expected = lm.model.encode(_ids(lm, text))[0][0, 1:]
        np.testing.assert_allclose(np.array(row["states"]), expected.detach().numpy(), atol=1e-5)


def test_per_token_states_of_a_bidirectional_lm_align_both_directions(bilm, lines, tmp_path):
    main(["--checkpoint", str(bilm), "--input", str(lines), "--out", str(tmp_path / "b.npz"), "--layers", "all"])
    saved = np.load(tmp_path / "b.npz")
    offsets, states = saved["offsets"], saved["states"]
    lm = rnnlm.load(bilm)
    assert states.shape[1:] == (2, 32)  # layers, forward + backward
    assert offsets.tolist() == np.cumsum([0, *(len(lm.encoder.encode_text(t)) for t in LINES)]).tolist()
    text = LINES[2]
    ids = lm.encoder.encode_text(text)
    forward = lm.model.layer_states(_ids(lm, text))
    backward = lm.model.layer_states(torch.tensor([[lm.encoder.separator, *ids[::-1]]]), "backward")
    mine = states[offsets[2] : offsets[3]]
    n = len(ids)
    for layer in range(2):
        for t in range(n):  # token t: forward after reading tokens <= t, backward after reading tokens >= t
            np.testing.assert_allclose(mine[t, layer, :16], forward[layer][0, t + 1].detach().numpy(), atol=1e-5)
            np.testing.assert_allclose(mine[t, layer, 16:], backward[layer][0, n - t].detach().numpy(), atol=1e-5)
    assert saved["ids"][offsets[2] : offsets[3]].tolist() == ids


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "concat"])
def test_pooled_vectors_to_npy(bilm, lines, tmp_path, pooling):
    main(["--checkpoint", str(bilm), "--input", str(lines), "--out", str(tmp_path / "p.npy"), "--pooling", pooling,
          "--layers", "mean"])
    vectors = np.load(tmp_path / "p.npy")
    assert vectors.shape == (4, 32 * (3 if pooling == "concat" else 1))
    assert np.isnan(vectors[1]).all() and not np.isnan(vectors[[0, 2, 3]]).any()
    lm = rnnlm.load(bilm)
    text = LINES[3]
    ids = lm.encoder.encode_text(text)
    fwd = torch.stack(lm.model.layer_states(_ids(lm, text))).mean(0)[0, 1:]
    bwd = torch.stack(lm.model.layer_states(torch.tensor([[lm.encoder.separator, *ids[::-1]]]), "backward")).mean(0)
    bwd = bwd[0, 1:]  # in its own reading order: last = after the whole text read right to left
    pool = {"mean": lambda h: h.mean(0), "max": lambda h: h.max(0).values, "last": lambda h: h[-1],
            "concat": lambda h: torch.cat([h[-1], h.max(0).values, h.mean(0)])}[pooling]
    expected = torch.cat([pool(fwd), pool(bwd)]).detach().numpy()
    np.testing.assert_allclose(vectors[3], expected, atol=1e-5)


def test_a_classifier_checkpoint_gives_its_fine_tuned_features(tmp_path, lines):
    from test_classify import classifier, contains_x, data_module, write_tsv

    from rnnlm.sharing.classifier import load
    from rnnlm.text.batching import make_batch

    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(40)), tmp_path)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(classifier(data), datamodule=data)
    trainer.save_checkpoint(tmp_path / "clf.ckpt")
    main(["--checkpoint", str(tmp_path / "clf.ckpt"), "--input", str(lines), "--out", str(tmp_path / "c.npy"),
          "--pooling", "concat"])
    vectors = np.load(tmp_path / "c.npy")
    clf = load(tmp_path / "clf.ckpt")
    batch = make_batch(clf.tokenize([LINES[0]]), clf.encoder.separator)
    with torch.no_grad():
        np.testing.assert_allclose(vectors[0], clf.model.features(batch.ids, batch.lengths)[0].numpy(), atol=1e-5)


def test_safetensors_holds_the_same_as_npz(forward_lm, lines, tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    for suffix in ("npz", "safetensors"):
        main(["--checkpoint", str(forward_lm), "--input", str(lines), "--out", str(tmp_path / f"s.{suffix}")])
    npz, st = np.load(tmp_path / "s.npz"), safetensors.load_file(str(tmp_path / "s.safetensors"))
    assert set(st) == {"states", "offsets", "ids"}
    for key in st:
        np.testing.assert_array_equal(st[key], npz[key])


def test_settings_that_cannot_work_are_refused(forward_lm, lines, tmp_path):
    with pytest.raises(ConfigError, match="must end in one of"):
        main(["--checkpoint", str(forward_lm), "--input", str(lines), "--out", str(tmp_path / "x.csv")])
    with pytest.raises(ConfigError, match="Per-token states vary"):
        main(["--checkpoint", str(forward_lm), "--input", str(lines), "--out", str(tmp_path / "x.npy")])
    uneven = _lm(tmp_path / "uneven", hidden_sizes=[16, 8])
    with pytest.raises(ConfigError, match="layers of one size"):
        main(["--checkpoint", str(uneven), "--input", str(lines), "--out", str(tmp_path / "x.npz"), "--layers", "all"])
