"""Where the text comes from: Hugging Face ``datasets`` from the Hub, local files or ``save_to_disk`` folders.

Everything ends up as a :class:`Corpus`: one ``datasets.Dataset`` per split with a single text column, plus a
content key per split that the token cache is keyed by. A split that the source lacks is carved from the end
of the training text by fraction of characters.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlm.errors import UserError
from rnnlm.files import write_atomically

SPLITS = ("train", "validation", "test")
SAMPLE_BY = ("document", "paragraph", "line")
BUILTIN_PREFIX = "builtin:"
_TEXT_SUFFIXES = {".txt", ".text", ".tokens", ".raw", ""}
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
HASH_BLOCK = 1 << 22  # 4 MiB per read when hashing local files


class DataError(UserError):
    """The data source cannot be used as configured."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("RNNLM_CACHE", Path.home() / ".cache" / "rnnlm")).expanduser()


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Corpus:
    """The text of each split (column ``text``) and a key that changes whenever that text may have changed."""

    splits: dict  # split name -> datasets.Dataset, or datasets.IterableDataset when streaming
    keys: dict  # split name -> str

    def texts(self, split: str, batch_size: int = 1000):
        """The documents of ``split``, in batches of plain strings (read lazily, also from a stream)."""
        for batch in self.splits[split].iter(batch_size=batch_size):
            yield [t or "" for t in batch["text"]]  # a missing value (CSV cell, JSON null) is an empty document

    def num_documents(self, split: str) -> int | None:
        """Documents in ``split`` (None for a stream)."""
        ds = self.splits[split]
        return len(ds) if hasattr(ds, "__len__") else None

    def size_in_bytes(self, split: str) -> int | None:
        """The size of the split's table (about its text's size in bytes; None for a stream)."""
        data = getattr(self.splits[split], "data", None)
        return data.nbytes if data is not None else None


# --------------------------------------------------------------------------------------------- built-in corpus
def python_docs(cache_dir: Path) -> Path:
    """The reference topics of the Python documentation that every CPython ships (``pydoc_data.topics``).

    About 0.47 M characters of real English technical prose and code, one document per topic; written once
    as JSON lines so it goes through the same local-file path as any user corpus.
    """
    from pydoc_data.topics import topics  # deferred: a 0.7 MB module, read once to write the built-in corpus

    path = cache_dir / "corpora" / "python-docs" / "train.jsonl"
    content = "".join(json.dumps({"topic": k, "text": topics[k]}) + "\n" for k in sorted(topics))
    if not path.exists() or path.read_text(encoding="utf-8") != content:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, content)
    return path


BUILTIN = {"python-docs": python_docs}


# --------------------------------------------------------------------------------------------- loading
def _text_kwargs(sample_by: str) -> dict:
    # The text builder drops newlines unless told otherwise. In line mode the document separator after each
    # line stands for the newline (the classic WikiText/PTB treatment); otherwise the newlines stay in the text.
    if sample_by == "line":
        return {"sample_by": "line", "keep_linebreaks": False}
    return {"sample_by": sample_by}


def _builder_for(paths: list[Path]) -> str | None:
    suffixes = {p.suffix.lower() for p in paths}
    if suffixes <= _TEXT_SUFFIXES:
        return "text"
    builders = {_BUILDERS.get(s) for s in suffixes}
    if len(builders) == 1 and None not in builders:
        return builders.pop()
    return None


