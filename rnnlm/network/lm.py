"""The recurrent language model: a plain ``nn.Module``, readable top to bottom, usable without Lightning.

    idx [B, T] -> input vectors x_t -> fused RNN stack -> h_t -> (projection) -> logits y_t [B, T, V]

With ``cell="rnn_tanh"`` and ``input_mode="one_hot"`` this is exactly the textbook Elman network

    h_t = tanh(W_hh h_{t-1} + W_xh x_t + b),    y_t = W_hy h_t + c,    p(w_{t+1}) = softmax(y_t)

where x_t is a fixed one-hot vector and W_xh is the RNN's own input weight. With ``input_mode="embedding"``
(the default) W_xh is factored through a learned embedding table: a learned matrix applied to a one-hot vector
*is* a table lookup, so the two are the same family of models and the embedding is just cheaper.

The hidden state is an explicit input and output of ``forward`` so that any caller can carry it across chunks
(truncated BPTT); ``h_0`` is zeros when no state is given. ``forward(idx, targets)`` returns the loss, as in
nanoGPT; without targets it returns the logits.

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

from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.cpu import rnn_kernels_for_autocast
from rnnlm.errors import ConfigError
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.head import auto_block_rows, linear_cross_entropy
from rnnlm.network.pretrained import LANGUAGE_MODEL, Pretrained, config_from_values

State = Union[Tensor, tuple[Tensor, Tensor], list]  # noqa: UP007 - a runtime alias, Python 3.10 compatible
DIRECTIONS = ("forward", "backward")


def map_state(fn, state: State | None) -> State | None:
    """Apply ``fn`` to every tensor of a carried state, keeping its nesting.

    A state is a tensor ``[L, B, H]``, an LSTM's ``(h, c)`` pair, or (for a :class:`LayerStack`) a list with one
    such state per layer.
    """
    if state is None:
        return None
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(fn, s) for s in state)
    return fn(state)


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried state, so backpropagation stops at the chunk boundary."""
    return map_state(Tensor.detach, state)


def state_batch_size(state: State) -> int:
    """Number of streams a carried state is for (its dimension 1, whatever its nesting)."""
    while not isinstance(state, Tensor):
        state = state[0]  # type: ignore[index]
    return state.size(1)


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
        self.layers = nn.ModuleList(make_rnn(cell, i, h) for i, h in zip(inputs, hidden_sizes, strict=True))
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
        weights = [flat.view(t.shape) for flat, t in zip(packed.split([t.numel() for t in parts]), parts, strict=True)]
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


class Output(NamedTuple):
    """What one call of :class:`RNNLM` returns.

    ``loss`` (mean cross-entropy in nats/token) when targets were given, else ``logits`` ``[B, T, V]``;
    ``state`` is the state after the last step. ``outputs`` is the top recurrent layer's output ``[B, T, H]`` and
    ``features`` the decoder's input ``[B, T, D]`` (after output dropout and the tying projection): what the
    activation penalties of AWD-LSTM and the continuous pointer read.
    """

    loss: Tensor | None
    logits: Tensor | None
    state: State
    outputs: Tensor
    features: Tensor


