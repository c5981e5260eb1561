"""An rnnlm model for Hugging Face transformers, with no rnnlm installed (torch and transformers only).

rnnlm's export copies this file into the model folder and names its classes in config.json's ``auto_map``, so:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = tok("The", return_tensors="pt")          # the separator <eos> first: a document starts after it
    print(tok.decode(lm.generate(**ids, max_new_tokens=40)[0], skip_special_tokens=True))

and a text classifier's folder loads with ``AutoModelForSequenceClassification`` or
``pipeline("text-classification", model=folder, trust_remote_code=True)``.

The modules and their names are those of rnnlm's own network, so the folder's model.safetensors loads as it is and
gives the same logits. This code is for inference: it applies none of the dropouts a model was trained with.

- ``generate`` carries the recurrent state from step to step in an :class:`RecurrentCache` (the prefix is read
  once), as transformers' own recurrent models do. A batch of prompts of different lengths may be padded on either
  side: the attention mask says which tokens are text, and each prompt is read from the zero state on its own.
- A bidirectional language model loads as its forward model: transformers' causal LM reads left to right, and
  the backward direction's weights are left unused. A bidirectional classifier uses both directions, as in rnnlm.
- The adaptive softmax gives exact log-probabilities in place of logits (softmax of them is the model's
  distribution); one-hot input and every cell (LSTM, GRU, Elman tanh and ReLU) work as in rnnlm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput

# rnnlm's default cluster boundaries of the adaptive softmax: those below the vocabulary size minus one are used.
DEFAULT_CUTOFFS = (2000, 10000, 50000, 200000)
CLASSIFICATION = "classification"


class RnnlmConfig(PreTrainedConfig):
    """The settings of config.json that the network needs; rnnlm's other settings are kept as they are."""

    model_type = "rnnlm"

    vocab_size: int = 2
    cell: str = "lstm"
    num_layers: int = 2
    embedding_dim: int = 200
    hidden_size: int = 200
    hidden_sizes: list[int] | None = None
    input_mode: str = "embedding"
    tie_weights: bool = False
    bidirectional: bool = False
    share_directions: bool = True
    output: str = "softmax"
    adaptive_cutoffs: list[int] | None = None
    adaptive_div_value: float = 4.0
    dropout_between: float = 0.0
    weight_drop: float = 0.0
    locked_dropout: bool = False
    task: str = "language-model"
    classifier: dict | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        # transformers ties what _tied_weights_keys names only when this is set: the decoder to the embedding for a
        # tied LM, a classifier's backward embedding to its forward one when the directions share it.
        if self.task == CLASSIFICATION:
            kwargs["tie_word_embeddings"] = bool(self.bidirectional and self.share_directions
                                                 and self.input_mode == "embedding")
        else:
            kwargs["tie_word_embeddings"] = bool(self.tie_weights)
        super().__post_init__(**kwargs)

    @property
    def layer_sizes(self) -> list[int]:
        return list(self.hidden_sizes) if self.hidden_sizes else [self.hidden_size] * self.num_layers

    @property
    def per_layer(self) -> bool:
        """rnnlm's rule for running the layers one by one (their weights are then named ``rnn.layers.<i>.*``)."""
        locked_between = self.locked_dropout and self.dropout_between > 0 and self.num_layers > 1
        return len(set(self.layer_sizes)) > 1 or self.weight_drop > 0 or locked_between

    @property
    def cutoffs(self) -> list[int]:
        if self.adaptive_cutoffs is not None:
            return list(self.adaptive_cutoffs)
        return [c for c in DEFAULT_CUTOFFS if c < self.vocab_size - 1]


# ------------------------------------------------------------------------------------------------ the state
def _map_state(fn, state):
    """``fn`` applied to every tensor of a recurrent state: a tensor ``[L, B, H]``, an LSTM's ``(h, c)``, or a
    list with one of those per layer."""
    if state is None:
        return None
    if isinstance(state, (list, tuple)):
        return type(state)(_map_state(fn, s) for s in state)
    return fn(state)


