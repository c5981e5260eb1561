"""python -m rnnlm.embed: per-token and pooled features of forward and bidirectional models, in every format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text, tiny_data, tiny_model, tiny_trainer
from safetensors.numpy import load_file

import rnnlm
from rnnlm import embed
from rnnlm.embed import FeatureModel, FeatureWriter, main
from rnnlm.errors import ConfigError, UserError
from rnnlm.network.classifier import concat_pool, reverse_texts, text_mask
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.text.batching import make_batch

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
    for suffix in ("npz", "safetensors"):
        main(["--checkpoint", str(forward_lm), "--input", str(lines), "--out", str(tmp_path / f"s.{suffix}")])
    npz, st = np.load(tmp_path / "s.npz"), load_file(str(tmp_path / "s.safetensors"))
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


# ------------------------------------------------------------------------------------------------ long texts
def one_pass(encoder: RNNLM, ids: torch.Tensor, lengths: torch.Tensor, pooling: str, layers: str) -> torch.Tensor:
    """The features of a whole batch read in one pass, as embed read them before it read in pieces: ``[B, *shape]``
    pooled, or the rows' text tokens one after the other."""
    per_direction = []
    for direction in ("forward", "backward")[: 2 if encoder.config.bidirectional else 1]:
        read, index = (ids, None) if direction == "forward" else reverse_texts(ids, lengths)
        states = encoder.layer_states(read, direction)
        states = {"top": states[-1:], "mean": [torch.stack(states).mean(0)], "all": states}[layers]
        if pooling == "none" and index is not None:
            states = [s.gather(1, index.unsqueeze(-1).expand_as(s)) for s in states]
        if pooling != "none":
            states = [_pool(s, lengths, pooling) for s in states]
        per_direction.append(states)
    both = torch.stack([torch.cat(parts, dim=-1) for parts in zip(*per_direction, strict=True)], dim=-2)
    both = both if layers == "all" else both.squeeze(-2)
    if pooling != "none":
        return both
    return torch.cat([both[b, 1 : int(n)] for b, n in enumerate(lengths)])