class RNNLM(nn.Module, Pretrained):
    """A multi-layer recurrent language model on torch's fused RNN kernels (cuDNN on GPU), built from a
    :class:`~rnnlm.network.config.RNNLMConfig` (which documents every setting).

    ``RNNLM.from_pretrained(folder or OWNER/NAME)``, ``save_pretrained(folder)`` and ``push_to_hub(repo)`` read
    and write the weights and settings of an exported folder (:mod:`rnnlm.network.pretrained`).
    """

    task = LANGUAGE_MODEL

    def _folder_values(self) -> dict:
        return self._base_values()

    @classmethod
    def _from_values(cls, values: dict, where: str) -> RNNLM:
        return cls(config_from_values(values, where))

    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        self.config = config
        drop = LockedDropout if config.locked_dropout else nn.Dropout
        self.drop_in = drop(config.dropout_embedding)
        self.drop_out = drop(config.dropout_output)
        self.embedding, self.rnn, self.projection, self.decoder = self._direction_modules(share=None)
        if config.bidirectional:
            shared = (self.embedding, self.projection, self.decoder) if config.share_directions else None
            parts = self._direction_modules(share=shared)
            self.embedding_backward, self.rnn_backward, self.projection_backward, self.decoder_backward = parts

    def _direction_modules(self, share: tuple | None) -> tuple:
        """Embedding, recurrent stack, projection and decoder of one direction (input/output layers shared or new)."""
        c = self.config
        input_size = c.embedding_dim if c.input_mode == "embedding" else c.vocab_size
        top = c.layer_sizes[-1]
        if c.per_layer:
            rnn: nn.Module = LayerStack(
                c.cell, input_size, list(c.layer_sizes), c.dropout_between, c.locked_dropout, c.weight_drop
            )
        else:
            # One fused call for the whole stack: the fastest path, and the plain model's state-dict names.
            rnn = make_rnn(c.cell, input_size, top, c.num_layers, c.dropout_between if c.num_layers > 1 else 0.0)
        if share is not None:
            embedding, projection, decoder = share
            return embedding, rnn, projection, decoder

        embedding = nn.Embedding(c.vocab_size, c.embedding_dim) if c.input_mode == "embedding" else None
        # Tying needs the decoder input to have the embedding's size.
        projection = nn.Linear(top, c.embedding_dim, bias=False) if c.tie_weights and top != c.embedding_dim else None
        head_size = c.embedding_dim if projection is not None else top
        if c.output == "adaptive":
            decoder: nn.Module = nn.AdaptiveLogSoftmaxWithLoss(
                head_size, c.vocab_size, list(c.cutoffs), div_value=c.adaptive_div_value, head_bias=True
            )
        else:
            decoder = nn.Linear(head_size, c.vocab_size)
        # The small uniform init of Zaremba et al. / pytorch's word_language_model; the recurrent weights keep
        # torch's default U(-1/sqrt(H), 1/sqrt(H)). (Modules first, then init: a seed gives the same weights as
        # before the adaptive softmax existed.)
        if embedding is not None:
            nn.init.uniform_(embedding.weight, -0.1, 0.1)
        if isinstance(decoder, nn.Linear):
            nn.init.uniform_(decoder.weight, -0.1, 0.1)
            nn.init.zeros_(decoder.bias)
        if c.tie_weights:
            decoder.weight = embedding.weight  # type: ignore[union-attr]
        return embedding, rnn, projection, decoder

    def _parts(self, direction: str) -> tuple:
        if direction == "forward":
            return self.embedding, self.rnn, self.projection, self.decoder
        if direction == "backward" and self.config.bidirectional:
            return self.embedding_backward, self.rnn_backward, self.projection_backward, self.decoder_backward
        raise ValueError(
            f"direction must be one of {DIRECTIONS} (backward needs bidirectional=True), got {direction!r}"
        )

    # ------------------------------------------------------------------------------------------- the pass
    def forward(
        self, idx: Tensor, targets: Tensor | None = None, state: State | None = None, direction: str = "forward"
    ) -> Output:
        """Read ids ``[B, T]`` from ``state`` (zeros when None) and predict the next token at every position.

        With ``targets`` ``[B, T]`` the output holds the mean cross-entropy of the targets (the adaptive softmax
        then computes only the clusters the targets fall in, never the full distribution); without, the logits
        (with ``output="adaptive"`` the exact log-probabilities, which sampling and cross-entropy treat like
        logits). ``direction="backward"`` runs the backward stack: give it the ids in reversed order, and its
        "next" token is then the previous one of the original order.
        """
        outputs, state, features = self._read(idx, state, direction)
        decoder = self._parts(direction)[3]
        if targets is None:
            return Output(None, self._logits(decoder, features), state, outputs, features)
        return Output(self._loss(decoder, features, targets), None, state, outputs, features)

    def _read(self, idx: Tensor, state: State | None, direction: str) -> tuple[Tensor, State, Tensor]:
        """The recurrent stack's outputs, its state after the last step, and the decoder's input features."""
        projection = self._parts(direction)[2]
        outputs, state = self.encode(idx, state, direction)
        features = self.drop_out(outputs)
        if projection is not None:
            features = projection(features)
        return outputs, state, features

    def encode(
        self, idx: Tensor, state: State | None = None, direction: str = "forward"
    ) -> tuple[Tensor, State]:
        """The top recurrent layer's output ``[B, T, H]`` and the state after the last step, without the decoder:
        what a classifier or a feature extractor reads. The input dropouts apply as in :meth:`forward`; the
        output dropout does not (it belongs to the decoder's input)."""
        rnn = self._parts(direction)[1]
        x = self.drop_in(self._drop_words(self._embed(idx, direction), idx))
        with rnn_kernels_for_autocast():
            return rnn(x, state)

    def layer_states(self, idx: Tensor, direction: str = "forward") -> list[Tensor]:
        """Every recurrent layer's output ``[B, T, H_l]``, bottom to top, for ids read in the order given (for the
        backward direction, give them reversed). No dropout: for features, as :meth:`representations` uses."""
        return self.read_layers(idx, None, direction)[0]

    def read_layers(
        self, idx: Tensor, state: State | None = None, direction: str = "forward"
    ) -> tuple[list[Tensor], State]:
        """:meth:`layer_states` read from ``state``, and the state after the last step: the states of :meth:`encode`,
        so a long text can be read in pieces, each one's state carried into the next."""
        return self._layer_outputs(self._embed(idx, direction), direction, state)

    def _embed(self, idx: Tensor, direction: str) -> Tensor:
        """Input vectors x_t of the ids: an embedding row, or the fixed one-hot vector."""
        embedding, rnn = self._parts(direction)[:2]
        if embedding is None:
            return F.one_hot(idx, self.config.vocab_size).to(next(rnn.parameters()).dtype)
        return embedding(idx)

    def _drop_words(self, x: Tensor, idx: Tensor) -> Tensor:
        # One keep/drop draw per vocabulary entry, looked up per position: the same as masking the embedding table's
        # rows (Gal & Ghahramani 2016) without touching the whole table.
        p = self.config.dropout_words
        if not self.training or p == 0:
            return x
        keep = x.new_empty(self.config.vocab_size).bernoulli_(1 - p).div_(1 - p)
        return x * keep[idx].unsqueeze(-1)

    def _logits(self, decoder: nn.Module, features: Tensor) -> Tensor:
        if self.config.output == "adaptive":
            with _no_autocast(features):
                flat = features.reshape(-1, features.size(-1)).float()
                return decoder.log_prob(flat).view(*features.shape[:-1], -1)
        return decoder(features)

    def log_probs(
        self, idx: Tensor, targets: Tensor, state: State | None = None, direction: str = "forward"
    ) -> tuple[Tensor, State]:
        """Log-probability in nats of each target ``[B, T]`` after reading ``idx`` ``[B, T]`` from ``state``, and
        the state after the last step: what scoring text needs.

        Read like :meth:`forward` with targets, but per token instead of the mean; the adaptive softmax computes
        only the clusters the targets fall in.
        """
        _, state, features = self._read(idx, state, direction)
        decoder = self._parts(direction)[3]
        if self.config.output == "adaptive":
            with _no_autocast(features):
                flat = features.reshape(-1, features.size(-1)).float()
                return decoder(flat, targets.reshape(-1)).output.view_as(targets), state
        logits = decoder(features)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none")
        return -nll.view_as(targets), state

    def _loss(self, decoder: nn.Module, features: Tensor, targets: Tensor) -> Tensor:
        if self.config.output == "adaptive":
            with _no_autocast(features):
                return decoder(features.reshape(-1, features.size(-1)).float(), targets.reshape(-1)).loss
        rows = self.loss_block_rows(features)
        if rows:
            return linear_cross_entropy(features, decoder.weight, decoder.bias, targets, rows)
        logits = decoder(features)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def loss_block_rows(self, features: Tensor) -> int:
        """Rows per block of the fused softmax head for these decoder inputs (0: the plain head, which forms the full
        logits): the config's ``loss_block_rows``, or when it is None the rule of
        :func:`~rnnlm.network.head.auto_block_rows`
        for this vocabulary, number of positions and device."""
        rows = self.config.loss_block_rows
        if rows is None:
            return auto_block_rows(self.config.vocab_size, features.numel() // features.size(-1), features.device)
        return rows

    # ------------------------------------------------------------------------------------------- uses
    def representations(self, idx: Tensor, all_layers: bool = False) -> Tensor | list[Tensor]:
        """Contextual vectors of a bidirectional model for each position of ``idx`` ``[B, T]`` (ELMo's use).

        Position t gets the forward state after reading tokens <= t concatenated with the backward state after
        reading tokens >= t (right to left): ``[B, T, 2H]`` for the top layer, or one such tensor per layer.
        """
        if not self.config.bidirectional:
            raise ValueError("representations() needs a bidirectional model (bidirectional=True).")
        fwd = self.layer_states(idx, "forward")
        bwd = self.layer_states(idx.flip(1), "backward")
        both = [torch.cat([f, b.flip(1)], dim=-1) for f, b in zip(fwd, bwd, strict=True)]
        return both if all_layers else both[-1]

    def _layer_outputs(
        self, x: Tensor, direction: str, state: State | None = None
    ) -> tuple[list[Tensor], State]:
        """Every layer's output sequence ``[B, T, H]`` for input vectors ``x`` read in the order given from
        ``state``, and the state after the last step, in the recurrent module's own format.

        The fused module only returns its top layer, so each layer is run on its own with that layer's weights.
        """
        rnn = self._parts(direction)[1]
        outputs, states, h = [], [], x
        if isinstance(rnn, LayerStack):
            for i, layer in enumerate(rnn.layers):
                h, layer_state = layer(h, None if state is None else state[i])
                outputs.append(h)
                states.append(layer_state)
            return outputs, states
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
            given = map_state(lambda s, i=layer: s[i : i + 1], state)
            h, layer_state = torch.func.functional_call(single, weights, (h, given))
            outputs.append(h)
            states.append(layer_state)
        # The fused module's state stacks its layers on dimension 0 (an LSTM's h and c each).
        if isinstance(states[0], tuple):
            return outputs, tuple(torch.cat(parts) for parts in zip(*states, strict=True))
        return outputs, torch.cat(states)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        num_samples: int = 1,
        stop_token: int | None = None,
    ) -> Tensor:
        """Sample up to ``max_new_tokens`` ids after ``prompt`` (``[T]`` or ``[B, T]``, T >= 1); return the new ids.

        The whole prompt primes the hidden state in one fused pass; each prompt row then starts ``num_samples``
        streams (next to each other in the batch), sampled together, each sampled token fed back. A ``[T]``
        prompt gives ``[N]`` new ids (``[num_samples, N]`` when ``num_samples > 1``), a ``[B, T]`` prompt
        ``[B * num_samples, N]``.

        Each step samples from the last logits shaped by :func:`filter_logits`: ``temperature`` (0 picks the most
        likely token: greedy), then ``top_k``, then ``top_p`` (nucleus sampling). With ``stop_token``, a stream
        that samples it stops there: the token is kept and the stream's later positions repeat it, and sampling
        ends as soon as every stream has stopped, so N <= ``max_new_tokens``.
        """
        if prompt.dim() == 1:
            new = self.generate(prompt[None], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, generator=generator, num_samples=num_samples, stop_token=stop_token)
            return new[0] if num_samples == 1 else new
        if prompt.size(1) == 0:
            raise ValueError("generate needs at least one prompt token to condition on.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        _check_sampling(temperature, top_k, top_p)
        out = self(prompt)
        logits, state = out.logits[:, -1], out.state
        if not bool(torch.isfinite(logits).all()):  # once per call: damaged weights, not one bad step
            raise ConfigError("The model's outputs are not finite (NaN or inf): its weights are damaged or the run "
                              "that wrote them diverged. Sample from another checkpoint.")
        if num_samples > 1:
            logits = logits.repeat_interleave(num_samples, dim=0)
            state = map_state(lambda t: t.repeat_interleave(num_samples, dim=1), state)
        stopped = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
        new = []
        for step in range(max_new_tokens):
            if step > 0:
                out = self(new[-1], state=state)
                logits, state = out.logits[:, -1], out.state
            nxt = _choose(logits.float(), temperature, top_k, top_p, generator)
            if stop_token is not None:
                nxt = nxt.masked_fill(stopped[:, None], stop_token)
                stopped |= nxt[:, 0] == stop_token
            new.append(nxt)
            if stop_token is not None and bool(stopped.all()):
                break
        if not new:
            return prompt.new_empty(logits.size(0), 0)
        return torch.cat(new, dim=1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings outside their range (ValueError)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The logits ``[..., V]`` to sample the next token from: divided by ``temperature`` (> 0), then, with
    ``top_k``, every token less likely than the k-th most likely one set to -inf (ties with it are kept), then,
    with ``top_p``, only the nucleus kept (Holtzman et al. 2020): the smallest set of most likely tokens whose
    probability under the distribution left by the previous steps reaches ``top_p``.

    This is the order of Hugging Face transformers' sampling (temperature, top-k, top-p), so the same settings
    mean the same there.
    """
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True)
        # A token stays when the more likely tokens before it have not reached top_p yet: the most likely token
        # always stays, and the kept tokens are the shortest prefix whose probability reaches top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _choose(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """The next token ``[B, 1]`` of each row of ``logits`` ``[B, V]``."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _no_autocast(x: Tensor) -> torch.autocast:
    # The adaptive softmax writes its per-cluster results into one float32 tensor, which mixed-precision
    # autocast breaks (bf16 into float32); it runs in float32, and is cheap by design.
    return torch.autocast(device_type=x.device.type, enabled=False)


def _rnn_kwargs(rnn: nn.RNNBase) -> dict:
    kwargs = dict(input_size=rnn.input_size, hidden_size=rnn.hidden_size, batch_first=rnn.batch_first, bias=rnn.bias)
    if isinstance(rnn, nn.RNN):
        kwargs["nonlinearity"] = rnn.nonlinearity
    return kwargs
