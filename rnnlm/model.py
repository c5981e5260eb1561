"""The recurrent language model: a plain ``nn.Module``, readable top to bottom, usable without Lightning.

    idx [B, T] -> input vectors x_t -> fused RNN stack -> h_t -> (projection) -> logits y_t [B, T, V]

With ``cell="rnn_tanh"`` and ``input_mode="one_hot"`` this is exactly the textbook Elman network

    h_t = tanh(W_hh h_{t-1} + W_xh x_t + b),    y_t = W_hy h_t + c,    p(w_{t+1}) = softmax(y_t)

where x_t is a fixed one-hot vector and W_xh is the RNN's own input weight. With ``input_mode="embedding"``
(the default) W_xh is factored through a learned embedding table: a learned matrix applied to a one-hot vector
*is* a table lookup, so the two are the same family of models and the embedding is just cheaper.

The hidden state is an explicit input and output of ``forward`` so that any caller can carry it across chunks
(truncated BPTT); ``h_0`` is zeros when no state is given.

AWD-LSTM regularisation (Merity et al. 2017, "Regularizing and Optimizing LSTM Language Models") is built in, each
part off by default: weight drop (DropConnect on the hidden-to-hidden weights), locked (variational) dropout,
embedding dropout of whole words, and a size per layer. When one of them needs it, the recurrent stack runs its
layers one by one (:class:`LayerStack`), each still a fused kernel call; otherwise it is one fused multi-layer module.

``bidirectional=True`` adds a second, independent recurrent stack that reads the stream right to left and
predicts the previous token (a backward language model, as in ELMo). It is deliberately *not*
``nn.LSTM(bidirectional=True)``: that module feeds both directions' outputs to the next layer, so from layer 2 on
the forward direction would see the tokens it predicts. The backward stack is called with ``direction="backward"``
on an input that is already in reversed order (the data pipeline serves reversed chunks), so both directions run
on the fused kernels and carry their own state.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = Union[Tensor, tuple[Tensor, Tensor], list]  # noqa: UP007 - a runtime alias, Python 3.10 compatible

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
OUTPUTS = ("softmax", "adaptive")
# Default cluster boundaries of the adaptive softmax: those below the vocabulary size are used.
DEFAULT_CUTOFFS = (2000, 10000, 50000, 200000)
INPUT_MODES = ("embedding", "one_hot")
DIRECTIONS = ("forward", "backward")


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried state, so backpropagation stops at the chunk boundary.

    A state is a tensor ``[L, B, H]``, an LSTM's ``(h, c)`` pair, or (for a :class:`LayerStack`) a list with one
    such state per layer.
    """
    if state is None:
        return None
    if isinstance(state, list):
        return [detach_state(s) for s in state]  # type: ignore[misc]
    if isinstance(state, tuple):
        return tuple(detach_state(s) for s in state)  # type: ignore[return-value]
    return state.detach()


def state_batch_size(state: State) -> int:
    """Number of streams a carried state is for (its dimension 1, whatever its nesting)."""
    while not isinstance(state, Tensor):
        state = state[0]  # type: ignore[index]
    return state.size(1)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


_FUSED_CALLS = {"lstm": torch.lstm, "gru": torch.gru, "rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu}


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0) -> nn.RNNBase:
    """torch's fused recurrent module for ``cell`` (batch first)."""
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, dropout=dropout,
                  batch_first=True)
    if cell == "lstm":
        return nn.LSTM(**kwargs)
    if cell == "gru":
        return nn.GRU(**kwargs)
    return nn.RNN(nonlinearity=cell.removeprefix("rnn_"), **kwargs)


