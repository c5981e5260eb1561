"""The plain nn.Module: textbook semantics, carried state, tying, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnlm.network.config import CELLS, RNNLMConfig
from rnnlm.network.lm import RNNLM, detach_state
from rnnlm.text.tokenization import Encoder, char_tokenizer


def test_elman_learns_hello():
    """The textbook example: trained on "hello", a char-level Elman RNN predicts e, l, l, o after h, e, l, l.

    The second "l" must be followed by "o" but the first by "l", so the network has to use its hidden state.
    """
    torch.manual_seed(0)
    enc = Encoder(char_tokenizer("helo"))
    ids = torch.tensor([enc.tokenizer.encode("hello").ids])
    x, y = ids[:, :-1], ids[:, 1:]
    model = RNNLM(RNNLMConfig(enc.vocab_size, cell="rnn_tanh", input_mode="one_hot", num_layers=1, hidden_size=16))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    predicted = enc.decode(model(x).logits.argmax(-1)[0].tolist())
    assert predicted == "ello"


def test_one_hot_elman_is_the_textbook_recurrence():
    """input_mode=one_hot + rnn_tanh computes h_t = tanh(W_hh h_{t-1} + W_xh x_t + b), y_t = W_hy h_t + c."""
    torch.manual_seed(1)
    V, H = 7, 5
    model = RNNLM(RNNLMConfig(V, cell="rnn_tanh", input_mode="one_hot", num_layers=1, hidden_size=H)).eval()
    idx = torch.randint(0, V, (2, 9))
    out = model(idx)
    logits, h_last = out.logits, out.state

    rnn = model.rnn
    W_xh, W_hh, b = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0
    h = torch.zeros(2, H)  # h_0 = 0
    expected = []
    for t in range(idx.size(1)):
        x_t = F.one_hot(idx[:, t], V).float()
        h = torch.tanh(h @ W_hh.T + x_t @ W_xh.T + b)
        expected.append(h @ model.decoder.weight.T + model.decoder.bias)
    torch.testing.assert_close(logits, torch.stack(expected, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_last[0], h, rtol=1e-5, atol=1e-5)


def test_embedding_equals_one_hot_times_input_weight():
    """An embedding lookup is W applied to a one-hot vector: copy W_xh into an embedding and get equal logits."""
    torch.manual_seed(2)
    V, H = 11, 6
    one_hot = RNNLM(RNNLMConfig(V, cell="gru", input_mode="one_hot", num_layers=2, hidden_size=H)).eval()
    emb = RNNLM(RNNLMConfig(V, cell="gru", input_mode="embedding", num_layers=2, hidden_size=H, embedding_dim=V)).eval()
    state = one_hot.state_dict()
    emb_state = emb.state_dict()
    for k in emb_state:
        if k in state:
            emb_state[k] = state[k]
    # Embedding row v feeds W_ih[:, v]; with the identity as table and W_ih copied, the two agree.
    emb_state["embedding.weight"] = torch.eye(V)
    emb.load_state_dict(emb_state)
    idx = torch.randint(0, V, (3, 10))
    torch.testing.assert_close(emb(idx).logits, one_hot(idx).logits)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_carried_state_equals_one_long_pass(cell, num_layers):
    """Running a sequence chunk by chunk with the (detached) state carried gives the outputs of one long pass."""
    torch.manual_seed(3)
    model = RNNLM(RNNLMConfig(23, cell=cell, num_layers=num_layers, embedding_dim=8, hidden_size=12)).eval()
    idx = torch.randint(0, 23, (4, 61))
    whole = model(idx)
    full, full_state = whole.logits, whole.state
    outs, state = [], None
    for start in range(0, idx.size(1), 7):  # 7 does not divide 61: the last chunk is short
        out = model(idx[:, start : start + 7], state=state)
        state = detach_state(out.state)
        outs.append(out.logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    if cell == "lstm":
        for a, b in zip(state, full_state, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(state, full_state, rtol=1e-5, atol=1e-5)


def test_detached_state_cuts_the_gradient():
    model = RNNLM(RNNLMConfig(10, cell="lstm", num_layers=2, embedding_dim=4, hidden_size=4))
    out = model(torch.randint(0, 10, (2, 5)))
    first, carried = out.logits, detach_state(out.state)
    assert all(not s.requires_grad for s in carried)
    second = model(torch.randint(0, 10, (2, 5)), state=carried).logits
    second.sum().backward()  # would fail with "backward through the graph a second time" if not cut
    first.sum().backward()


def test_tied_weights_share_storage_and_project_when_sizes_differ():
    same = RNNLM(RNNLMConfig(50, embedding_dim=16, hidden_size=16, tie_weights=True))
    assert same.decoder.weight is same.embedding.weight and same.projection is None
    proj = RNNLM(RNNLMConfig(50, embedding_dim=8, hidden_size=16, tie_weights=True))
    assert proj.decoder.weight is proj.embedding.weight
    assert proj.projection.weight.shape == (8, 16)
    logits = proj(torch.randint(0, 50, (2, 3))).logits
    assert logits.shape == (2, 3, 50)
    untied = RNNLM(RNNLMConfig(50, embedding_dim=8, hidden_size=16))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(proj) == 50 * 16 - 8 * 16  # decoder table shared, projection added


def test_dropout_only_in_training_mode():
    model = RNNLM(RNNLMConfig(20, embedding_dim=8, hidden_size=8, num_layers=2, dropout_embedding=0.5,
                              dropout_between=0.5, dropout_output=0.5))
    idx = torch.randint(0, 20, (2, 6))
    model.eval()
    torch.testing.assert_close(model(idx).logits, model(idx).logits)
    model.train()
    assert not torch.allclose(model(idx).logits, model(idx).logits)


def test_generate_is_reproducible_and_greedy_matches_top1():
    torch.manual_seed(4)
    model = RNNLM(RNNLMConfig(30, embedding_dim=8, hidden_size=8)).eval()
    prompt = torch.tensor([1, 2, 3])
    a = model.generate(prompt, max_new_tokens=20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, max_new_tokens=20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a.shape == (20,) and torch.equal(a, b)
    greedy = model.generate(prompt, max_new_tokens=10, temperature=0)
    top1 = model.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=1,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, top1)
    # Greedy decoding by hand: each step feeds the argmax back with the carried state.
    out = model(prompt[None])
    expected = []
    for _ in range(10):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        expected.append(nxt.item())
        out = model(nxt, state=out.state)
    assert greedy.tolist() == expected
