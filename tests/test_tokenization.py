"""Tokenizers of every level: exact round trips, the numpy fast paths, saving/loading and vocabulary pruning."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from rnnlm.text.tokenization import (
    EOS,
    LEVELS,
    UNK,
    CharCounter,
    Encoder,
    TokenizerError,
    byte_tokenizer,
    char_tokenizer,
    ensure_separator,
    load_pretrained,
    train_tokenizer,
)

# Korean, emoji (astral plane), newlines, double spaces, tabs, a combining accent, a blank line.
SAMPLE = (
    "hello world\n한국어 문장입니다  with  double spaces\tand\ttabs\nemoji 😀🎉 and cafe\u0301 and café\n\nthe end.\n"
)
CORPUS = [SAMPLE, "the cat sat on the mat\n", "another line\twith a tab  and 😀\n", "한국어 문장입니다\n"] * 4
VOCAB_SIZES = {"bpe": 300, "unigram": 100, "wordpiece": 300}
EXACT_LEVELS = ("char", "byte", "bpe", "unigram")


def train(level: str, texts=CORPUS, **kwargs) -> Tokenizer:
    return train_tokenizer(level, iter(texts), VOCAB_SIZES.get(level), **kwargs)


@pytest.fixture(scope="module")
def tokenizers_by_level() -> dict[str, Tokenizer]:
    return {level: train(level) for level in LEVELS}


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def expected_stream(tok: Tokenizer, docs: list[str], separator: int) -> list[int]:
    return [i for doc in docs for i in [*ids_of(tok, doc), separator]]


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("level", EXACT_LEVELS)
def test_round_trip_is_exact(tokenizers_by_level, level):
    tok = tokenizers_by_level[level]
    enc = Encoder(tok)
    ids = ids_of(tok, SAMPLE)
    assert enc.decode(ids) == SAMPLE
    assert tok.decode(ids, skip_special_tokens=False) == SAMPLE
    assert enc.decode(enc.encode_text(SAMPLE)) == SAMPLE
    # Through the document stream: every document comes back, separated by the separator id.
    docs = ["hello world\n", "한국어 문장입니다  😀\t\n", "cat"]
    stream = enc.encode(docs).tolist()
    assert stream.count(enc.separator) == len(docs)
    pieces, current = [], []
    for i in stream:
        if i == enc.separator:
            pieces.append(enc.decode(current))
            current = []
        else:
            current.append(i)
    assert pieces == docs


@pytest.mark.parametrize("level", ("word", "wordpiece"))
def test_round_trip_up_to_whitespace(tokenizers_by_level, level):
    tok = tokenizers_by_level[level]
    decoded = Encoder(tok).decode(ids_of(tok, SAMPLE))
    if level == "word":
        assert decoded == " ".join(SAMPLE.split())
    else:
        # WordPiece also splits punctuation off words ("end ." for "end."), so compare without any whitespace.
        assert "".join(decoded.split()) == "".join(SAMPLE.split())
    assert UNK not in decoded


def test_unigram_round_trip_keeps_leading_space(tokenizers_by_level):
    tok = tokenizers_by_level["unigram"]
    enc = Encoder(tok)
    for text in (" the cat sat", "  two spaces first", " "):
        assert enc.decode(ids_of(tok, text)) == text


# --------------------------------------------------------------------------------------------- fast paths
def _varied_docs() -> list[str]:
    docs = [
        "hello world",
        "",
        "unseen: ЖΩ qz § 中文 ∑",  # characters that never occur in CORPUS
        "astral 😀🎉🦀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \U0010fffd",
        "combining e\u0301 a\u0308 n\u0303 and precomposed é ä ñ",
        "a literal <unk> and a literal <eos> in the text <eos>",
        "",
        "한국어 문장입니다\n\n  double  spaces\tand\ttabs\r\nCRLF",
        "\x00 nul \x0b vt \x0c ff \u2028 ls \ufeff bom \u200d zwj \x85 nel",
        "",
    ]
    rng = random.Random(0)
    pools = [
        range(0x20, 0x7F),
        range(0xA0, 0x800),
        range(0xAC00, 0xD7A4),
        range(0x1F300, 0x1F6FF),
        range(0x300, 0x370),
        (9, 10, 13, 32, 0x2028, 0x200D),
    ]
    for _ in range(40):
        docs.append("".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(0, 30))))
    return docs


@pytest.mark.parametrize(
    ("level", "path", "kwargs"),
    [
        ("char", "char-table", {}),
        ("char", "char-table", {"min_frequency": 3}),
        ("char", "char-table", {"max_vocab_size": 10}),
        ("byte", "bytes", {}),
    ],
)
def test_fast_path_gives_the_tokenizers_ids(level, path, kwargs):
    tok = train(level, **kwargs)
    enc = Encoder(tok)
    assert enc.path == path
    docs = _varied_docs()
    assert enc.encode(docs).tolist() == expected_stream(tok, docs, enc.separator)
    # Also one document at a time and in arbitrary batches.
    for doc in docs[:12]:
        assert enc.encode([doc]).tolist() == [*ids_of(tok, doc), enc.separator]
    # The fast path also holds after a save/load round trip.
    reloaded = Tokenizer.from_str(tok.to_str())
    enc2 = Encoder(reloaded)
    assert enc2.path == path
    assert enc2.encode(docs).tolist() == enc.encode(docs).tolist()


def test_char_fast_path_maps_unseen_characters_to_unk():
    tok = train("char", [*CORPUS, "<unk> and <eos> as text"])
    enc = Encoder(tok)
    unk = tok.token_to_id(UNK)
    assert unk == 0 and enc.separator == tok.token_to_id(EOS) == 1
    ids = enc.encode(["ЖΩ中", "<unk><eos>"]).tolist()
    assert ids[:4] == [unk, unk, unk, enc.separator]
    # A literal "<unk>"/"<eos>" is read as five characters, never as the special token.
    literal = ids[4:-1]
    assert len(literal) == 10 and enc.separator not in literal and unk not in literal
    assert enc.decode(literal) == "<unk><eos>"


def test_other_levels_use_the_tokenizers_path(tokenizers_by_level):
    for level in ("word", "bpe", "unigram", "wordpiece"):
        enc = Encoder(tokenizers_by_level[level])
        assert enc.path == "tokenizers"
        docs = ["the cat sat", "", "한국어 문장입니다 😀"]
        assert enc.encode(docs).tolist() == expected_stream(enc.tokenizer, docs, enc.separator)


def test_encode_no_documents(tokenizers_by_level):
    for tok in tokenizers_by_level.values():
        enc = Encoder(tok)
        out = enc.encode([])
        assert len(out) == 0 and out.dtype == enc.dtype


def test_encode_only_empty_documents_gives_separators(tokenizers_by_level):
    for tok in tokenizers_by_level.values():
        enc = Encoder(tok)
        assert enc.encode(["", "", ""]).tolist() == [enc.separator] * 3


# --------------------------------------------------------------------------------------------- saving, ids
@pytest.mark.parametrize("level", LEVELS)
def test_saved_tokenizer_json_loads_with_plain_tokenizers(tokenizers_by_level, level, tmp_path):
    tok = tokenizers_by_level[level]
    enc = Encoder(tok)
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str(pretty=True))
    plain = Tokenizer.from_file(str(path))
    text = "the cat sat\n한국어 문장입니다  😀\tok"
    assert ids_of(plain, text) == ids_of(tok, text)
    assert plain.get_vocab_size(with_added_tokens=True) == enc.vocab_size
    # The separator exists as a token in every level and is the id the encoder inserts.
    assert plain.token_to_id(EOS) is not None
    assert plain.token_to_id(EOS) == enc.separator
    assert Encoder(plain).separator == enc.separator
    assert Encoder(plain).path == enc.path


@pytest.mark.parametrize("level", LEVELS)
def test_ids_are_below_vocab_size(tokenizers_by_level, level):
    enc = Encoder(tokenizers_by_level[level])
    ids = enc.encode(_varied_docs())
    assert int(ids.max()) < enc.vocab_size
    assert 0 <= enc.separator < enc.vocab_size
    assert max(enc.tokenizer.get_vocab(with_added_tokens=True).values()) < enc.vocab_size


def test_byte_ids_are_utf8_byte_values():
    tok = byte_tokenizer()
    enc = Encoder(tok)
    assert enc.vocab_size == 257 and enc.separator == 256
    for text in ["hello", "한국어 문장입니다", "😀🎉", "e\u0301\n\t  ", "<eos><unk>", "\x00\xff"]:
        assert ids_of(tok, text) == list(text.encode("utf-8"))
        assert enc.encode([text]).tolist() == [*text.encode("utf-8"), 256]
    assert train("byte").to_str() == tok.to_str()


# --------------------------------------------------------------------------------------------- pretrained
def test_load_pretrained_file_and_folder(tokenizers_by_level, tmp_path):
    tok = tokenizers_by_level["bpe"]
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    other = tmp_path / "custom-name.json"
    tok.save(str(other))
    text = "the cat sat on the mat 😀"
    for spec in (str(folder), str(folder / "tokenizer.json"), str(other)):
        loaded = load_pretrained(spec)
        assert ids_of(loaded, text) == ids_of(tok, text)
        assert loaded.to_str() == tok.to_str()


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_pretrained(str(bad))


def test_ensure_separator_adds_eos_when_missing():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert tok.token_to_id(EOS) is None
    sep = ensure_separator(tok)
    assert sep == 3 and tok.token_to_id(EOS) == 3
    assert ensure_separator(tok) == 3  # idempotent
    assert tok.get_vocab_size(with_added_tokens=True) == 4
    enc = Encoder(tok)
    assert enc.separator == 3 and enc.vocab_size == 4
    assert enc.encode(["hello world", "world"]).tolist() == [1, 2, 3, 2, 3]


def test_ensure_separator_reuses_a_known_end_of_text_token():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hi": 2}, unk_token="[UNK]"))
    assert ensure_separator(tok) == 1
    assert tok.get_vocab_size(with_added_tokens=True) == 3


def test_encoder_on_char_tokenizer_without_eos_falls_back_to_tokenizers():
    # Built by hand without "<eos>": the encoder adds it as a special token, which must not break the ids.
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    enc = Encoder(tok)
    assert enc.separator == 3 and enc.vocab_size == 4
    assert enc.encode(["abc", ""]).tolist() == [1, 2, 0, 3, 3]


# --------------------------------------------------------------------------------------------- char vocabulary
CHAR_TEXT = ["aaaaa bbbb ccc dd e"]  # a:5 ' ':4 b:4 c:3 d:2 e:1


def _vocab(tok: Tokenizer) -> dict[str, int]:
    return tok.get_vocab(with_added_tokens=True)


def test_char_vocabulary_layout():
    tok = train_tokenizer("char", CHAR_TEXT)
    assert _vocab(tok) == {UNK: 0, EOS: 1, " ": 2, "a": 3, "b": 4, "c": 5, "d": 6, "e": 7}


def test_char_min_frequency_prunes_rare_characters():
    tok = train_tokenizer("char", CHAR_TEXT, min_frequency=3)
    assert set(_vocab(tok)) == {UNK, EOS, " ", "a", "b", "c"}
    enc = Encoder(tok)
    assert enc.path == "char-table"
    assert enc.encode(["dea"]).tolist() == [0, 0, tok.token_to_id("a"), 1]


def test_char_max_vocab_size_keeps_the_most_frequent():
    tok = train_tokenizer("char", CHAR_TEXT, max_vocab_size=5)
    # Two specials + the three most frequent: a (5), then ' ' and b (4 each).
    assert set(_vocab(tok)) == {UNK, EOS, "a", " ", "b"}
    assert tok.get_vocab_size() == 5
    enc = Encoder(tok)
    assert enc.encode(["abcde"]).tolist() == ids_of(tok, "abcde") + [1]
    assert ids_of(tok, "abcde")[2:] == [0, 0, 0]


def test_char_tokenizer_helper_sorts_by_code_point():
    tok = char_tokenizer("zay")
    assert _vocab(tok) == {UNK: 0, EOS: 1, "a": 2, "y": 3, "z": 4}


# --------------------------------------------------------------------------------------------- word level
WORD_TEXT = ["apple apple apple apple banana banana banana cherry cherry date", "apple banana"]


def test_word_max_vocab_size_keeps_the_most_frequent():
    tok = train_tokenizer("word", iter(WORD_TEXT), max_vocab_size=4)
    vocab = _vocab(tok)
    assert set(vocab) == {UNK, EOS, "apple", "banana"}
    assert vocab[UNK] == 0 and vocab[EOS] == 1
    enc = Encoder(tok)
    ids = enc.encode(["apple cherry date banana elderberry"]).tolist()
    assert ids == [vocab["apple"], 0, 0, vocab["banana"], 0, 1]


def test_word_min_frequency():
    tok = train_tokenizer("word", iter(WORD_TEXT), min_frequency=3)
    assert set(_vocab(tok)) == {UNK, EOS, "apple", "banana"}


def test_word_level_appends_one_eos_per_document():
    tok = train_tokenizer("word", iter(WORD_TEXT))
    enc = Encoder(tok)
    docs = ["apple banana", "", "cherry\n\ndate  apple", "   "]
    ids = enc.encode(docs).tolist()
    assert ids.count(enc.separator) == len(docs)
    assert ids == expected_stream(tok, docs, enc.separator)
    assert len(ids) == 2 + 1 + 0 + 1 + 3 + 1 + 0 + 1


def test_word_vocabulary_is_dense_when_the_text_contains_unk():
    texts = ["the cat sat on the <unk> mat", "a <unk> dog ran", "the end"] * 3
    tok = train_tokenizer("word", iter(texts))
    enc = Encoder(tok)
    # The model's embedding has enc.vocab_size rows: every id must index into it.
    ids = enc.encode(texts)
    assert int(ids.max()) < enc.vocab_size
    vocab = _vocab(tok)
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_bpe_literal_eos_in_text_is_not_the_separator(tokenizers_by_level):
    enc = Encoder(tokenizers_by_level["bpe"])
    ids = enc.encode(["before <eos> after"]).tolist()
    assert ids.count(enc.separator) == 1


# --------------------------------------------------------------------------------------------- misc
@pytest.mark.parametrize("level", LEVELS)
def test_dtype_is_uint16_for_small_vocabularies(tokenizers_by_level, level):
    enc = Encoder(tokenizers_by_level[level])
    assert enc.dtype == np.uint16
    assert enc.encode(["the cat"]).dtype == np.uint16


def test_dtype_is_uint32_for_large_vocabularies():
    vocab = {UNK: 0, EOS: 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    enc = Encoder(tok)
    assert enc.dtype == np.uint32
    ids = enc.encode(["w69999 w0"])
    assert ids.dtype == np.uint32 and ids.tolist() == [70_001, 2, 1]


def test_unknown_level_and_missing_vocab_size():
    with pytest.raises(TokenizerError, match="Unknown tokenizer"):
        train_tokenizer("chars", ["abc"])
    for level in ("bpe", "unigram", "wordpiece"):
        with pytest.raises(TokenizerError, match="vocab_size"):
            train_tokenizer(level, ["abc"])


# 50 Hangul syllables in words of 5, and the space: 51 distinct characters.
HANGUL = [" ".join("".join(chr(0xAC00 + (i * 7 + j) % 50) for j in range(5)) for i in range(40))] * 3


def test_an_alphabet_larger_than_a_unigram_vocabulary_is_one_message():
    with pytest.raises(TokenizerError, match=r"has 51 distinct characters, more than data.vocab_size=20 .*=bpe"):
        train_tokenizer("unigram", iter(HANGUL), vocab_size=20)
    assert train_tokenizer("unigram", iter(HANGUL), vocab_size=51).get_vocab_size() >= 51  # the limit is exact


def test_bpe_and_wordpiece_keep_every_character_of_a_large_alphabet():
    # Neither refuses a vocab_size below the alphabet's size: both grow past it rather than read a character as
    # unknown (bpe spells any character in bytes; wordpiece keeps each character, alone and as a continuation).
    for level in ("bpe", "wordpiece"):
        tok = train_tokenizer(level, iter(HANGUL), vocab_size=20)
        unknown = tok.token_to_id(UNK)
        ids = ids_of(tok, HANGUL[0])
        assert tok.get_vocab_size() > 20 and unknown not in ids, level
        assert tok.decode(ids).replace(" ", "") == HANGUL[0].replace(" ", ""), level


def test_a_failure_while_reading_the_texts_is_not_taken_for_a_large_alphabet(monkeypatch):
    monkeypatch.setattr(CharCounter, "batch_characters", 1)  # every character counted before the failure

    def texts():
        yield from HANGUL
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="disk went away"):
        train_tokenizer("unigram", texts(), vocab_size=20)


def test_tokenizers_parallelism_is_set_in_one_place(monkeypatch):
    from rnnlm.text.tokenization import PARALLELISM_VARIABLE, default_tokenizers_parallelism, tokenizers_parallelism

    monkeypatch.delenv(PARALLELISM_VARIABLE, raising=False)
    with tokenizers_parallelism(True):
        assert os.environ[PARALLELISM_VARIABLE] == "true"
    assert PARALLELISM_VARIABLE not in os.environ  # restored: it was unset
    default_tokenizers_parallelism()
    assert os.environ[PARALLELISM_VARIABLE] == "false"
    with pytest.raises(RuntimeError), tokenizers_parallelism(True):
        raise RuntimeError
    assert os.environ[PARALLELISM_VARIABLE] == "false"  # restored after an error too
    monkeypatch.setenv(PARALLELISM_VARIABLE, "true")
    default_tokenizers_parallelism()
    assert os.environ[PARALLELISM_VARIABLE] == "true"  # the user's choice stands