class LockedDropout(nn.Module):
    """Variational dropout (Gal & Ghahramani 2016): one mask per sequence, the same at every time step of a chunk.

    Inputs are ``[B, T, D]``; the mask is ``[B, 1, D]``, scaled by ``1 / (1 - p)`` so eval needs no rescaling.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerStack(nn.Module):
    """Recurrent layers run one after the other, for what one fused multi-layer module cannot do: a size per layer,
    locked dropout between layers and weight drop.

    Weight drop (DropConnect on W_hh, Wan et al. 2013, as used by AWD-LSTM) draws one mask over the recurrent
    weight matrix per forward call, so the same dropped connections are used at every time step. The dropped
    matrix is written together with the layer's other weights into one fresh contiguous buffer, in the order
    (W_ih, W_hh, b_ih, b_hh) that cuDNN's packed-weight layout has for a single layer, and views of that buffer
    go straight to the fused kernel (``torch.lstm`` & co.). cuDNN then finds its weights packed and runs at full
    speed: no per-step "weights are not part of single contiguous chunk of memory" repacking, no warning, and no
    module attribute swapping (the slow path of the reference implementation). Gradients reach W_hh through the
    mask as usual.

    Each layer is a one-layer torch module (``layers.<i>.weight_hh_l0`` in the state dict); the state is a list
    with one entry per layer in that module's own format (``[1, B, H]``, or ``(h, c)`` for an LSTM).
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_sizes: list[int],
        dropout_between: float = 0.0,
        locked_dropout: bool = False,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.hidden_sizes = list(hidden_sizes)
        self.weight_drop = weight_drop
        inputs = [input_size, *hidden_sizes[:-1]]
        self.layers = nn.ModuleList(make_rnn(cell, i, h) for i, h in zip(inputs, hidden_sizes))
        self.drop_between = LockedDropout(dropout_between) if locked_dropout else nn.Dropout(dropout_between)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _run_layer(self, layer: nn.RNNBase, x: Tensor, state: State | None) -> tuple[Tensor, State]:
        if not (self.training and self.weight_drop > 0):
            return layer(x, state)
        w_ih, w_hh, b_ih, b_hh = layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0
        dropped = F.dropout(w_hh, self.weight_drop, training=True)
        parts = (w_ih, dropped, b_ih, b_hh)
        packed = torch.cat([t.reshape(-1) for t in parts])
        weights = [flat.view(t.shape) for flat, t in zip(packed.split([t.numel() for t in parts]), parts)]
        if state is None:
            zeros = x.new_zeros(1, x.size(0), layer.hidden_size)
            state = (zeros, zeros) if self.cell == "lstm" else zeros
        hx = list(state) if self.cell == "lstm" else state
        # Arguments: weights, has_biases, num_layers, dropout, train, bidirectional, batch_first.
        out = _FUSED_CALLS[self.cell](x, hx, weights, True, 1, 0.0, True, False, True)
        return out[0], (out[1], out[2]) if self.cell == "lstm" else out[1]

    def forward(self, x: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        states = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self.drop_between(x)
            x, layer_state = self._run_layer(layer, x, None if state is None else state[i])
            states.append(layer_state)
        return x, states


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
        dropout_embedding: dropout on the input vectors (AWD-LSTM's ``dropouti``).
        dropout_between: dropout between stacked recurrent layers (``dropouth``).
        dropout_output: dropout on the top layer's output, before the decoder (``dropout``).
        tie_weights: share the embedding table with the decoder (Press & Wolf 2017; Inan et al. 2017). When the top
            layer's size differs from ``embedding_dim`` a linear projection maps it to the embedding size.
        bidirectional: add an independent backward stack (a right-to-left language model).
        share_directions: the backward direction shares the forward one's embedding and output layer (as in
            ELMo); ``False`` gives it its own.
        output: ``softmax`` (a linear decoder and a full softmax) or ``adaptive``: the adaptive softmax of
            Grave et al. (2017), a small head over the frequent ids plus clusters of rarer ids in smaller
            projections. It is an exact distribution, much cheaper when the vocabulary is large, and assumes ids
            sorted by frequency (the word tokenizer's ids are).
        adaptive_cutoffs: the cluster boundaries of the adaptive softmax (increasing ids, each below
            ``vocab_size - 1``); default: those of 2000, 10000, 50000, 200000 below the vocabulary size.
        adaptive_div_value: each cluster's projection is this many times narrower than the previous one.
        hidden_sizes: one size per layer (``num_layers`` entries), overriding ``hidden_size``; AWD-LSTM makes the
            last one ``embedding_dim`` so that tying needs no projection (e.g. ``[1150, 1150, 400]``).
        weight_drop: DropConnect probability on the hidden-to-hidden weights (``wdrop``), one mask per chunk.
        locked_dropout: make the three dropouts above variational (one mask per sequence for the whole chunk).
        dropout_words: embedding dropout (``dropoute``): drop whole words, i.e. the same word everywhere in a
            chunk, scaling the kept ones by ``1 / (1 - p)``.
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
        bidirectional: bool = False,
        share_directions: bool = True,
        output: str = "softmax",
        adaptive_cutoffs: list[int] | None = None,
        adaptive_div_value: float = 4.0,
        hidden_sizes: list[int] | None = None,
        weight_drop: float = 0.0,
        locked_dropout: bool = False,
        dropout_words: float = 0.0,
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
            ("weight_drop", weight_drop),
            ("dropout_words", dropout_words),
        ):
            _probability(name, p)
        if hidden_sizes is not None:
            if len(hidden_sizes) != num_layers:
                raise ValueError(
                    f"hidden_sizes has {len(hidden_sizes)} entries but num_layers is {num_layers}: give one size per "
                    "layer (or set num_layers to match)."
                )
            for i, size in enumerate(hidden_sizes):
                _positive(f"hidden_sizes[{i}]", size)
        if output not in OUTPUTS:
            raise ValueError(f"Unknown output {output!r}; choose one of {', '.join(OUTPUTS)}.")
        if output == "adaptive":
            hidden_size = hidden_sizes[-1] if hidden_sizes is not None else hidden_size
            adaptive_cutoffs = _adaptive_cutoffs(vocab_size, adaptive_cutoffs, adaptive_div_value, tie_weights)
            for i in range(1, len(adaptive_cutoffs) + 1):
                if hidden_size // adaptive_div_value**i < 1:
                    raise ValueError(
                        f"adaptive_div_value={adaptive_div_value} leaves cluster {i} with no dimensions "
                        f"(hidden_size {hidden_size} // {adaptive_div_value}**{i} = 0): lower it or use fewer cutoffs."
                    )
        if tie_weights and input_mode == "one_hot":
            raise ValueError(
                "tie_weights needs an embedding table to share, but input_mode='one_hot' has none; "
                "use input_mode='embedding' or tie_weights=false."
            )

        self.vocab_size = vocab_size
        self.cell = cell
        self.input_mode = input_mode
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.output = output
        self._adaptive = (adaptive_cutoffs, adaptive_div_value)
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [hidden_size] * num_layers
        self.weight_drop = weight_drop
        self.locked_dropout = locked_dropout
        self.dropout_words = dropout_words
        self._sizes = (vocab_size, embedding_dim, dropout_between, tie_weights)

        drop = LockedDropout if locked_dropout else nn.Dropout
        self.drop_in = drop(dropout_embedding)
        self.drop_out = drop(dropout_output)
        self.embedding, self.rnn, self.projection, self.decoder = self._direction_modules(share=None)
        if bidirectional:
            shared = (self.embedding, self.projection, self.decoder) if share_directions else None
            parts = self._direction_modules(share=shared)
            self.embedding_backward, self.rnn_backward, self.projection_backward, self.decoder_backward = parts

    @property
    def per_layer(self) -> bool:
        """Whether the stack runs layer by layer (needed for per-layer sizes, weight drop, locked dropout between)."""
        _, _, dropout_between, _ = self._sizes
        locked_between = self.locked_dropout and dropout_between > 0 and self.num_layers > 1
        return len(set(self.hidden_sizes)) > 1 or self.weight_drop > 0 or locked_between

    def _direction_modules(self, share: tuple | None) -> tuple:
        """Embedding, recurrent stack, projection and decoder of one direction (input/output layers shared or new)."""
        vocab_size, embedding_dim, dropout_between, tie_weights = self._sizes
        input_size = embedding_dim if self.input_mode == "embedding" else vocab_size
        top = self.hidden_sizes[-1]
        if self.per_layer:
            rnn: nn.Module = LayerStack(
                self.cell, input_size, self.hidden_sizes, dropout_between, self.locked_dropout, self.weight_drop
            )
        else:
            # One fused call for the whole stack: the fastest path, and the plain model's state-dict names.
            rnn = make_rnn(self.cell, input_size, top, self.num_layers, dropout_between if self.num_layers > 1 else 0.0)
        if share is not None:
            embedding, projection, decoder = share
            return embedding, rnn, projection, decoder

        embedding = nn.Embedding(vocab_size, embedding_dim) if self.input_mode == "embedding" else None
        # Tying needs the decoder input to have the embedding's size.
        projection = None
        if tie_weights and top != embedding_dim:
            projection = nn.Linear(top, embedding_dim, bias=False)
        head_size = embedding_dim if projection is not None else top
        if self.output == "adaptive":
            cutoffs, div_value = self._adaptive
            decoder: nn.Module = nn.AdaptiveLogSoftmaxWithLoss(
                head_size, vocab_size, cutoffs, div_value=div_value, head_bias=True
            )
        else:
            decoder = nn.Linear(head_size, vocab_size)
        # The small uniform init of Zaremba et al. / pytorch's word_language_model; the recurrent weights keep
        # torch's default U(-1/sqrt(H), 1/sqrt(H)). (Modules first, then init: a seed gives the same weights as
        # before the adaptive softmax existed.)
        if embedding is not None:
            nn.init.uniform_(embedding.weight, -0.1, 0.1)
        if isinstance(decoder, nn.Linear):
            nn.init.uniform_(decoder.weight, -0.1, 0.1)
            nn.init.zeros_(decoder.bias)
        if tie_weights:
            decoder.weight = embedding.weight  # type: ignore[union-attr]
        return embedding, rnn, projection, decoder

    def _parts(self, direction: str) -> tuple:
        if direction == "forward":
            return self.embedding, self.rnn, self.projection, self.decoder
        if direction == "backward" and self.bidirectional:
            return self.embedding_backward, self.rnn_backward, self.projection_backward, self.decoder_backward
        raise ValueError(
            f"direction must be one of {DIRECTIONS} (backward needs bidirectional=True), got {direction!r}"
        )

    def embed(self, idx: Tensor, direction: str = "forward") -> Tensor:
        """Input vectors x_t of the ids (an embedding row, or the fixed one-hot vector)."""
        embedding = self._parts(direction)[0]
        if embedding is None:
            return F.one_hot(idx, self.vocab_size).to(self._parts(direction)[1].weight_ih_l0.dtype)
        return embedding(idx)

    def _drop_words(self, x: Tensor, idx: Tensor) -> Tensor:
        # One keep/drop draw per vocabulary entry, looked up per position: the same as masking the embedding table's
        # rows (Gal & Ghahramani 2016) without touching the whole table.
        if not self.training or self.dropout_words == 0:
            return x
        keep = x.new_empty(self.vocab_size).bernoulli_(1 - self.dropout_words).div_(1 - self.dropout_words)
        return x * keep[idx].unsqueeze(-1)

    def recurrent(self, idx: Tensor, state: State | None = None, direction: str = "forward") -> tuple[Tensor, State]:
        """The top recurrent layer's output ``[B, T, H]`` (before output dropout) and the state after the last step."""
        rnn = self._parts(direction)[1]
        x = self.drop_in(self._drop_words(self.embed(idx, direction), idx))
        return rnn(x, state)

    def head_input(self, top: Tensor, direction: str = "forward") -> Tensor:
        """What the decoder reads from the top layer's output: after output dropout and the tying projection."""
        projection = self._parts(direction)[2]
        h = self.drop_out(top)
        return projection(h) if projection is not None else h

    def features(self, idx: Tensor, state: State | None = None, direction: str = "forward") -> tuple[Tensor, State]:
        """The decoder's input ``[B, T, D]`` for ids ``[B, T]`` and the state after the last step."""
        top, state = self.recurrent(idx, state, direction)
        return self.head_input(top, direction), state

    def decode(self, hidden: Tensor, direction: str = "forward") -> Tensor:
        """Logits ``[B, T, V]`` of the decoder input ``hidden`` (exact log-probabilities with the adaptive softmax,
        which sampling and cross-entropy treat like logits)."""
        decoder = self._parts(direction)[3]
        if self.output == "adaptive":
            with _no_autocast(hidden):
                flat = hidden.reshape(-1, hidden.size(-1)).float()
                return decoder.log_prob(flat).view(*hidden.shape[:-1], -1)
        return decoder(hidden)

    def head_loss(self, hidden: Tensor, targets: Tensor, direction: str = "forward") -> Tensor:
        """Mean cross-entropy (nats/token) of ``targets`` from the decoder input ``hidden``.

        The adaptive softmax computes only the clusters that the targets fall in, never the full ``[B, T, V]``
        distribution; its loss is exactly ``-mean log p(target)``.
        """
        decoder = self._parts(direction)[3]
        if self.output == "adaptive":
            with _no_autocast(hidden):
                return decoder(hidden.reshape(-1, hidden.size(-1)).float(), targets.reshape(-1)).loss
        logits = decoder(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def forward(self, idx: Tensor, state: State | None = None, direction: str = "forward") -> tuple[Tensor, State]:
        """Map token ids ``[B, T]`` to logits ``[B, T, V]`` of the next token and the state after the last step.

        With ``output="adaptive"`` the "logits" are the exact log-probabilities (softmax of them is the model's
        distribution, so sampling and cross-entropy treat them like logits). ``direction="backward"`` runs the
        backward stack; give it the ids in reversed order, and its "next" token is then the previous one of the
        original order.
        """
        hidden, state = self.features(idx, state, direction)
        return self.decode(hidden, direction), state

    def loss(
        self, idx: Tensor, targets: Tensor, state: State | None = None, direction: str = "forward"
    ) -> tuple[Tensor, State]:
        """Mean cross-entropy (nats/token) of ``targets`` given ``idx``, and the last state."""
        hidden, state = self.features(idx, state, direction)
        return self.head_loss(hidden, targets, direction), state

    def layer_outputs(self, x: Tensor, direction: str = "forward") -> list[Tensor]:
        """Every layer's output sequence ``[B, T, H]`` for input vectors ``x`` read in the order given (eval use).

        The fused module only returns its top layer, so each layer is run on its own with that layer's weights.
        """
        rnn = self._parts(direction)[1]
        outputs, h = [], x
        if isinstance(rnn, LayerStack):
            for layer in rnn.layers:
                h, _ = layer(h)
                outputs.append(h)
            return outputs
        for layer in range(rnn.num_layers):
            kwargs = {**_rnn_kwargs(rnn), "num_layers": 1}
            if layer > 0:
                kwargs["input_size"] = rnn.hidden_size
            single = type(rnn)(**kwargs).to(x.device)  # a one-layer shell; functional_call supplies the weights
            weights = {
                name.removesuffix(f"_l{layer}") + "_l0": p
                for name, p in rnn.named_parameters()
                if name.endswith(f"_l{layer}")
            }
            h, _ = torch.func.functional_call(single, weights, (h,))
            outputs.append(h)
        return outputs

    def representations(self, idx: Tensor, all_layers: bool = False) -> Tensor | list[Tensor]:
        """Contextual vectors of a bidirectional model for each position of ``idx`` ``[B, T]``.

        Position t gets the forward state after reading tokens <= t concatenated with the backward state after
        reading tokens >= t (right to left): ``[B, T, 2H]`` for the top layer, or one such tensor per layer.
        """
        if not self.bidirectional:
            raise ValueError("representations() needs a bidirectional model (bidirectional=True).")
        fwd = self.layer_outputs(self.embed(idx, "forward"), "forward")
        bwd = self.layer_outputs(self.embed(idx.flip(1), "backward"), "backward")
        both = [torch.cat([f, b.flip(1)], dim=-1) for f, b in zip(fwd, bwd)]
        return both if all_layers else both[-1]

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


def _no_autocast(x: Tensor) -> torch.autocast:
    # The adaptive softmax writes its per-cluster results into one float32 tensor, which mixed-precision
    # autocast breaks (bf16 into float32); it runs in float32, and is cheap by design.
    return torch.autocast(device_type=x.device.type, enabled=False)


def _adaptive_cutoffs(
    vocab_size: int, cutoffs: list[int] | None, div_value: float, tie_weights: bool
) -> list[int]:
    """Checked cluster boundaries of the adaptive softmax (the defaults when none are given)."""
    if tie_weights:
        raise ValueError(
            "tie_weights is not supported with output='adaptive' (the adaptive softmax has its own head and cluster "
            "projections, which do not share the embedding table); use tie_weights=false or output='softmax'."
        )
    if div_value <= 0:
        raise ValueError(f"adaptive_div_value must be positive, got {div_value!r}.")
    if cutoffs is None:
        cutoffs = [c for c in DEFAULT_CUTOFFS if c < vocab_size - 1]
        if not cutoffs:
            raise ValueError(
                f"The vocabulary has only {vocab_size} ids, below the smallest default cutoff of the adaptive softmax "
                f"({DEFAULT_CUTOFFS[0]}): a full softmax is cheap here (output='softmax'), or set adaptive_cutoffs."
            )
        return cutoffs
    cutoffs = list(cutoffs)
    if (
        not cutoffs
        or any(not isinstance(c, int) or isinstance(c, bool) for c in cutoffs)
        or cutoffs != sorted(set(cutoffs))
        or cutoffs[0] <= 0
        or cutoffs[-1] >= vocab_size - 1
    ):
        raise ValueError(
            f"adaptive_cutoffs must be increasing, distinct ids between 1 and vocab_size - 2 = {vocab_size - 2}, "
            f"got {cutoffs!r}. Ids below the first cutoff go to the head (give the frequent ones), each later range "
            "to one cluster, e.g. [2000, 10000] for a 33k-word vocabulary."
        )
    return cutoffs


def _rnn_kwargs(rnn: nn.RNNBase) -> dict:
    kwargs = dict(input_size=rnn.input_size, hidden_size=rnn.hidden_size, batch_first=rnn.batch_first, bias=rnn.bias)
    if isinstance(rnn, nn.RNN):
        kwargs["nonlinearity"] = rnn.nonlinearity
    return kwargs