class RecurrentCache:
    """The recurrent state after the tokens read so far: what ``generate`` hands from one step to the next, so that
    each step reads only the new token. Its size does not grow with the text."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state, seen: int) -> None:
        self.state = state
        self.seen = seen

    @property
    def is_linear(self) -> list[bool]:
        return [True]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows ``beam_idx`` (beam search)."""
        self.state = _map_state(lambda t: t.index_select(1, beam_idx.to(t.device)), self.state)


@dataclass
class RnnlmCausalLMOutput(ModelOutput):
    """``logits`` ``[B, T, V]`` (log-probabilities for the adaptive softmax), ``loss`` with labels, ``cache`` the
    state after the last token, ``hidden_states`` the top layer's outputs ``[B, T, H]`` when asked for."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: RecurrentCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ------------------------------------------------------------------------------------------------ the layers
def _rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1) -> nn.RNNBase:
    if cell == "lstm":
        return nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
    if cell == "gru":
        return nn.GRU(input_size, hidden_size, num_layers, batch_first=True)
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(input_size, hidden_size, num_layers, nonlinearity=cell[4:], batch_first=True)
    raise ValueError(f"Unknown cell {cell!r}: this code knows lstm, gru, rnn_tanh and rnn_relu.")


class LayerStack(nn.Module):
    """Recurrent layers of their own sizes run one after the other (rnnlm's per-layer stack, without its
    dropouts). The state is a list with one state per layer."""

    def __init__(self, cell: str, input_size: int, sizes: list[int]) -> None:
        super().__init__()
        inputs = [input_size, *sizes[:-1]]
        self.layers = nn.ModuleList(_rnn(cell, i, h) for i, h in zip(inputs, sizes, strict=True))

    def forward(self, x, state=None):
        states = []
        for i, layer in enumerate(self.layers):
            x, layer_state = layer(x, None if state is None else state[i])
            states.append(layer_state)
        return x, states


def _stack(config: RnnlmConfig) -> nn.Module:
    input_size = config.embedding_dim if config.input_mode == "embedding" else config.vocab_size
    if config.per_layer:
        return LayerStack(config.cell, input_size, config.layer_sizes)
    return _rnn(config.cell, input_size, config.layer_sizes[-1], config.num_layers)


def _check(config: RnnlmConfig) -> None:
    if config.input_mode not in ("embedding", "one_hot"):
        raise ValueError(f"Unknown input_mode {config.input_mode!r}: this code knows embedding and one_hot.")
    if config.output not in ("softmax", "adaptive"):
        raise ValueError(f"Unknown output {config.output!r}: this code knows softmax and adaptive.")


class RnnlmPreTrainedModel(PreTrainedModel):
    config_class = RnnlmConfig
    config: RnnlmConfig
    base_model_prefix = "rnnlm"
    # A recurrent state cannot be rolled back to an earlier token: no assisted generation.
    _is_stateful = True
    main_input_name = "input_ids"

    def _init_weights(self, module: nn.Module) -> None:
        # torch's own initialisation for anything the checkpoint does not fill (transformers warns which).
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def _embed(self, embedding: nn.Embedding | None, ids: torch.Tensor, stack: nn.Module) -> torch.Tensor:
        if embedding is None:  # one-hot input: the recurrent layer's input weight is the textbook W_xh
            return F.one_hot(ids, self.config.vocab_size).to(next(stack.parameters()).dtype)
        return embedding(ids)


# ------------------------------------------------------------------------------------------------ the LM
class RnnlmForCausalLM(RnnlmPreTrainedModel, GenerationMixin):
    """rnnlm's language model (the forward direction of a bidirectional one): next-token logits at every position."""

    _tied_weights_keys = {"decoder.weight": "embedding.weight"}
    # A bidirectional model's backward stack is not used here.
    _keys_to_ignore_on_load_unexpected = [r"_backward\."]

    def __init__(self, config: RnnlmConfig) -> None:
        super().__init__(config)
        _check(config)
        top = config.layer_sizes[-1]
        self.embedding = (nn.Embedding(config.vocab_size, config.embedding_dim)
                          if config.input_mode == "embedding" else None)
        self.rnn = _stack(config)
        self.projection = (nn.Linear(top, config.embedding_dim, bias=False)
                           if config.tie_weights and top != config.embedding_dim else None)
        width = config.embedding_dim if self.projection is not None else top
        if config.output == "adaptive":
            self.decoder = nn.AdaptiveLogSoftmaxWithLoss(width, config.vocab_size, config.cutoffs,
                                                         div_value=config.adaptive_div_value, head_bias=True)
        else:
            self.decoder = nn.Linear(width, config.vocab_size)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The state is not keys and values: forward makes its own RecurrentCache.
        return False

    def get_input_embeddings(self):
        return self.embedding

    def get_output_embeddings(self):
        return None if self.config.output == "adaptive" else self.decoder

    def _decode(self, features: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            features = self.projection(features)
        if self.config.output == "adaptive":
            flat = features.reshape(-1, features.size(-1)).float()
            return self.decoder.log_prob(flat).view(*features.shape[:-1], -1)
        return self.decoder(features)

    def _read_padded(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """Each row's text tokens (wherever the padding is) read from the zero state on their own: the outputs at
        the text's positions, zeros elsewhere, and each row's state after its last text token."""
        order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # text tokens first, in order
        lengths = mask.sum(dim=1).clamp(min=1)
        ids = input_ids.gather(1, order)
        x = self._embed(self.embedding, ids, self.rnn)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        out = pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))[0]
        back = torch.zeros_like(out).scatter_(1, order[..., None].expand_as(out), out)
        return back, state

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: RecurrentCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """Logits of the next token after each position of ``input_ids`` ``[B, T]``, read from ``cache``'s state
        (the zero state without one). ``labels`` (``[B, T]``, -100 ignored) give the mean cross-entropy of each
        token after its predecessors, as transformers' causal LMs compute it."""
        if input_ids is None:
            raise ValueError("rnnlm's model reads token ids: give input_ids (inputs_embeds is not supported).")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("rnnlm's model reads token ids, not inputs_embeds.")
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        state = cache.state if cache is not None else None
        seen = cache.seen if cache is not None else 0
        padded = (attention_mask is not None and cache is None and attention_mask.shape == input_ids.shape
                  and bool((attention_mask == 0).any()))
        if padded:
            outputs, state = self._read_padded(input_ids, attention_mask)
        else:
            outputs, state = self.rnn(self._embed(self.embedding, input_ids, self.rnn), state)
        kept = outputs
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            kept = outputs[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            kept = outputs[:, logits_to_keep]
        logits = self._decode(kept)
        loss = None
        if labels is not None:
            scores = logits[:, :-1].reshape(-1, logits.size(-1)).float()
            targets = labels[:, 1:].reshape(-1).to(logits.device)
            if self.config.output == "adaptive":
                loss = F.nll_loss(scores, targets, ignore_index=-100)
            else:
                loss = F.cross_entropy(scores, targets, ignore_index=-100)
        new_cache = RecurrentCache(state, seen + input_ids.size(1)) if use_cache else None
        hidden = (outputs,) if output_hidden_states else None
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return tuple(v for v in (loss, logits, new_cache, hidden) if v is not None)
        return RnnlmCausalLMOutput(loss=loss, logits=logits, cache=new_cache, hidden_states=hidden)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, attention_mask=attention_mask,
                                                       **kwargs)
        if cache is not None:
            # After the prompt only the new token is read, from the state: the mask has nothing left to say.
            inputs.pop("attention_mask", None)
        return inputs


