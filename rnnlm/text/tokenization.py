"""Tokenizers at every level, all plain Hugging Face ``tokenizers`` objects saved as a standard ``tokenizer.json``.

Levels: ``char``, ``byte``, ``word`` (whitespace words), ``bpe`` (byte-level), ``unigram``, ``wordpiece``, or a
pretrained ``tokenizer.json`` / Hub name. Every tokenizer has a document separator token (``<eos>``) that the
data pipeline puts after each document; it is never produced by encoding text, only inserted between documents.

Encoding goes through :class:`Encoder`. For char- and byte-level tokenizers the per-character path of
``tokenizers`` is the bottleneck (~1.5 M chars/s here), so the encoder recognises them by their structure and
uses a vectorised numpy lookup that yields the very same ids (~100x faster; tests check they are identical).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rnnlm.errors import UserError

UNK = "<unk>"
EOS = "<eos>"
# The tokenizer levels, with what a model card calls them.
LEVEL_NAMES = {"char": "character-level", "byte": "byte-level", "word": "word-level", "bpe": "byte-level BPE",
               "unigram": "unigram subword", "wordpiece": "WordPiece subword"}
LEVELS = tuple(LEVEL_NAMES)
# Names under which pretrained tokenizers commonly spell their end-of-document token.
_KNOWN_SEPARATORS = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]")


class TokenizerError(UserError):
    """A tokenizer setting or file that cannot be used."""


# --------------------------------------------------------------------------------------------- parallelism
# Fork safety: the Rust side of ``tokenizers`` runs a thread pool. A process forked after that pool has run (our
# encoding workers, DataLoader workers, ``datasets.map(num_proc>1)``) would inherit a pool whose threads do not
# exist, so ``tokenizers`` switches parallelism off in the child and warns, unless TOKENIZERS_PARALLELISM is set.
# So it is "false" by default and always while forking (the encoding pool has one single-threaded worker per core
# instead), and "true" only around work done before any fork: training a tokenizer.
PARALLELISM_VARIABLE = "TOKENIZERS_PARALLELISM"


def default_tokenizers_parallelism() -> None:
    """The training entry points' default: TOKENIZERS_PARALLELISM=false, unless the user chose otherwise."""
    os.environ.setdefault(PARALLELISM_VARIABLE, "false")


@contextlib.contextmanager
def tokenizers_parallelism(enabled: bool) -> Iterator[None]:
    """TOKENIZERS_PARALLELISM set to ``enabled`` inside the block (whatever it was), restored after it."""
    before = os.environ.get(PARALLELISM_VARIABLE)
    os.environ[PARALLELISM_VARIABLE] = "true" if enabled else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARALLELISM_VARIABLE, None)
        else:
            os.environ[PARALLELISM_VARIABLE] = before


