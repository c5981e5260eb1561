"""Generation: nucleus sampling and its order with temperature and top-k, N samples as one batch, stopping at the
document separator, and ``rnnlm.generate``'s JSON output."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rnnlm import generate
from rnnlm.errors import UserError
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM, filter_logits
from rnnlm.sharing.lm import TrainedModel, load
from rnnlm.text.tokenization import char_tokenizer


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


# A hand-made distribution, in a shuffled vocabulary order so that the nucleus is not simply a prefix of the ids.
PROBS = {3: 0.5, 0: 0.25, 4: 0.125, 1: 0.0625, 2: 0.0625}
LOGITS = torch.tensor([math.log(PROBS[i]) for i in range(5)])


@pytest.mark.parametrize(("top_p", "nucleus"), [
    (0.2, {3}),                  # the most likely token is always kept
    (0.49, {3}),
    (0.51, {3, 0}),              # 0.5 does not reach 0.51: the second token is needed
    (0.74, {3, 0}),              # 0.75 reaches 0.74: the third token is not
    (0.76, {3, 0, 4}),
    (0.9, {3, 0, 4, 1}),         # 0.875 does not reach 0.9: one of the two tied 0.0625 tokens (the first) does
    (1.0, {0, 1, 2, 3, 4}),
])  # fmt: skip
def test_nucleus_is_the_smallest_set_of_most_likely_tokens_reaching_p(top_p, nucleus):
    out = filter_logits(LOGITS, top_p=top_p)
    assert kept(out) == nucleus
    # The kept tokens keep their relative probabilities: renormalised over the nucleus.
    mass = sum(PROBS[i] for i in nucleus)
    expected = torch.tensor([PROBS[i] / mass if i in nucleus else 0.0 for i in range(5)])
    torch.testing.assert_close(torch.softmax(out, -1), expected)
    # A batch of rows is filtered row by row (the second row is the first one reversed).
    batch = filter_logits(torch.stack([LOGITS, LOGITS.flip(0)]), top_p=top_p)
    assert kept(batch[0]) == nucleus
    if top_p == 0.9:  # which of two tied tokens comes first is the sort's choice
        assert len(kept(batch[1])) == 4 and {4 - i for i in (3, 0, 4)} <= kept(batch[1])
    else:
        assert kept(batch[1]) == {4 - i for i in nucleus}


def test_a_nucleus_that_reaches_p_exactly_takes_no_more_tokens():
    # Four equally likely tokens: probabilities of exactly 0.25, so two of them reach 0.5 without rounding.
    assert len(kept(filter_logits(torch.zeros(4), top_p=0.5))) == 2
    assert len(kept(filter_logits(torch.zeros(4), top_p=0.75))) == 3
    assert len(kept(filter_logits(torch.zeros(4), top_p=0.5000001))) == 3


def test_temperature_then_top_k_then_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-k first renormalises to [4/7, 3/7]; 4/7 alone reaches 0.5. (top-p first would keep two tokens.)
    assert kept(filter_logits(logits, top_k=2, top_p=0.5)) == {0}
    # A high temperature first flattens [0.6, 0.4] to about [0.5, 0.5], so 0.55 needs both tokens.
    two = torch.tensor([0.6, 0.4]).log()
    assert kept(filter_logits(two, top_p=0.55)) == {0}
    assert kept(filter_logits(two, temperature=100.0, top_p=0.55)) == {0, 1}
    # top-k keeps the tokens tied with the k-th.
    assert kept(filter_logits(torch.tensor([1.0, 2.0, 2.0, 0.0]), top_k=1)) == {1, 2}


def _model(vocab: int = 30, seed: int = 4) -> RNNLM:
    torch.manual_seed(seed)
    return RNNLM(RNNLMConfig(vocab, embedding_dim=8, hidden_size=8)).eval()


def test_a_tiny_nucleus_is_greedy():
    model, prompt = _model(), torch.tensor([1, 2, 3])
    greedy = model.generate(prompt, max_new_tokens=15, temperature=0)
    nucleus = model.generate(prompt, max_new_tokens=15, temperature=1.0, top_p=1e-6,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, nucleus)


def test_num_samples_is_one_batch_primed_once():
    model, prompt = _model(), torch.tensor([1, 2, 3])

    def draw(seed: int, **settings) -> torch.Tensor:
        return model.generate(prompt, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                              **settings)

    batch = draw(5, num_samples=6)
    assert batch.shape == (6, 12)
    assert torch.equal(batch, draw(5, num_samples=6))  # reproducible
    assert len({tuple(row) for row in batch.tolist()}) > 1  # the streams sample independently
    # Greedy: every stream is the single greedy continuation.
    greedy = model.generate(prompt, max_new_tokens=12, temperature=0, num_samples=3)
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=12, temperature=0).expand(3, -1))
    # A [B, T] prompt gives B * num_samples rows, each prompt's streams next to each other.
    two = model.generate(torch.stack([prompt, prompt.flip(0)]), max_new_tokens=12, temperature=0, num_samples=2)
    assert torch.equal(two[2], model.generate(prompt.flip(0), max_new_tokens=12, temperature=0))
    assert torch.equal(two[0], two[1]) and torch.equal(two[2], two[3])


def test_streams_stop_at_the_stop_token():
    model, prompt = _model(vocab=4), torch.tensor([1])
    free = model.generate(prompt, max_new_tokens=40, temperature=1.0,
                         generator=torch.Generator().manual_seed(2), num_samples=8)
    stopped = model.generate(prompt, max_new_tokens=40, temperature=1.0,
                         generator=torch.Generator().manual_seed(2), num_samples=8,
                             stop_token=0)
    # Same draws until each stream stops; after its stop token a stream only repeats it.
    ends = []
    for a, b in zip(free.tolist(), stopped.tolist(), strict=True):
        assert 0 in b
        end = b.index(0) + 1
        assert b[:end] == a[:end] and set(b[end:]) <= {0}
        ends.append(end)
    assert stopped.size(1) == max(ends) < 40  # sampling ended when every stream had stopped


def _char_model(stop_bias: float) -> TrainedModel:
    """An untrained char-level model whose decoder favours the separator by ``stop_bias`` and never writes the
    unknown token (so that every other token is one character)."""
    tokenizer = char_tokenizer("abcdefgh ")
    torch.manual_seed(0)
    model = RNNLM(RNNLMConfig(tokenizer.get_vocab_size(), embedding_dim=8, hidden_size=8)).eval()
    trained = TrainedModel(model=model, tokenizer=tokenizer)
    with torch.no_grad():
        model.decoder.bias[trained.encoder.separator] = stop_bias
        model.decoder.bias[tokenizer.token_to_id("<unk>")] = -100.0
    return trained


def test_samples_stop_at_the_separator():
    lm = _char_model(stop_bias=2.5)
    free = lm.samples("ab", num_samples=8, max_new_tokens=30, temperature=1.0, seed=3)
    assert all(s.tokens == 30 and not s.stopped_at_separator for s in free)
    assert any("<eos>" in s.text for s in free)  # without stopping, the separator is written out
    stopped = lm.samples("ab", num_samples=8, max_new_tokens=30, temperature=1.0, seed=3, stop_at_separator=True)
    assert any(s.stopped_at_separator for s in stopped)
    for f, s in zip(free, stopped, strict=True):
        assert s.prompt == "ab" and "<eos>" not in s.text
        if s.stopped_at_separator:
            assert f.text.startswith(s.text + "<eos>") and len(s.text) == s.tokens - 1
        else:
            assert s.text == f.text and s.tokens == 30
    # The single-text API is the first of one sample.
    assert lm.sample("ab", max_new_tokens=30, temperature=1.0, seed=3, stop_at_separator=True) == lm.samples(
        "ab", num_samples=1, max_new_tokens=30, temperature=1.0, seed=3, stop_at_separator=True)[0].text


def test_sampling_settings_are_checked():
    model, prompt = _model(), torch.tensor([1])
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"top_k": 0}, {"temperature": -1.0}, {"num_samples": 0}):
        with pytest.raises(ValueError):
            model.generate(prompt, max_new_tokens=3, **{"temperature": 1.0, **bad})


@pytest.fixture
def checkpoint(tiny_lm_checkpoint):
    return tiny_lm_checkpoint


def test_generate_json_lines(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "the", "--max_new_tokens", "25", "--num_samples", "4",
            "--top_p", "0.9", "--top_k", "20", "--temperature", "1.2", "--seed", "7", "--json", "--stop_at_separator"]
    samples = generate.main(args)
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4 and [r["index"] for r in records] == [0, 1, 2, 3]
    for record, sample in zip(records, samples, strict=True):
        assert record["prompt"] == "the" and record["text"] == sample.text and record["tokens"] == sample.tokens
        assert record["stopped_at_separator"] == sample.stopped_at_separator
        assert (record["seed"], record["top_p"], record["top_k"], record["temperature"]) == (7, 0.9, 20, 1.2)
    # The same seed gives the same texts: those of the Python API with the same settings.
    assert generate.main(args) == samples
    lm = load(checkpoint)
    assert samples == lm.samples("the", num_samples=4, max_new_tokens=25, temperature=1.2, top_k=20, top_p=0.9, seed=7,
                                 stop_at_separator=True)


def test_generate_without_a_seed_reports_the_one_it_drew(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--max_new_tokens", "10", "--json"]
    first = generate.main(args)
    record = json.loads(capsys.readouterr().out)
    again = generate.main([*args, "--seed", str(record["seed"])])
    assert again == first


def test_generate_plain_text_separates_samples(checkpoint, capsys):
    generate.main(["--checkpoint", str(checkpoint), "--prompt", "a", "--max_new_tokens", "5", "--num_samples", "2",
                   "--seed", "1"])
    out = capsys.readouterr().out
    assert "--- sample 1 of 2 ---" in out and "--- sample 2 of 2 ---" in out
    with pytest.raises(UserError, match=r"--top_p must be in \(0, 1\]"):  # one message, exit status 1 from cli()
        generate.main(["--checkpoint", str(checkpoint), "--top_p", "0"])


def test_sampling_settings_are_keywords_after_the_prompt():
    """One signature: after the prompt every sampling setting is named, so two orders cannot disagree."""
    with pytest.raises(TypeError):
        _model(vocab=4).generate(torch.tensor([1]), 5)
    lm = _char_model(stop_bias=0.0)
    with pytest.raises(TypeError):
        lm.samples("ab", 2)
    with pytest.raises(TypeError):
        lm.sample("ab", 5)
