"""The data pipeline: truncated-BPTT streams, corpus sources and splits, and the LMDataModule with its caches."""

from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import make_text, tiny_data

from rnnlm.data.lm import LMDataModule
from rnnlm.text.sources import DataError, carve_by_characters, load_corpus
from rnnlm.text.streams import ChunkLoader, cut_streams, rank_rows
from rnnlm.text.tokenization import EOS

# --------------------------------------------------------------------------------------------- streams
SHAPES = [  # (N tokens, B streams, T bptt)
    (1000, 4, 8),  # L = 250: T does not divide L - 1 = 249, the last chunk has 1 column
    (1003, 4, 10),  # ragged tail of 3 tokens, last chunk has 9 columns
    (4 * 33, 4, 8),  # L - 1 = 32: every chunk is full
    (50, 1, 7),
    (17, 2, 100),  # a single, short chunk
]


def _epoch(loader: ChunkLoader) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in loader]


@pytest.mark.parametrize(("n", "b", "t"), SHAPES)
def test_cut_streams_rows_are_contiguous(n, b, t):
    ids = np.arange(n)
    rows = cut_streams(ids, b)
    length = n // b
    assert rows.shape == (b, length)
    assert 0 <= n - rows.size < b  # the dropped tail is shorter than one token per stream
    np.testing.assert_array_equal(rows.ravel(), ids[: b * length])
    assert np.shares_memory(rows, ids)  # a view, not a copy
    assert np.array_equal(rank_rows(ids, b), rows)