# --------------------------------------------------------------------------------------------- byte level
def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (Radford et al. 2019, GPT-2).

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 are shifted to code points
    from 256 upwards, so every byte has a visible, non-whitespace symbol.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def byte_tokenizer() -> Tokenizer:
    """256 byte symbols (id = byte value) plus the separator (id 256): no unknowns, any Unicode text."""
    vocab = {symbol: b for b, symbol in _bytes_to_unicode().items()}
    vocab[EOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


# --------------------------------------------------------------------------------------------- char level
def char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """One token per Unicode character: ``<unk>`` = 0, ``<eos>`` = 1, then ``chars`` in code-point order.

    The specials are plain vocabulary entries, not added tokens, so a literal "<unk>" in the text is read as
    five characters (as the numpy path reads it) and never matched as a special token.
    """
    vocab = {UNK: 0, EOS: 1}
    for ch in sorted(set(chars)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    # Without Fuse, decode() joins characters with spaces (tokenizers issue #704).
    tok.decoder = decoders.Fuse()
    return tok


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def count_chars(texts: Iterable[str]) -> Counter[str]:
    """Character frequencies, counted with numpy so that large corpora take seconds."""
    counter = CharCounter()
    for _ in counter.through(texts):
        pass
    return counter.counts


class CharCounter:
    """Counts the characters of texts on their way to another reader, so that a corpus read once is counted too."""

    batch_characters = 1 << 24  # counted together: numpy's speed, in bounded memory

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.complete = False  # every text has gone through

    def through(self, texts: Iterable[str]) -> Iterator[str]:
        """``texts``, unchanged; ``counts`` holds their characters once the last one has been read."""
        batch: list[str] = []
        size = 0
        for text in texts:
            yield text
            batch.append(text)
            size += len(text)
            if size >= self.batch_characters:
                self._add(batch)
                batch.clear()
                size = 0
        self._add(batch)
        self.complete = True

    def _add(self, batch: list[str]) -> None:
        if batch:
            # A histogram over code points: linear time, where np.unique would sort every character.
            hist = np.bincount(_code_points("".join(batch)))
            cps = np.flatnonzero(hist)
            self.counts.update({chr(c): int(k) for c, k in zip(cps.tolist(), hist[cps].tolist(), strict=True)})


def _keep_frequent(counts: Counter[str], min_frequency: int, max_vocab_size: int | None, n_special: int) -> list:
    items = [(t, c) for t, c in counts.items() if c >= min_frequency]
    items.sort(key=lambda tc: (-tc[1], tc[0]))
    if max_vocab_size is not None:
        items = items[: max(0, max_vocab_size - n_special)]
    return [t for t, _ in items]


# --------------------------------------------------------------------------------------------- word level
def word_tokenizer(texts: Iterable[str], min_frequency: int = 1, max_vocab_size: int | None = None) -> Tokenizer:
    """Whitespace words by frequency: ``<unk>`` = 0, ``<eos>`` = 1, then the words, most frequent first.

    The counting runs in Rust (``WordLevelTrainer``, no special tokens) and the vocabulary is then laid out
    densely here: with specials given to the trainer, a literal "<unk>" in the text (WikiText, PTB) is
    re-inserted at its frequency rank and leaves a hole, so the largest id would equal the vocabulary size.
    A literal "<unk>" in the text reads as the unknown token, as in the classic setting.
    """
    counter = Tokenizer(models.WordLevel(unk_token=UNK))
    counter.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordLevelTrainer caps the vocabulary at 30k unless told otherwise.
    trainer = trainers.WordLevelTrainer(vocab_size=1 << 31, min_frequency=min_frequency, show_progress=False)
    counter.train_from_iterator(texts, trainer=trainer)
    ranked = sorted(counter.get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in ranked if w not in (UNK, EOS)]
    if max_vocab_size is not None:
        words = words[: max(0, max_vocab_size - 2)]
    vocab = {UNK: 0, EOS: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


# --------------------------------------------------------------------------------------------- training
def train_tokenizer(
    level: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    min_frequency: int = 1,
    max_vocab_size: int | None = None,
) -> Tokenizer:
    """Build the tokenizer of ``level`` from the training texts.

    ``vocab_size`` is the target size of the subword levels (bpe, unigram, wordpiece); ``min_frequency`` and
    ``max_vocab_size`` prune the char and word vocabularies (dropped entries read as ``<unk>``).
    """
    if level not in LEVELS:
        raise TokenizerError(
            f"Unknown tokenizer {level!r}; choose one of {', '.join(LEVELS)}, or give the path of a tokenizer.json."
        )
    if level == "byte":
        return byte_tokenizer()
    if level == "char":
        return char_tokenizer(_keep_frequent(count_chars(texts), min_frequency, max_vocab_size, 2))
    if level == "word":
        return word_tokenizer(texts, min_frequency, max_vocab_size)

    if vocab_size is None:
        raise TokenizerError(f"The {level!r} tokenizer is trained to a target size: set data.vocab_size (e.g. 8000).")
    if level == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif level == "unigram":
        tok = Tokenizer(models.Unigram())
        # prepend_scheme="always" would read " the" and "the" alike and lose a document's leading space.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tok.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=[UNK, EOS], unk_token=UNK, show_progress=False
        )
    else:  # wordpiece
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[UNK, EOS], show_progress=False
        )
    # Every subword level keeps each character of the training text as a token: bpe has all 256 bytes whatever the
    # text, and wordpiece grows past vocab_size to hold the alphabet, but the unigram trainer refuses an alphabet
    # larger than vocab_size, in words of its own; the characters counted on the way say how many there are.
    chars = CharCounter()
    if level == "unigram":
        texts = chars.through(texts)
    try:
        tok.train_from_iterator(texts, trainer=trainer)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is that refusal
        if isinstance(err, UserError) or not chars.complete or len(chars.counts) <= vocab_size:
            raise
        n = len(chars.counts)
        raise TokenizerError(
            f"The training text has {n:,} distinct characters, more than data.vocab_size={vocab_size:,} can hold: a "
            f"unigram tokenizer keeps every character as a token. Raise data.vocab_size well above {n + 2:,} (the "
            "characters and the special tokens <unk> and <eos>, then room for subwords), or use data.tokenizer=bpe, "
            "which starts from the 256 byte values and so reads any alphabet."
        ) from None
    return tok


def load_pretrained(spec: str) -> Tokenizer:
    """A ``tokenizer.json`` path (or a folder holding one), or a tokenizer on the Hugging Face Hub."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {err}") from err
    if path.suffix == ".json" or spec.startswith((".", "/", "~")):
        raise TokenizerError(f"Tokenizer file {spec!r} does not exist.")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as err:
        raise TokenizerError(
            f"Could not load tokenizer {spec!r}: it is neither a level ({', '.join(LEVELS)}), nor an existing "
            f"tokenizer.json, nor a tokenizer that the Hugging Face Hub could serve ({err})."
        ) from err


def ensure_separator(tok: Tokenizer) -> int:
    """The id of the document separator, adding ``<eos>`` as a special token if the tokenizer has none."""
    for name in _KNOWN_SEPARATORS:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    tok.add_special_tokens([EOS])
    return tok.token_to_id(EOS)


# --------------------------------------------------------------------------------------------- encoding
class Encoder:
    """Turns documents into one id stream with the separator after each document.

    Picks the fastest path that gives the ids ``tokenizer.encode`` would give: a code-point lookup table for
    char-level tokenizers, the UTF-8 bytes themselves for the byte-level one, and ``encode_batch_fast``
    (parallel in Rust) for everything else.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.separator = ensure_separator(tokenizer)
        # Special tokens spelled out in the text are text: only the pipeline inserts separators.
        tokenizer.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        spec = json.loads(tokenizer.to_str())
        self._table: np.ndarray | None = None
        self._unk = 0
        self.path = "tokenizers"
        if _is_char_level(spec):
            vocab = spec["model"]["vocab"]
            chars = {k: v for k, v in vocab.items() if len(k) == 1}
            top = max((ord(c) for c in chars), default=0)
            self._unk = vocab[spec["model"]["unk_token"]]
            self._table = np.full(top + 1, self._unk, dtype=np.int32)
            for c, i in chars.items():
                self._table[ord(c)] = i
            self.path = "char-table"
        elif _is_byte_level(spec):
            self.path = "bytes"

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    def encode(self, docs: Sequence[str]) -> np.ndarray:
        """Ids of ``docs``, each followed by the separator."""
        if not docs:
            return np.empty(0, dtype=self.dtype)
        if self.path == "char-table":
            ids = _code_points("".join(docs)).astype(np.int64)
            table = self._table
            ids = np.where(ids < len(table), table[np.minimum(ids, len(table) - 1)], self._unk)
            ends = np.cumsum([len(d) for d in docs])
        elif self.path == "bytes":
            raw = [d.encode("utf-8") for d in docs]
            ids = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(np.uint16)
            ends = np.cumsum([len(r) for r in raw])
        else:
            encodings = self.tokenizer.encode_batch_fast(list(docs), add_special_tokens=False)
            lengths = [len(e.ids) for e in encodings]
            ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=sum(lengths))
            ends = np.cumsum(lengths)
        return np.insert(ids, ends, self.separator).astype(self.dtype)

    def encode_each(self, docs: Sequence[str]) -> list[np.ndarray]:
        """Ids of each of ``docs`` on its own, no separator: :meth:`encode` split back into documents."""
        if not docs:
            return []
        if self.path == "tokenizers":
            encodings = self.tokenizer.encode_batch_fast(list(docs), add_special_tokens=False)
            return [np.asarray(e.ids, dtype=self.dtype) for e in encodings]
        # One id per code point (char table) or per UTF-8 byte, plus the separator after each document.
        sizes = [len(d) if self.path == "char-table" else len(d.encode("utf-8")) for d in docs]
        ends = np.cumsum(np.asarray(sizes) + 1)
        ids = self.encode(docs)
        return [ids[end - 1 - size : end - 1] for size, end in zip(sizes, ends.tolist(), strict=True)]

    def encode_text(self, text: str) -> list[int]:
        """Ids of one piece of text, no separator (for prompts)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _model_ids(spec: dict) -> dict[str, int]:
    """The model's own vocabulary (added tokens aside): token -> id."""
    vocab = spec.get("model", {}).get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id being the position
        return {piece: i for i, (piece, _) in enumerate(vocab)}
    return dict(vocab)