# ------------------------------------------------------------------------------------------------ the classifier
def _reverse_texts(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's text (positions 1 .. length-1) reversed in place; the separator at 0 and the padding stay."""
    positions = torch.arange(ids.size(1), device=ids.device)
    last = lengths[:, None]
    index = torch.where((positions >= 1) & (positions < last), last - positions, positions)
    return ids.gather(1, index)


def _concat_pool(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The state at the last text token, the maximum and the mean over the text's tokens: ``[B, 3H]``."""
    rows = torch.arange(states.size(0), device=states.device)
    positions = torch.arange(states.size(1), device=states.device)
    mask = ((positions >= 1) & (positions < lengths[:, None])).unsqueeze(-1)
    last = states[rows, lengths - 1]
    biggest = states.masked_fill(~mask, float("-inf")).amax(dim=1)
    mean = (states * mask).sum(dim=1) / (lengths - 1).unsqueeze(-1).to(states.dtype)
    return torch.cat([last, biggest, mean], dim=-1)


class RnnlmEncoder(nn.Module):
    """The LM's embedding and recurrent stacks that a classifier reads (its decoder is not part of it)."""

    def __init__(self, config: RnnlmConfig) -> None:
        super().__init__()
        self.embedding = (nn.Embedding(config.vocab_size, config.embedding_dim)
                          if config.input_mode == "embedding" else None)
        self.rnn = _stack(config)
        if config.bidirectional:
            # Shared with the forward direction or not, it has its own name (transformers ties the shared one).
            self.embedding_backward = (nn.Embedding(config.vocab_size, config.embedding_dim)
                                       if config.input_mode == "embedding" else None)
            self.rnn_backward = _stack(config)


class RnnlmForSequenceClassification(RnnlmPreTrainedModel):
    """ULMFiT's classifier as rnnlm trains it: each text read after the separator, concat pooling of the top layer
    (both directions for a bidirectional encoder), then the head. Inputs are the tokenizer's: the separator first
    (its post-processor adds it), padding anywhere the attention mask says; at most ``classifier.max_length``
    tokens of a text are read, as in rnnlm."""

    def __init__(self, config: RnnlmConfig) -> None:
        super().__init__(config)
        _check(config)
        head = config.classifier or {}
        if "labels" not in head:
            raise ValueError("This folder holds no classifier ('classifier' in config.json has no labels): load it "
                             "with AutoModelForCausalLM.")
        self._tied_weights_keys = {"encoder.embedding_backward.weight": "encoder.embedding.weight"}
        self.num_labels = len(head["labels"])
        self.encoder = RnnlmEncoder(config)
        width = 3 * config.layer_sizes[-1] * (2 if config.bidirectional else 1)
        hidden = head.get("head_hidden", 50)
        layers: list[nn.Module] = [nn.BatchNorm1d(width), nn.Dropout(head.get("pool_dropout", 0.4))]
        if hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.BatchNorm1d(hidden),
                       nn.Dropout(head.get("head_dropout", 0.1)), nn.Linear(hidden, self.num_labels)]
        else:
            layers.append(nn.Linear(width, self.num_labels))
        self.head = nn.Sequential(*layers)
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder.embedding

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """Logits ``[B, C]`` of each row of ``input_ids`` ``[B, T]`` (the separator, then the text's tokens)."""
        if input_ids is None:
            raise ValueError("rnnlm's classifier reads token ids: give input_ids.")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # text first, padding after it
        lengths = mask.sum(dim=1)
        limit = (self.config.classifier or {}).get("max_length")
        if limit is not None:
            lengths = lengths.clamp(max=int(limit) + 1)
        if bool((lengths < 2).any()):
            raise ValueError("Each text needs at least one token after the separator (an empty text has no class).")
        steps = int(lengths.max())
        ids = input_ids.gather(1, order)[:, :steps]
        positions = torch.arange(steps, device=ids.device)
        ids = ids.masked_fill(positions >= lengths[:, None], int(self.config.pad_token_id or 0))
        enc = self.encoder
        pooled = []
        for embedding, rnn, reverse in ((enc.embedding, enc.rnn, False),
                                        (getattr(enc, "embedding_backward", None), getattr(enc, "rnn_backward", None),
                                         True))[: 2 if self.config.bidirectional else 1]:
            x = _reverse_texts(ids, lengths) if reverse else ids
            states, _ = rnn(self._embed(embedding, x, rnn))
            pooled.append(_concat_pool(states, lengths))
        logits = self.head(torch.cat(pooled, dim=-1).float())
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device))
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (loss, logits) if loss is not None else (logits,)
        return SequenceClassifierOutput(loss=loss, logits=logits)
