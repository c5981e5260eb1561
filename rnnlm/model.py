"""The recurrent language model: a plain ``nn.Module``, readable top to bottom, usable without Lightning.

    idx [B, T] -> input vectors x_t -> fused RNN stack -> h_t -> (projection) -> logits y_t [B, T, V]

With ``cell="rnn_tanh"`` and ``input_mode="one_hot"`` this is exactly the textbook Elman network

    h_t = tanh(W_hh h_{t-1} + W_xh x_t + b),    y_t = W_hy h_t + c,    p(w_{t+1}) = softmax(y_t)

where x_t is a fixed one-hot vector and W_xh is the RNN's own input weight. With ``input_mode="embedding"``
(the default) W_xh is factored through a learned embedding table: a learned matrix applied to a one-hot vector
*is* a table lookup, so the two are the same family of models and the embedding is just cheaper.

The hidden state is an explicit input and output of ``forward`` so that any caller can carry it across chunks
(truncated BPTT); ``h_0`` is zeros when no state is given.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = Union[Tensor, tuple[Tensor, Tensor]]  # noqa: UP007 - a runtime alias, Python 3.10 compatible

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
INPUT_MODES = ("embedding", "one_hot")


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried state, so backpropagation stops at the chunk boundary."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


class RNNLM(nn.Module):
    """A multi-layer recurrent language model on torch's fused RNN kernels (cuDNN on GPU).

    Args:
        vocab_size: number of token ids.
        cell: ``rnn_tanh`` (Elman), ``rnn_relu``, ``lstm`` or ``gru``.
        num_layers: stacked recurrent layers.
        embedding_dim: size of the input embedding (ignored with ``input_mode="one_hot"``).
        hidden_size: size of each recurrent layer's state.
        input_mode: ``embedding`` (a learned lookup table) or ``one_hot`` (fixed one-hot inputs fed straight
            into the RNN, whose input weight is then W_xh).
        dropout_embedding: dropout on the input vectors.
        dropout_between: dropout between stacked recurrent layers.
        dropout_output: dropout on the top layer's output, before the decoder.
        tie_weights: share the embedding table with the decoder (Press & Wolf 2017; Inan et al. 2017). When
            ``hidden_size != embedding_dim`` a linear projection maps the hidden state to the embedding size.
    """

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        num_layers: int = 2,
        embedding_dim: int = 200,
        hidden_size: int = 200,
        input_mode: str = "embedding",
        dropout_embedding: float = 0.0,
        dropout_between: float = 0.0,
        dropout_output: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"Unknown cell {cell!r}; choose one of {', '.join(CELLS)}.")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"Unknown input_mode {input_mode!r}; choose one of {', '.join(INPUT_MODES)}.")
        for name, value in (
            ("vocab_size", vocab_size),
            ("num_layers", num_layers),
            ("embedding_dim", embedding_dim),
            ("hidden_size", hidden_size),
        ):
            _positive(name, value)
        for name, p in (
            ("dropout_embedding", dropout_embedding),
            ("dropout_between", dropout_between),
            ("dropout_output", dropout_output),
        ):
            _probability(name, p)
        if tie_weights and input_mode == "one_hot":
            raise ValueError(
                "tie_weights needs an embedding table to share, but input_mode='one_hot' has none; "
                "use input_mode='embedding' or tie_weights=false."
            )

        self.vocab_size = vocab_size
        self.cell = cell
        self.input_mode = input_mode

        if input_mode == "embedding":
            self.embedding: nn.Embedding | None = nn.Embedding(vocab_size, embedding_dim)
            input_size = embedding_dim
        else:
            self.embedding = None
            input_size = vocab_size
        self.drop_in = nn.Dropout(dropout_embedding)

        rnn_kwargs = dict(
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout_between if num_layers > 1 else 0.0,
            batch_first=True,
        )
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(**rnn_kwargs)
        elif cell == "gru":
            self.rnn = nn.GRU(**rnn_kwargs)
        else:
            self.rnn = nn.RNN(nonlinearity=cell.removeprefix("rnn_"), **rnn_kwargs)
        self.drop_out = nn.Dropout(dropout_output)

        # Tying needs the decoder input to have the embedding's size.
        if tie_weights and hidden_size != embedding_dim:
            self.projection: nn.Linear | None = nn.Linear(hidden_size, embedding_dim, bias=False)
            decoder_in = embedding_dim
        else:
            self.projection = None
            decoder_in = hidden_size
        self.decoder = nn.Linear(decoder_in, vocab_size)

        self._init_weights()
        if tie_weights:
            self.decoder.weight = self.embedding.weight  # type: ignore[union-attr]

    def _init_weights(self) -> None:
        # The small uniform init of Zaremba et al. / pytorch's word_language_model; the recurrent weights keep
        # torch's default U(-1/sqrt(H), 1/sqrt(H)).
        if self.embedding is not None:
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Map token ids ``[B, T]`` to next-token logits ``[B, T, V]`` and the state after the last step."""
        if self.embedding is not None:
            x = self.embedding(idx)
        else:
            x = F.one_hot(idx, self.vocab_size).to(self.decoder.weight.dtype)
        x = self.drop_in(x)
        h, state = self.rnn(x, state)
        h = self.drop_out(h)
        if self.projection is not None:
            h = self.projection(h)
        return self.decoder(h), state

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` ids after ``prompt`` (``[T]`` or ``[B, T]``, T >= 1) and return only the new ids.

        The whole prompt primes the hidden state in one fused pass; sampling then feeds back one token at a time.
        ``temperature=0`` picks the most likely token (greedy); ``top_k`` keeps only the k most likely tokens.
        """
        if prompt.dim() == 1:
            return self.generate(prompt[None], max_new_tokens, temperature, top_k, generator)[0]
        if prompt.size(1) == 0:
            raise ValueError("generate needs at least one prompt token to condition on.")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        logits, state = self(prompt)
        out = []
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None and top_k < last.size(-1):
                    kth = torch.topk(last, top_k, dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                probs = torch.softmax(last, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(nxt)
            logits, state = self(nxt, state)
        if not out:
            return prompt.new_empty(prompt.size(0), 0)
        return torch.cat(out, dim=1)