def _looks_like_path(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    return source.startswith((".", "/", "~")) or suffix in {*_BUILDERS, *_TEXT_SUFFIXES} - {""}


def _data_files(folder: Path) -> list[Path]:
    """The files of a data folder, leaving out hidden files and folders (``.git``, editor files), as datasets does."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def hash_files(files: list[Path], root: Path, block: int = HASH_BLOCK) -> str:
    """A hash of the files' content, names (relative to ``root``) and sizes: SHA-256 over blocks read from disk.

    It keys the caches of local sources, so that changed text always makes a new key, whatever its modification
    time; moving or copying the files elsewhere keeps it.
    """
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    for path in sorted(files):
        with open(path, "rb", buffering=0) as f:
            h.update(f"{path.relative_to(root).as_posix()}\0{os.fstat(f.fileno()).st_size}\0".encode())
            while n := f.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()[:32]


def load_raw(source: str, config_name: str | None, sample_by: str, cache_dir: Path, streaming: bool = False,
             options: dict | None = None, revision: str | None = None):
    """Load ``source`` into a ``datasets.DatasetDict`` (or a single ``Dataset`` for a ``save_to_disk`` folder).

    ``streaming=True`` gives ``IterableDataset`` splits for Hub datasets and local files, read as they are iterated.
    A ``save_to_disk`` folder is memory-mapped already and is loaded as it is. ``options`` go to
    ``datasets.load_dataset`` for files and Hub datasets (e.g. ``delimiter`` for CSV); ``revision`` (a branch, tag or
    commit) is for Hub datasets only, and ignored for local sources.

    Returns the data and, for a local source (file, folder, ``save_to_disk`` folder, built-in corpus), the hash of
    its files (:func:`hash_files`); None for a Hub dataset.
    """
    import datasets  # deferred: ~1 s to import, and only reading a source needs it

    if sample_by not in SAMPLE_BY:
        raise DataError(f"Unknown sample_by {sample_by!r}; choose one of {', '.join(SAMPLE_BY)}.")
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN:
            choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN)
            raise DataError(f"Unknown built-in corpus {source!r}; the built-in corpora are: {choices}.")
        source = str(BUILTIN[name](cache_dir))

    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return datasets.load_from_disk(str(path)), hash_files(_data_files(path), path)
    if path.is_file():
        builder = _builder_for([path])
        if builder is None:
            raise DataError(
                f"Cannot tell how to read {path}: use a text (.txt), JSON lines (.json/.jsonl), CSV (.csv) or "
                "parquet (.parquet) file."
            )
        _check_not_empty([path])
        content = hash_files([path], path.parent)
        kwargs = _text_kwargs(sample_by) if builder == "text" else {}
        if path.suffix.lower() == ".tsv":
            kwargs["delimiter"] = "\t"  # datasets reads a folder of .tsv files with tabs, but one file with commas
        kwargs.update(data_files={"train": str(path)}, streaming=streaming, **(options or {}))
        return _load_local(path, builder, content, **kwargs), content
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise DataError(f"The data folder {path} holds no files.")
        _check_not_empty(files)
        content = hash_files(files, path)
        if _builder_for(files) == "text":
            kwargs = {"data_dir": str(path), **_text_kwargs(sample_by), **(options or {})}
            return _load_local(path, "text", content, streaming=streaming, **kwargs), content
        return _load_local(path, str(path), content, streaming=streaming, **(options or {})), content
    if _looks_like_path(source):
        raise DataError(
            f"Data source {source!r} does not exist. Give an existing file or folder, a Hugging Face Hub dataset "
            f"name (e.g. Salesforce/wikitext with config_name wikitext-2-raw-v1), or {BUILTIN_PREFIX}python-docs."
        )
    try:
        hub = {"revision": revision} if revision else {}
        return datasets.load_dataset(source, config_name, streaming=streaming, **hub, **(options or {})), None
    except Exception as err:  # the Hub raises many types: not found, gated, offline, bad config
        offline = " (HF_HUB_OFFLINE is set, so the Hub was not asked)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise DataError(
            f"Could not load dataset {source!r}"
            + (f" (config {config_name!r})" if config_name else "")
            + (f" (revision {revision!r})" if revision else "")
            + f" from the Hugging Face Hub{offline}: {type(err).__name__}: {err}\n"
            + (f"No local file or folder named {source!r} exists either. " if "/" in source else "")
            + "Check the name and config, your network, or give a local file/folder instead."
        ) from err


def _is_blank(path: Path, block: int = 1 << 20) -> bool:
    """Whether a file holds only whitespace, read block by block (a corpus file can be larger than memory)."""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            if chunk.strip():
                return False
    return True


def _check_not_empty(files: list[Path]) -> None:
    empty = [f for f in files if _is_blank(f)]
    if empty:
        names = ", ".join(str(f) for f in empty[:5])
        raise DataError(
            f"Data file(s) {names} hold no text (empty or whitespace only). "
            "Put text in them, remove them, or point data.source elsewhere."
        )


def _load_local(path: Path, builder: str, content: str, **kwargs):
    import datasets  # deferred: ~1 s to import, and only reading a source needs it

    try:
        # datasets keeps the tables it converts a local file into, keyed by the file's path and modification time:
        # text rewritten with its old time (cp -p, rsync -t, tar) would be read from the old table. Every config
        # keyword enters that key, so the content hash goes in as the (otherwise unused) config description.
        return datasets.load_dataset(builder, description=f"rnnlm content {content}", **kwargs)
    except (StopIteration, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        if "corresponds to no data" in str(err):
            raise DataError(f"{path} holds no text: no rows were found in it.") from err
        raise DataError(
            f"datasets could not read {path} as {builder!r}: {type(err).__name__}: {err}. Check the file's format."
        ) from err


# --------------------------------------------------------------------------------------------- corpus
def load_corpus(
    source: str,
    config_name: str | None = None,
    text_field: str = "text",
    split_names: dict | None = None,
    sample_by: str = "document",
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    cache_dir: Path | None = None,
    streaming: bool = False,
    revision: str | None = None,
) -> Corpus:
    """Load the source, pick the text column and the three splits, carving missing ones from train.

    With ``streaming=True`` the splits are read lazily (``datasets.IterableDataset``); carving needs the whole text,
    so a streamed source must have its own validation and test splits (or the fractions must be 0).
    """
    import datasets  # deferred: ~1 s to import, and only reading a source needs it

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    names = {"train": "train", "validation": "validation", "test": "test", **(split_names or {})}
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {frac}.")
    if val_fraction + test_fraction >= 1.0:
        raise DataError("val_fraction + test_fraction must leave some text for training (sum < 1).")

    raw, content = load_raw(source, config_name, sample_by, cache_dir, streaming, revision=revision)
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    elif isinstance(raw, datasets.IterableDataset):
        raw = datasets.IterableDatasetDict({"train": raw})
    available = {k: raw[k] for k in raw}

    def find(split: str) -> str | None:
        """The source's name for ``split``, if it has that split."""
        wanted = names[split]
        if wanted in available:
            return wanted
        if split == "validation":
            for alias in ("validation", "valid", "val", "dev"):
                if alias in available:
                    return alias
        return None

    source_names = {s: find(s) for s in SPLITS}
    found = {s: available[n] if n is not None else None for s, n in source_names.items()}
    if found["train"] is None:
        raise DataError(
            f"The source {source!r} has no split {names['train']!r}; its splits are {sorted(available)}. "
            "Set data.train_split to one of them."
        )
    columns = found["train"].column_names
    if columns is None:  # a stream whose features are unknown until read
        columns = list(next(iter(found["train"])).keys())
    if text_field not in columns:
        raise DataError(
            f"The source {source!r} has no field {text_field!r}; its fields are {columns}. Set data.text_field."
        )

    splits, keys = {}, {}
    for s in SPLITS:
        if found[s] is not None:
            ds = found[s].select_columns([text_field])
            if text_field != "text":
                ds = ds.rename_column(text_field, "text")
            splits[s] = ds
            key = _content_key(found[s], content, source, config_name, source_names[s])
            keys[s] = digest(key, text_field, sample_by)

    carve = [(s, f) for s, f in (("validation", val_fraction), ("test", test_fraction)) if s not in splits and f > 0]
    if carve and streaming:
        missing = " and ".join(s for s, _ in carve)
        raise DataError(
            f"The streamed source {source!r} has no {missing} split, and carving one from the end of the training "
            "text needs the whole text first. Use a source with its own splits, set data.val_fraction / "
            "data.test_fraction to 0 to train without them, or set data.streaming to false."
        )
    if carve:
        base_key = keys["train"]
        pieces = carve_by_characters(splits["train"], [f for _, f in carve])
        splits["train"], keys["train"] = pieces[0], digest(base_key, "carved-train", carve)
        for (s, _), piece in zip(carve, pieces[1:], strict=True):
            splits[s], keys[s] = piece, digest(base_key, "carved", s, carve)

    if not any(t.strip() for batch in Corpus(splits, keys).texts("train") for t in batch):
        raise DataError(
            f"The training split of {source!r} holds no text: field {text_field!r} is empty or whitespace in every "
            "row. Check data.source and data.text_field."
        )
    return Corpus(splits=splits, keys=keys)


def _content_key(ds, content: str | None, source: str, config_name: str | None, split: str) -> str:
    """What the caches of the source's split ``split`` are keyed by.

    A local source: the hash of its files' content (``content``), so that changed text always misses, even with its
    old modification time. A Hub dataset: its fingerprint, which follows the repository's revision and data files;
    a streamed one has none, and is keyed by its name, configuration and split.
    """
    if content is not None:
        return digest("files", content, split)
    # datasets has no public accessor for a Dataset's fingerprint: ``_fingerprint`` is the key of its own caches
    # (the Hub revision and data files, plus every transform applied since loading).
    fingerprint = getattr(ds, "_fingerprint", None)
    if fingerprint is not None:
        return fingerprint
    return digest("stream", source, config_name, split)


def _n_chars(ds) -> np.ndarray:
    lengths = [len(t or "") for batch in ds.iter(batch_size=10_000) for t in batch["text"]]
    return np.asarray(lengths, dtype=np.int64)


def carve_by_characters(ds, fractions: list[float]) -> list:
    """Cut ``ds`` into consecutive pieces: the head, then one piece per fraction taken from the end, in order.

    Cuts fall at a character position, splitting a document in two where needed, so that even a corpus that is
    a single document (tinyshakespeare) can be carved.
    """
    import datasets  # deferred: ~1 s to import, and only reading a source needs it

    lengths = _n_chars(ds)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    bounds = [0, round(total * (1 - sum(fractions)))]
    for f in fractions:
        bounds.append(bounds[-1] + round(total * f))
    bounds[-1] = total

    starts = ends - lengths

    def text_of(i: int) -> str:
        return ds[i]["text"] or ""

    def piece(start: int, stop: int):
        # Document i spans [starts[i], ends[i]). A non-empty one belongs to every piece it overlaps; an empty one
        # to the piece that ends at or after its position (the first piece also takes those at 0), so none is lost.
        nonempty = (lengths > 0) & (starts < stop) & (ends > start)
        empty = (lengths == 0) & (((starts > start) & (starts <= stop)) | ((start == 0) & (starts == 0)))
        members = np.flatnonzero(nonempty | empty)
        if len(members) == 0:
            return ds.select([])
        first, last = int(members[0]), int(members[-1])
        head_cut, tail_cut = starts[first] < start, ends[last] > stop
        if first == last and (head_cut or tail_cut):
            text = text_of(first)[max(start - int(starts[first]), 0) : stop - int(starts[first])]
            return datasets.Dataset.from_dict({"text": [text]}, features=ds.features)
        parts = []
        if head_cut:
            parts.append(datasets.Dataset.from_dict({"text": [text_of(first)[start - int(starts[first]) :]]},
                                                    features=ds.features))
            first += 1
        parts.append(ds.select(range(first, last + (0 if tail_cut else 1))))
        if tail_cut:
            parts.append(datasets.Dataset.from_dict({"text": [text_of(last)[: stop - int(starts[last])]]},
                                                    features=ds.features))
        return datasets.concatenate_datasets([p for p in parts if len(p)])

    return [piece(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