@pytest.mark.parametrize(("n", "b", "t"), SHAPES)
def test_chunks_continue_each_row_and_y_is_x_shifted(n, b, t):
    ids = np.arange(n)
    rows = cut_streams(ids, b)
    loader = ChunkLoader(rows, t)
    chunks = _epoch(loader)
    length = rows.shape[1]
    assert len(loader) == len(chunks) == -(-(length - 1) // t)
    for k, (x, y) in enumerate(chunks):
        assert x.dtype == np.int64 and y.dtype == np.int64
        assert x.shape == y.shape and x.shape[0] == b
        # y is x shifted by one position in the stream.
        np.testing.assert_array_equal(y, x + 1)
        np.testing.assert_array_equal(x, rows[:, k * t : k * t + x.shape[1]])
        if k + 1 < len(chunks):
            assert x.shape[1] == t
            # Row i of chunk k+1 starts exactly where row i of chunk k ended.
            np.testing.assert_array_equal(chunks[k + 1][0][:, 0], y[:, -1])
    last = chunks[-1][0].shape[1]
    assert last == (length - 1) - (len(chunks) - 1) * t
    assert (last < t) == ((length - 1) % t != 0)
    assert chunks[0][0][0, 0] == 0  # row 0 starts at the start of the stream


@pytest.mark.parametrize(("n", "b", "t"), SHAPES)
def test_every_position_but_the_first_of_each_row_is_a_target_once(n, b, t):
    rows = cut_streams(np.arange(n), b)
    loader = ChunkLoader(rows, t)
    targets = np.concatenate([y.ravel() for _, y in _epoch(loader)])
    expected = rows[:, 1:].ravel()
    assert len(targets) == len(expected) == loader.tokens_per_epoch
    np.testing.assert_array_equal(np.sort(targets), np.sort(expected))
    assert len(np.unique(targets)) == len(targets)
    assert not set(rows[:, 0].tolist()) & set(targets.tolist())


def test_last_chunk_is_shorter_when_bptt_does_not_divide():
    loader = ChunkLoader(cut_streams(np.arange(2 * 11), 2), 4)  # L = 11, L - 1 = 10 = 4 + 4 + 2
    assert len(loader) == 3
    assert [x.shape for x, _ in loader] == [torch.Size([2, 4]), torch.Size([2, 4]), torch.Size([2, 2])]
    x, y = list(loader)[-1]
    assert x.tolist() == [[8, 9], [19, 20]] and y.tolist() == [[9, 10], [20, 21]]


def test_loader_is_reiterable_and_never_shuffled():
    loader = ChunkLoader(cut_streams(np.arange(200), 4), 6)
    first = [x.tolist() for x, _ in loader]
    second = [x.tolist() for x, _ in loader]
    assert first == second


@pytest.mark.parametrize(("n", "b", "t"), [(1000, 4, 8), (1003, 3, 10), (64, 2, 5)])
def test_two_ranks_split_the_rows_of_one_process_with_twice_the_streams(n, b, t):
    ids = np.arange(n)
    rank0, rank1 = rank_rows(ids, b, world_size=2, rank=0), rank_rows(ids, b, world_size=2, rank=1)
    both = cut_streams(ids, 2 * b)
    assert rank0.shape == rank1.shape == (b, n // (2 * b))
    np.testing.assert_array_equal(rank0, both[:b])
    np.testing.assert_array_equal(rank1, both[b:])
    assert not set(rank0.ravel().tolist()) & set(rank1.ravel().tolist())
    # Same number of chunks on every rank (DDP needs it); together they are the single-process chunks.
    l0, l1, single = ChunkLoader(rank0, t), ChunkLoader(rank1, t), ChunkLoader(both, t)
    assert len(l0) == len(l1) == len(single)
    for (x0, y0), (x1, y1), (x, y) in zip(l0, l1, single, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x)
        assert torch.equal(torch.cat([y0, y1]), y)
    assert l0.tokens_per_epoch + l1.tokens_per_epoch == single.tokens_per_epoch


def test_chunk_loader_rejects_rows_too_short():
    with pytest.raises(ValueError):
        ChunkLoader(np.arange(4).reshape(4, 1), 8)
    with pytest.raises(ValueError):
        ChunkLoader(np.arange(4), 8)


def test_chunk_loader_reads_a_memmap(tmp_path):
    path = tmp_path / "ids.bin"
    np.arange(500, dtype=np.uint16).tofile(path)
    ids = np.memmap(path, dtype=np.uint16, mode="r", shape=(500,))
    x, y = next(iter(ChunkLoader(rank_rows(ids, 5), 8)))
    assert x.dtype == torch.int64 and x.shape == (5, 8)
    assert x[:, 0].tolist() == [0, 100, 200, 300, 400]
    assert torch.equal(y, x + 1)


# --------------------------------------------------------------------------------------------- sources
def _texts(corpus, split: str) -> list[str]:
    return [t for batch in corpus.texts(split) for t in batch]


def test_folder_gives_three_splits(corpus_dir):
    corpus = load_corpus(str(corpus_dir))
    assert set(corpus.splits) == {"train", "validation", "test"}
    assert len(set(corpus.keys.values())) == 3
    for split, name in (("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")):
        assert corpus.splits[split].column_names == ["text"]
        assert "".join(_texts(corpus, split)) == (corpus_dir / name).read_text()


def test_sample_by_line_gives_one_document_per_line(corpus_dir):
    corpus = load_corpus(str(corpus_dir), sample_by="line")
    for split, name in (("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")):
        lines = (corpus_dir / name).read_text().splitlines()
        assert _texts(corpus, split) == lines  # no newlines left in the text
    assert corpus.keys != load_corpus(str(corpus_dir), sample_by="document").keys


def _char_module(source, tmp_path, **kwargs) -> LMDataModule:
    dm = tiny_data(source, tmp_path, **{"bptt": 8, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_sample_by_line_puts_one_separator_per_line(corpus_dir, tmp_path):
    dm = _char_module(corpus_dir, tmp_path, sample_by="line")
    for split, name in (("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")):
        text = (corpus_dir / name).read_text()
        ids = np.asarray(dm.ids[split])
        assert int((ids == dm.encoder.separator).sum()) == text.count("\n") == dm.stats[split]["documents"]
        decoded = dm.encoder.decode(ids.tolist())
        assert "\n" not in decoded
        assert decoded.replace(EOS, "\n") == text


def test_sample_by_document_keeps_the_newlines(corpus_dir, tmp_path):
    dm = _char_module(corpus_dir, tmp_path, sample_by="document")
    ids = np.asarray(dm.ids["train"])
    assert int((ids == dm.encoder.separator).sum()) == 1 and ids[-1] == dm.encoder.separator
    decoded = dm.encoder.decode(ids[:-1].tolist())
    assert "\n" in decoded
    assert decoded == (corpus_dir / "train.txt").read_text()
    assert dm.stats["train"]["characters"] == len(decoded) + 1


DOCS = [
    "first document, with a comma",
    'a "quoted" one\nspanning two lines',
    "한국어 문장입니다 😀",
    "tabs\tand  double spaces",
] + [make_text(3, seed=s) for s in range(30)]


def _write(fmt: str, path, field: str = "content") -> None:
    rows = [{"id": i, field: d} for i, d in enumerate(DOCS)]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["id", field], delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_local_structured_files_with_a_custom_text_field(fmt, tmp_path):
    path = tmp_path / f"docs.{fmt}"
    _write(fmt, path)
    corpus = load_corpus(str(path), text_field="content", val_fraction=0.1, test_fraction=0.1)
    assert set(corpus.splits) == {"train", "validation", "test"}
    for ds in corpus.splits.values():
        assert ds.column_names == ["text"]
    pieces = [_texts(corpus, s) for s in ("train", "validation", "test")]
    assert "".join(t for p in pieces for t in p) == "".join(DOCS)
    total = sum(map(len, DOCS))
    assert abs(sum(map(len, pieces[1])) - 0.1 * total) <= 1
    with pytest.raises(DataError, match="no field 'text'"):
        load_corpus(str(path))


def test_jsonl_through_the_data_module(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write("jsonl", path)
    dm = _char_module(path, tmp_path, text_field="content", batch_size=2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 8)
    n_docs = dm.stats["train"]["documents"] + dm.stats["validation"]["documents"] + dm.stats["test"]["documents"]
    assert len(DOCS) <= n_docs <= len(DOCS) + 2  # each carve may split one document in two


def test_save_to_disk_dataset_dict(tmp_path):
    import datasets

    parts = {
        "train": [make_text(2, seed=s) for s in range(40)],
        "validation": ["valid one", "valid two"],
        "test": ["test one", "test two", "test three"],
    }
    dd = datasets.DatasetDict(
        {k: datasets.Dataset.from_dict({"content": v, "n": list(range(len(v)))}) for k, v in parts.items()}
    )
    folder = tmp_path / "saved"
    dd.save_to_disk(str(folder))
    corpus = load_corpus(str(folder), text_field="content")
    for split, texts in parts.items():
        assert _texts(corpus, split) == texts
    dm = _char_module(folder, tmp_path, text_field="content", batch_size=2, eval_batch_size=1)
    assert dm.stats["test"]["documents"] == 3
    assert dm.loader("test").rows.shape[0] == 1


def test_save_to_disk_single_dataset_is_the_training_split(tmp_path):
    import datasets

    texts = [make_text(2, seed=s) for s in range(40)]
    folder = tmp_path / "single"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder))
    corpus = load_corpus(str(folder))
    assert set(corpus.splits) == {"train", "validation", "test"}
    assert "".join(t for s in ("train", "validation", "test") for t in _texts(corpus, s)) == "".join(texts)


@pytest.mark.parametrize(("val", "test"), [(0.05, 0.05), (0.1, 0.2), (0.0, 0.1), (0.3, 0.0)])
def test_single_document_file_is_carved_by_characters(text_file, val, test):
    text = text_file.read_text()
    corpus = load_corpus(str(text_file), val_fraction=val, test_fraction=test)
    expected = {"train", *(s for s, f in (("validation", val), ("test", test)) if f > 0)}
    assert set(corpus.splits) == expected
    pieces = {s: "".join(_texts(corpus, s)) for s in corpus.splits}
    assert "".join(pieces.get(s, "") for s in ("train", "validation", "test")) == text
    for split, frac in (("validation", val), ("test", test)):
        if frac:
            assert abs(len(pieces[split]) - frac * len(text)) <= 1
            assert len(_texts(corpus, split)) == 1
    assert abs(len(pieces["train"]) - (1 - val - test) * len(text)) <= 2
    assert len(set(corpus.keys.values())) == len(corpus.keys)


def test_carving_splits_documents_at_the_cut(tmp_path):
    import datasets

    docs = ["aaaa", "bbbbbb", "cc", "dddddddd"]  # 20 characters
    ds = datasets.Dataset.from_dict({"text": docs})
    head, val, test = carve_by_characters(ds, [0.25, 0.15])  # cuts at 12 and 17
    assert list(head["text"]) == ["aaaa", "bbbbbb", "cc"]
    assert list(val["text"]) == ["ddddd"]
    assert list(test["text"]) == ["ddd"]
    head, val = carve_by_characters(ds, [0.45])  # cut at 11, inside "cc"
    assert list(head["text"]) == ["aaaa", "bbbbbb", "c"]
    assert list(val["text"]) == ["c", "dddddddd"]


def test_carving_keeps_empty_documents():
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["aaaaa", "", "bbb"]})
    head, tail = carve_by_characters(ds, [3 / 8])  # cut at 5, right where the empty document sits
    assert len(head) + len(tail) == 3


def test_carved_key_depends_on_the_fractions(text_file):
    a = load_corpus(str(text_file), val_fraction=0.05, test_fraction=0.05)
    b = load_corpus(str(text_file), val_fraction=0.1, test_fraction=0.05)
    assert a.keys["train"] != b.keys["train"]
    assert a.keys == load_corpus(str(text_file), val_fraction=0.05, test_fraction=0.05).keys


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="sample_by"):
        load_corpus(str(tmp_path), sample_by="sentence")
    with pytest.raises(DataError, match="val_fraction"):
        load_corpus(str(tmp_path / "x.txt"), val_fraction=1.5)
    with pytest.raises(DataError, match="sum < 1"):
        load_corpus(str(tmp_path / "x.txt"), val_fraction=0.5, test_fraction=0.5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no files"):
        load_corpus(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        load_corpus(str(blank), sample_by="line")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_missing_text_values_are_empty_documents(fmt, tmp_path):
    path = tmp_path / f"holes.{fmt}"
    rows = [{"id": 1, "content": "hello there"}, {"id": 2, "content": None}, {"id": 3, "content": "more text"}]
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "content"])
            writer.writeheader()
            writer.writerows({**r, "content": r["content"] or ""} for r in rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = load_corpus(str(path), text_field="content")
    assert "".join(t for s in corpus.splits for t in _texts(corpus, s)) == "hello theremore text"


# --------------------------------------------------------------------------------------------- data module
@pytest.fixture
def info_log(caplog):
    """The INFO messages of rank_zero_info (logger ``lightning.pytorch...``, which may not propagate to root)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def test_data_module_end_to_end_without_a_trainer(corpus_dir, tmp_path):
    dm = LMDataModule(source=str(corpus_dir), tokenizer="char", batch_size=4, bptt=8, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_hits == {"train": False, "validation": False, "test": False}
    loader = dm.train_dataloader()
    batches = list(loader)
    x, y = batches[0]
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert all(bx.shape[0] == 4 and bx.shape[1] <= 8 for bx, _ in batches)
    assert dm.vocab_size == dm.tokenizer.get_vocab_size(with_added_tokens=True) == dm.encoder.vocab_size
    ids = dm.ids["train"]
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert dm.stats["train"]["tokens"] == len(ids)
    assert dm.stats["train"]["dtype"] == "uint16" and dm.stats["train"]["encoder"] == "char-table"
    text = (corpus_dir / "train.txt").read_text()
    assert dm.stats["train"]["tokens"] == len(text) + 1  # one document + its separator
    assert dm.chars_per_token("train") == 1.0
    # The first batch is the start of each of the 4 streams.
    length = len(ids) // 4
    np.testing.assert_array_equal(x.numpy(), np.stack([ids[i * length : i * length + 8] for i in range(4)]))
    assert len(loader) == -(-(length - 1) // 8)
    for split in ("validation", "test"):
        assert isinstance(dm.ids[split], np.memmap)
    assert dm.val_dataloader().rows.shape == (4, len(dm.ids["validation"]) // 4)
    assert len(dm.test_dataloader()) >= 1
    # Everything lives under cache_dir.
    assert (tmp_path / "cache" / "tokenizers").is_dir() and (tmp_path / "cache" / "tokens").is_dir()


def test_eval_batch_size_and_too_small_splits(corpus_dir, tmp_path):
    dm = _char_module(corpus_dir, tmp_path, eval_batch_size=2)
    assert dm.val_dataloader().rows.shape[0] == 2
    assert dm.train_dataloader().rows.shape[0] == 4
    with pytest.raises(DataError, match="too few"):
        dm.loader("validation", batch_size=10_000)


def _cache_settings(corpus_dir, tmp_path) -> dict:
    return {"source": str(corpus_dir), "tokenizer": "char", "batch_size": 4, "bptt": 8,
            "cache_dir": str(tmp_path / "cache")}


def test_cache_is_reused(corpus_dir, tmp_path, info_log, capsys):
    settings = _cache_settings(corpus_dir, tmp_path)
    first = LMDataModule(**settings)
    first.prepare_data()
    first.setup("fit")
    # The work itself is announced on stdout by whichever process did it; summaries go to Lightning's log.
    assert "trained char tokenizer" in capsys.readouterr().out
    assert "cache miss" in info_log.text
    info_log.clear()

    second = LMDataModule(**settings)
    second.prepare_data()
    assert second.cache_hits == {"train": True, "validation": True, "test": True}
    assert "tokenizer loaded from cache" in info_log.text
    out = capsys.readouterr().out
    assert "trained" not in out and "encoded" not in out
    second.setup("fit")
    assert "cache hit" in info_log.text and "cache miss" not in info_log.text
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(second.ids[split], first.ids[split])


def test_changed_training_text_is_a_cache_miss(corpus_dir, tmp_path, info_log):
    settings = _cache_settings(corpus_dir, tmp_path)
    first = LMDataModule(**settings)
    first.prepare_data()
    first.setup("fit")
    before = os.stat(corpus_dir / "train.txt").st_mtime_ns
    new_text = make_text(500, seed=99).upper()
    (corpus_dir / "train.txt").write_text(new_text)
    assert os.stat(corpus_dir / "train.txt").st_mtime_ns != before
    info_log.clear()

    second = LMDataModule(**settings)
    second.prepare_data()
    assert second.cache_hits["train"] is False
    assert "tokenizer loaded from cache" not in info_log.text  # new training text: new tokenizer
    second.setup("fit")
    assert second.stats["train"]["tokens"] == len(new_text) + 1
    assert second.encoder.decode(np.asarray(second.ids["train"][:-1]).tolist()) == new_text


def test_changed_text_with_the_same_mtime_is_a_cache_miss(corpus_dir, tmp_path):
    settings = _cache_settings(corpus_dir, tmp_path)
    first = LMDataModule(**settings)
    first.prepare_data()
    path = corpus_dir / "train.txt"
    st = os.stat(path)
    new_text = make_text(600, seed=7).upper()
    path.write_text(new_text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    second = LMDataModule(**settings)
    second.prepare_data()
    second.setup("fit")
    assert second.encoder.decode(np.asarray(second.ids["train"][:-1]).tolist()) == new_text


def test_changed_json_lines_with_the_same_mtime_are_read_anew(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write("jsonl", path)
    before = load_corpus(str(path), text_field="content", val_fraction=0, test_fraction=0)
    st = os.stat(path)
    path.write_text("".join(json.dumps({"id": i, "content": d.upper()}) + "\n" for i, d in enumerate(DOCS)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = load_corpus(str(path), text_field="content", val_fraction=0, test_fraction=0)
    assert _texts(after, "train") == [d.upper() for d in DOCS]  # not datasets' table of the old file
    assert after.keys["train"] != before.keys["train"]


def test_the_same_text_elsewhere_is_a_cache_hit(corpus_dir, tmp_path, info_log):
    """The key of a local source is its content: a copy (new path, new modification times) reuses the caches."""
    settings = _cache_settings(corpus_dir, tmp_path)
    first = LMDataModule(**settings)
    first.prepare_data()
    copy = tmp_path / "elsewhere" / "corpus"
    copy.mkdir(parents=True)
    for f in corpus_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    info_log.clear()
    second = LMDataModule(**{**settings, "source": str(copy)})
    second.prepare_data()
    assert second.cache_hits == {"train": True, "validation": True, "test": True}
    assert "tokenizer loaded from cache" in info_log.text
    assert {s: second._cache_path(s) for s in second.corpus.splits} == {
        s: first._cache_path(s) for s in first.corpus.splits
    }


def test_hash_files_follows_content_and_names_not_location(tmp_path):
    from rnnlm.text.sources import hash_files

    def folder(name: str, files: dict) -> list:
        root = tmp_path / name
        root.mkdir()
        for rel, data in files.items():
            (root / rel).write_bytes(data)
        return [sorted(root.iterdir()), root]

    base = hash_files(*folder("a", {"train.txt": b"abc", "test.txt": b"de"}))
    assert hash_files(*folder("b", {"train.txt": b"abc", "test.txt": b"de"})) == base  # moved: same key
    assert hash_files(*folder("c", {"train.txt": b"abd", "test.txt": b"de"})) != base  # one byte changed
    assert hash_files(*folder("d", {"train.txt": b"ab", "test.txt": b"cde"})) != base  # a byte moved across files
    assert hash_files(*folder("e", {"valid.txt": b"abc", "test.txt": b"de"})) != base  # a file renamed
    assert hash_files(*folder("f", {"train.txt": b"abc", "test.txt": b"de"}), block=2) == base  # any block size


def test_each_source_split_has_its_own_key(tmp_path):
    import datasets

    parts = {"train": [make_text(20, seed=1)], "validation": ["valid text"], "dev": ["dev text"], "test": ["t"]}
    folder = tmp_path / "saved"
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()}).save_to_disk(folder)
    default, dev = load_corpus(str(folder)), load_corpus(str(folder), split_names={"validation": "dev"})
    assert _texts(default, "validation") == ["valid text"] and _texts(dev, "validation") == ["dev text"]
    assert default.keys["validation"] != dev.keys["validation"]
    assert default.keys["train"] == dev.keys["train"]


@pytest.mark.parametrize(
    ("level", "vocab_size"),
    [("char", None), ("byte", None), ("word", None), ("bpe", 300), ("unigram", 100), ("wordpiece", 300)],
)
def test_every_level_through_the_data_module(level, vocab_size, corpus_dir, tmp_path):
    dm = LMDataModule(
        source=str(corpus_dir),
        tokenizer=level,
        vocab_size=vocab_size,
        sample_by="line",
        batch_size=4,
        bptt=8,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert dm.vocab_size == dm.tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None:
        assert dm.vocab_size <= vocab_size
    for split in ("train", "validation", "test"):
        ids = np.asarray(dm.ids[split])
        assert ids.dtype == np.uint16 and len(ids) == dm.stats[split]["tokens"]
        assert int(ids.max()) < dm.vocab_size
        lines = (corpus_dir / {"validation": "valid.txt"}.get(split, f"{split}.txt")).read_text().count("\n")
        assert int((ids == dm.encoder.separator).sum()) == lines
    assert dm.stats["train"]["encoder"] == {"char": "char-table", "byte": "bytes"}.get(level, "tokenizers")


def test_tokenizer_file_as_the_tokenizer(corpus_dir, tmp_path):
    trained = _char_module(corpus_dir, tmp_path, tokenizer="bpe", vocab_size=300)
    path = tmp_path / "my-tokenizer.json"
    trained.tokenizer.save(str(path))
    dm = _char_module(corpus_dir, tmp_path / "other", tokenizer=str(path))
    assert dm.vocab_size == trained.vocab_size
    np.testing.assert_array_equal(dm.ids["train"], trained.ids["train"])


def test_bad_settings_are_refused():
    with pytest.raises(DataError, match="batch_size"):
        LMDataModule(batch_size=0)
    with pytest.raises(DataError, match="bptt"):
        LMDataModule(bptt=-1)
    with pytest.raises(ValueError, match="did you mean 'char'"):
        LMDataModule(tokenizer="chars")


def test_data_and_tokenizer_errors_are_user_errors():
    from rnnlm.errors import UserError
    from rnnlm.text.tokenization import TokenizerError

    assert issubclass(DataError, UserError) and issubclass(TokenizerError, UserError)
    with pytest.raises(DataError, match=r"^data\.bptt must be a positive integer, got True\.$"):
        LMDataModule(bptt=True)
    with pytest.raises(TokenizerError):
        LMDataModule(tokenizer="chars")


def test_token_cache_entry_of_another_format_version_is_refused(corpus_dir, tmp_path):
    from rnnlm.text.token_cache import TOKEN_CACHE_FORMAT_VERSION, TokenCache

    dm = _char_module(corpus_dir, tmp_path)
    folder = dm._cache_path("train")
    assert folder.parent == tmp_path / "cache" / "tokens"
    ids, meta = TokenCache(tmp_path / "cache").load(folder, dm.vocab_size)
    np.testing.assert_array_equal(ids, dm.ids["train"])
    assert meta["version"] == TOKEN_CACHE_FORMAT_VERSION and meta["key"] == folder.name
    (folder / "meta.json").write_text(json.dumps({**meta, "version": TOKEN_CACHE_FORMAT_VERSION + 1}))
    with pytest.raises(DataError, match="another version of rnnlm"):
        TokenCache(tmp_path / "cache").load(folder, dm.vocab_size)