def _added_that_change_ids(spec: dict) -> list[tuple[int, str]]:
    """The added tokens that can change what text encodes to. A special token that is already the model's own
    entry with the same id changes nothing: the Encoder reads special tokens spelled out in text as text
    (``encode_special_tokens``), so marking it special only tells decoders and transformers what it is."""
    ids = _model_ids(spec)
    return [(t["id"], t["content"]) for t in spec.get("added_tokens") or []
            if not (t.get("special") and ids.get(t["content"]) == t["id"])]


def _is_char_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and spec["model"].get("type") == "WordLevel"
        and pre.get("type") == "Split"
        and pre.get("pattern") == {"String": ""}
        and pre.get("behavior") == "Isolated"
        and not _added_that_change_ids(spec)
    )


def _is_byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    model = spec["model"]
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("merges"):
        return False
    if pre.get("type") != "ByteLevel" or pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return False
    vocab = model["vocab"]
    return all(vocab.get(symbol) == b for b, symbol in _bytes_to_unicode().items())


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------- kind
def tokenizer_kind(tokenizer: Tokenizer, setting: str | None = None) -> str:
    """``char``, ``byte``, ``word``, ``bpe``, ``unigram`` or ``wordpiece``: the data setting when it names a level,
    otherwise read from the tokenizer's structure."""
    if setting in LEVELS:
        return setting  # type: ignore[return-value]
    spec = json.loads(tokenizer.to_str())
    if _is_char_level(spec):
        return "char"
    if _is_byte_level(spec):
        return "byte"
    kind = spec.get("model", {}).get("type", "unknown")
    return {"WordLevel": "word", "BPE": "bpe", "Unigram": "unigram", "WordPiece": "wordpiece"}.get(kind, kind.lower())


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give the same ids for the same text."""
    if a.get_vocab(with_added_tokens=True) != b.get_vocab(with_added_tokens=True):
        return False
    sa, sb = json.loads(a.to_str()), json.loads(b.to_str())
    same = all(sa.get(k) == sb.get(k) for k in ("normalizer", "pre_tokenizer", "model"))
    return same and _added_that_change_ids(sa) == _added_that_change_ids(sb)


# --------------------------------------------------------------------------------------------- for transformers
def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """What transformers calls the tokenizer's special tokens: the separator is the end of a text (``eos``), what
    a text starts after (``bos``: rnnlm reads every document after one) and the padding (``pad``: rnnlm's
    classifier pads with it, and padding is masked out); ``unk`` is the model's unknown token, when it has one
    (byte-level and BPE tokenizers have none)."""
    spec = json.loads(tokenizer.to_str())
    ids = _model_ids(spec)
    known = {t["content"] for t in spec.get("added_tokens") or []} | set(ids)
    separator = next((name for name in _KNOWN_SEPARATORS if name in known), None)
    if separator is None:
        raise TokenizerError("The tokenizer has no document separator: give it to rnnlm's Encoder first, which adds "
                             f"{EOS}.")
    names = {"bos_token": separator, "eos_token": separator, "pad_token": separator}
    model = spec.get("model", {})
    unk = model.get("unk_token")
    if unk is None and isinstance(model.get("unk_id"), int):
        unk = tokenizer.id_to_token(model["unk_id"])
    if unk is not None and tokenizer.token_to_id(unk) is not None:
        names["unk_token"] = unk
    return names


def with_special_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of ``tokenizer`` that says which of its tokens are special (:func:`special_tokens`), for
    transformers: marked special among its added tokens, so that ``decode(..., skip_special_tokens=True)`` drops
    them, and a post-processor that puts the separator before a text when special tokens are asked for
    (``add_special_tokens=True``, transformers' default), as rnnlm reads every text after it.

    No id changes: each special token keeps the id it has in the vocabulary, and text encodes as before when
    special tokens spelled out in it are read as text (rnnlm's Encoder does so; transformers does with
    ``split_special_tokens=True``, which the exported tokenizer_config.json sets).
    """
    copy = Tokenizer.from_str(tokenizer.to_str())
    names = special_tokens(copy)
    before = copy.get_vocab(with_added_tokens=True)
    present = {t["content"] for t in json.loads(copy.to_str()).get("added_tokens") or []}
    for token in dict.fromkeys(names.values()):
        if token not in present:  # an added token already there keeps its settings
            copy.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    spec = json.loads(copy.to_str())
    for entry in spec["added_tokens"]:
        if entry["content"] in names.values():
            entry["special"] = True
    copy = Tokenizer.from_str(json.dumps(spec))
    if copy.get_vocab(with_added_tokens=True) != before:
        raise RuntimeError("Marking the special tokens changed the tokenizer's vocabulary.")
    separator = names["bos_token"]
    copy.post_processor = processors.TemplateProcessing(
        single=f"{separator} $A", pair=f"{separator} $A {separator} $B:1",
        special_tokens=[(separator, copy.token_to_id(separator))],
    )
    return copy


def describe_tokenizer(tokenizer: Tokenizer, setting: str | None = None) -> str:
    return f"{tokenizer_kind(tokenizer, setting)}, {tokenizer.get_vocab_size(with_added_tokens=True):,} tokens"
