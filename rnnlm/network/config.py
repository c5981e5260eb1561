"""Every setting of the model in one frozen dataclass, checked when it is made.

:class:`RNNLMConfig` is what :class:`~rnnlm.network.lm.RNNLM` is built from, what the LightningModule takes (as
``--model.config.*`` on the command line, or ``model: config:`` in a YAML file), what a resumed run is compared
against, and what is written as JSON beside exported weights (with ``format_version``, so that a future reader
knows what it reads).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from rnnlm.errors import ConfigError, check_positive_int, check_probability

# The recurrent cells, with what a model card calls them.
CELL_NAMES = {"rnn_tanh": "Elman RNN (tanh)", "rnn_relu": "ReLU RNN", "lstm": "LSTM", "gru": "GRU"}
CELLS = tuple(CELL_NAMES)
INPUT_MODES = ("embedding", "one_hot")
OUTPUTS = ("softmax", "adaptive")
# Default cluster boundaries of the adaptive softmax: those below the vocabulary size are used.
DEFAULT_CUTOFFS = (2000, 10000, 50000, 200000)
FORMAT_VERSION = 1
# config.json's "model_type": what says an exported folder is rnnlm's (transformers reads it too). Here, with the
# format version, because the network's save_pretrained writes it and the sharing layer's loaders check it.
MODEL_TYPE = "rnnlm"
# The dropout rates: they shape training, not the weights' shapes or meaning (a fine-tuned model may change them).
DROPOUTS = ("dropout_embedding", "dropout_between", "dropout_output", "dropout_words", "weight_drop")
# The settings that do not give the weights their shapes and meaning: the regularisers, how the loss is computed,
# and the format's version.
NEUTRAL = (*DROPOUTS, "locked_dropout", "loss_block_rows", "format_version")


@dataclass(frozen=True)
class RNNLMConfig:
    """The model's settings.

    Args:
        vocab_size: number of token ids (the CLI takes it from the data module's tokenizer).
        cell: ``rnn_tanh`` (Elman), ``rnn_relu``, ``lstm`` or ``gru``.
        num_layers: stacked recurrent layers.
        embedding_dim: size of the input embedding (unused with ``input_mode="one_hot"``).
        hidden_size: size of each recurrent layer's state.
        hidden_sizes: one size per layer (``num_layers`` entries), overriding ``hidden_size``; AWD-LSTM makes the
            last one ``embedding_dim`` so that tying needs no projection (e.g. ``[1150, 1150, 400]``).
        input_mode: ``embedding`` (a learned lookup table) or ``one_hot`` (fixed one-hot vectors fed straight into
            the RNN, whose input weight is then the textbook W_xh).
        tie_weights: share the embedding table with the decoder (Press & Wolf 2017; Inan et al. 2017); a linear
            projection maps the top layer to the embedding size when they differ.
        bidirectional: add an independent backward stack, a right-to-left language model (as in ELMo).
        share_directions: the backward direction shares the forward one's embedding and decoder.
        output: ``softmax`` (a linear decoder and a full softmax) or ``adaptive``, the adaptive softmax of Grave
            et al. (2017): exact, much cheaper for large vocabularies, and assumes ids sorted by frequency (the
            word tokenizer's are).
        adaptive_cutoffs: cluster boundaries of the adaptive softmax (increasing ids below ``vocab_size - 1``);
            default: those of 2000, 10000, 50000, 200000 below the vocabulary size.
        adaptive_div_value: each cluster's projection is this many times narrower than the previous one.
        dropout_embedding: dropout on the input vectors (AWD-LSTM's ``dropouti``).
        dropout_between: dropout between stacked recurrent layers (``dropouth``).
        dropout_output: dropout on the top layer's output, before the decoder (``dropout``).
        dropout_words: embedding dropout (``dropoute``): drop whole words, the same word everywhere in a chunk.
        weight_drop: DropConnect on the hidden-to-hidden weights (``wdrop``), one mask per chunk.
        locked_dropout: make the three dropouts above variational (one mask per sequence for the whole chunk).
        loss_block_rows: how the full softmax computes its loss: in blocks of this many positions, each block's
            logits turned into its loss and gradients at once and dropped (:mod:`rnnlm.network.head`; the same numbers,
            a
            fraction of the memory, faster on a CPU), or ``0`` for the plain ``F.linear`` + ``F.cross_entropy``
            over the full logits; ``None`` (default) chooses by vocabulary size and device
            (:func:`~rnnlm.network.head.auto_block_rows`). It changes no weight, so it is not part of the architecture.
    """

    vocab_size: int
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
    dropout_embedding: float = 0.0
    dropout_between: float = 0.0
    dropout_output: float = 0.0
    dropout_words: float = 0.0
    weight_drop: float = 0.0
    locked_dropout: bool = False
    loss_block_rows: int | None = None
    format_version: int = field(default=FORMAT_VERSION, repr=False)

    def __post_init__(self) -> None:
        # Lists arrive from YAML and JSON; tuples keep the frozen config hashable and comparable.
        for name in ("hidden_sizes", "adaptive_cutoffs"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"This model config has format version {self.format_version}, newer than this rnnlm reads "
                f"({FORMAT_VERSION}): upgrade rnnlm (pip install -U rnnlm) to load it."
            )
        _choice("cell", self.cell, CELLS)
        _choice("input_mode", self.input_mode, INPUT_MODES)
        _choice("output", self.output, OUTPUTS)
        for name in ("vocab_size", "num_layers", "embedding_dim", "hidden_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("dropout_embedding", "dropout_between", "dropout_output", "dropout_words", "weight_drop"):
            check_probability(name, getattr(self, name))
        if self.hidden_sizes is not None:
            if len(self.hidden_sizes) != self.num_layers:
                raise ConfigError(
                    f"hidden_sizes has {len(self.hidden_sizes)} entries but num_layers is {self.num_layers}: give one "
                    "size per layer (or set num_layers to match)."
                )
            for i, size in enumerate(self.hidden_sizes):
                check_positive_int(f"hidden_sizes[{i}]", size)
        if self.input_mode == "one_hot" and self.tie_weights:
            raise ConfigError(
                "tie_weights needs an embedding table to share, but input_mode='one_hot' has none; "
                "use input_mode='embedding' or tie_weights=false."
            )
        if self.loss_block_rows is not None:
            rows = self.loss_block_rows
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
                raise ConfigError(
                    f"loss_block_rows must be a whole number >= 0 (rows per block of the fused softmax head; 0 for "
                    f"the plain head) or null to choose automatically, got {rows!r}."
                )
            if rows > 0 and self.output != "softmax":
                raise ConfigError(
                    f"loss_block_rows={rows} sets the fused head of the full softmax, but output={self.output!r} "
                    "computes its loss its own way: remove loss_block_rows (or set output='softmax')."
                )
        if self.output == "adaptive":
            self._check_adaptive()

    def _check_adaptive(self) -> None:
        if self.tie_weights:
            raise ConfigError(
                "tie_weights is not supported with output='adaptive' (the adaptive softmax has its own head and "
                "cluster projections, which do not share the embedding table); use tie_weights=false or "
                "output='softmax'."
            )
        if isinstance(self.adaptive_div_value, bool) or not self.adaptive_div_value > 0:
            raise ConfigError(f"adaptive_div_value must be positive, got {self.adaptive_div_value!r}.")
        cutoffs = self.cutoffs
        if self.adaptive_cutoffs is None and not cutoffs:
            raise ConfigError(
                f"The vocabulary has only {self.vocab_size} ids, below the smallest default cutoff of the adaptive "
                f"softmax ({DEFAULT_CUTOFFS[0]}): a full softmax is cheap here (output='softmax'), or set "
                "adaptive_cutoffs."
            )
        if (
            not cutoffs
            or any(not isinstance(c, int) or isinstance(c, bool) for c in cutoffs)
            or list(cutoffs) != sorted(set(cutoffs))
            or cutoffs[0] <= 0
            or cutoffs[-1] >= self.vocab_size - 1
        ):
            raise ConfigError(
                f"adaptive_cutoffs must be increasing, distinct ids between 1 and vocab_size - 2 = "
                f"{self.vocab_size - 2}, got {list(cutoffs)!r}. Ids below the first cutoff go to the head (give the "
                "frequent ones), each later range to one cluster, e.g. [2000, 10000] for a 33k-word vocabulary."
            )
        for i in range(1, len(cutoffs) + 1):
            if self.layer_sizes[-1] // self.adaptive_div_value**i < 1:
                raise ConfigError(
                    f"adaptive_div_value={self.adaptive_div_value} leaves cluster {i} with no dimensions (top layer "
                    f"size {self.layer_sizes[-1]} // {self.adaptive_div_value}**{i} = 0): lower it or use fewer "
                    "cutoffs."
                )

    # ------------------------------------------------------------------------------------------- derived
    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """The state size of each recurrent layer, bottom to top."""
        return tuple(self.hidden_sizes) if self.hidden_sizes is not None else (self.hidden_size,) * self.num_layers

    @property
    def cutoffs(self) -> tuple[int, ...]:
        """The adaptive softmax's cluster boundaries in use."""
        if self.adaptive_cutoffs is not None:
            return tuple(self.adaptive_cutoffs)
        return tuple(c for c in DEFAULT_CUTOFFS if c < self.vocab_size - 1)

    @property
    def per_layer(self) -> bool:
        """Whether the stack runs layer by layer: per-layer sizes, weight drop or locked dropout between layers
        need it; otherwise one fused multi-layer kernel call runs the whole stack."""
        locked_between = self.locked_dropout and self.dropout_between > 0 and self.num_layers > 1
        return len(set(self.layer_sizes)) > 1 or self.weight_drop > 0 or locked_between

    def approximate_parameters(self) -> int:
        """An upper bound of the parameter count, from the settings alone: what building the model would
        allocate, known before it is built (a config from a file may ask for far more memory than there is)."""
        gates = {"lstm": 4, "gru": 3}.get(self.cell, 1)
        width = self.vocab_size if self.input_mode == "one_hot" else self.embedding_dim
        total = 0 if self.input_mode == "one_hot" else self.vocab_size * self.embedding_dim
        for size in self.layer_sizes:
            total += gates * size * (width + size + 2)
            width = size
        total += self.vocab_size * (width + 1) + width * self.embedding_dim  # decoder, and a tying projection
        return total * (2 if self.bidirectional else 1)

    def architecture(self) -> dict:
        """The settings that give the weights their shapes and meaning (dropouts and how the loss is computed
        excluded): two models can share weights exactly when these agree."""
        return {k: v for k, v in self.to_dict().items() if k not in NEUTRAL}

    def regularisers(self) -> dict:
        """The dropout rates and ``locked_dropout``: what a fine-tuning run may change."""
        return {k: getattr(self, k) for k in (*DROPOUTS, "locked_dropout")}

    def settings(self) -> dict:
        """The user's settings (:meth:`to_dict` without ``format_version``, which describes the file, not the
        model)."""
        values = self.to_dict()
        values.pop("format_version")
        return values

    @classmethod
    def setting_names(cls) -> set[str]:
        """The names a user sets (``--model.config.<name>``)."""
        return {f.name for f in dataclasses.fields(cls)} - {"format_version"}

    # ------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        """Plain JSON types, lists for sequences."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> RNNLMConfig:
        """The config of ``values`` (as :meth:`to_dict` writes it); unknown keys are refused by name."""
        if not isinstance(values, dict):
            raise ConfigError(f"A model config must be a JSON object of settings, got {type(values).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"Unknown model setting(s) {', '.join(unknown)}; the settings are: {', '.join(sorted(names))}."
            )
        if "vocab_size" not in values:
            raise ConfigError("The model config has no vocab_size.")
        return cls(**values)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"Unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def check_size(config: RNNLMConfig, where: str) -> None:
    """Refuse, before a tensor is allocated, settings whose model would not fit in this machine's memory: a
    damaged or hand-edited file (``hidden_size`` 10^7) would otherwise end in a crash rather than a message."""
    needed = 4 * config.approximate_parameters()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every system reports it
        return
    if needed > memory:
        raise ConfigError(
            f"the model settings of {where} ask for about {needed / 2**30:,.0f} GiB of weights (vocab_size "
            f"{config.vocab_size:,}, hidden sizes {list(config.layer_sizes)}), more than this machine's "
            f"{memory / 2**30:,.0f} GiB: the file is damaged or its settings are wrong."
        )