def _pool(states: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "concat":
        return concat_pool(states, lengths)
    if pooling == "last":
        return states[torch.arange(len(states)), lengths - 1]
    mask = text_mask(lengths, states.size(1)).unsqueeze(-1)
    if pooling == "max":
        return states.masked_fill(~mask, float("-inf")).amax(1)
    return (states * mask).sum(1) / (lengths - 1).unsqueeze(-1)


# Lengths in positions (the separator and the text's tokens) against pieces of 7: several pieces, an exact multiple
# of the piece in positions and in tokens, one token past a piece, a text of one token; unsorted, as rows may come.
PIECE_LENGTHS = [30, 21, 2, 15, 8, 24]


@pytest.mark.parametrize("pooling", embed.POOLINGS)
@pytest.mark.parametrize("layers", embed.LAYERS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("stack", ["fused", "layer by layer"])
def test_features_read_in_pieces_equal_one_pass(monkeypatch, pooling, layers, bidirectional, cell, stack):
    monkeypatch.setattr(embed, "PIECE", 7)
    torch.manual_seed(0)
    # Weight drop (off in eval) makes the stack run layer by layer, whose state is a list per layer.
    config = RNNLMConfig(13, cell=cell, num_layers=2, embedding_dim=5, hidden_size=6, bidirectional=bidirectional,
                         weight_drop=0.5 if stack == "layer by layer" else 0.0)
    encoder = RNNLM(config).eval()
    assert config.per_layer == (stack == "layer by layer")
    widths = []
    for name in ("encode", "read_layers"):  # every call reads at most a piece
        method = getattr(encoder, name)
        monkeypatch.setattr(encoder, name, lambda ids, *a, m=method: widths.append(ids.size(1)) or m(ids, *a))
    texts = [np.random.default_rng(n).integers(1, 13, n - 1) for n in PIECE_LENGTHS]
    batch = make_batch(texts, separator=0)
    writer = FeatureWriter(FeatureModel(encoder, None, 1 << 20, "language model"), pooling, layers)
    mine = writer.features(batch.ids, batch.lengths)
    assert max(widths) == 7 and len(widths) >= 5 * (2 if bidirectional else 1)
    with torch.no_grad():
        expected = one_pass(encoder, batch.ids, batch.lengths, pooling, layers)
    assert mine.shape == expected.shape
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


LONG_LINES = [
    "the cat sat on a mat",  # 20 characters: with the separator, 3 pieces of 7
    "",
    "a",
    "every morning we walk along the river to see boats drift past old stone bridges",
    "birds sang in tall green trees",
]


def _expected(checkpoint: Path, texts: list[str], pooling: str, layers: str) -> list[np.ndarray]:
    lm = rnnlm.load(checkpoint)
    with torch.no_grad():
        return [one_pass(lm.model.eval(), _ids(lm, t), torch.tensor([len(t) + 1]), pooling, layers).numpy()
                if t else None for t in texts]


@pytest.fixture
def long_lines(tmp_path) -> Path:
    path = tmp_path / "long.txt"
    path.write_text("\n".join(LONG_LINES) + "\n")
    return path


def test_long_lines_read_in_pieces_to_parquet(bilm, long_lines, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(embed, "PIECE", 7)
    out = tmp_path / "long.parquet"
    main(["--checkpoint", str(bilm), "--input", str(long_lines), "--out", str(out), "--layers", "all",
          "--batch_size", "2"])
    rows = pq.read_table(out).to_pylist()
    for row, text, expected in zip(rows, LONG_LINES, _expected(bilm, LONG_LINES, "none", "all"), strict=True):
        assert "".join(row["tokens"]) == text
        if expected is None:
            assert row["states"] == []
            continue
        np.testing.assert_allclose(np.array(row["states"]), expected, rtol=1e-5, atol=1e-6)
    # Neither a dictionary nor compression for the floats: Parquet would hold back a whole row group's pages.
    states = pq.ParquetFile(out).metadata.row_group(0).column(2)
    assert states.compression == "UNCOMPRESSED" and not any("DICTIONARY" in e for e in states.encodings)


@pytest.mark.parametrize("pooling", ["concat", "last"])
def test_long_lines_read_in_pieces_to_npy(forward_lm, long_lines, tmp_path, monkeypatch, pooling):
    monkeypatch.setattr(embed, "PIECE", 7)
    main(["--checkpoint", str(forward_lm), "--input", str(long_lines), "--out", str(tmp_path / "p.npy"),
          "--pooling", pooling, "--batch_size", "3"])
    vectors = np.load(tmp_path / "p.npy")
    for vector, expected in zip(vectors, _expected(forward_lm, LONG_LINES, pooling, "top"), strict=True):
        if expected is None:
            assert np.isnan(vector).all()
        else:
            np.testing.assert_allclose(vector, expected[0], rtol=1e-5, atol=1e-6)


def test_a_block_too_large_for_one_arrow_list_is_written_in_several(forward_lm, long_lines, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    main(["--checkpoint", str(forward_lm), "--input", str(long_lines), "--out", str(tmp_path / "one.parquet")])
    longest = 16 * max(len(t) for t in LONG_LINES)  # floats of the longest line
    monkeypatch.setattr(embed, "ARROW_LIST_VALUES", longest)
    main(["--checkpoint", str(forward_lm), "--input", str(long_lines), "--out", str(tmp_path / "split.parquet")])
    one, split = pq.ParquetFile(tmp_path / "one.parquet"), pq.ParquetFile(tmp_path / "split.parquet")
    assert one.metadata.num_row_groups == 1 and split.metadata.num_row_groups > 1
    assert split.read().equals(one.read())
    monkeypatch.setattr(embed, "ARROW_LIST_VALUES", longest - 1)
    with pytest.raises(UserError, match="Line 4 has more per-token features"):
        main(["--checkpoint", str(forward_lm), "--input", str(long_lines), "--out", str(tmp_path / "no.parquet")])
    assert not (tmp_path / "no.parquet").exists()
