"""Export-friendly faces of the networks: plain tensors in, plain tensors out, for ``torch.export`` and ONNX.

:class:`~rnnlm.network.lm.RNNLM` carries its state in a shape that depends on the stack (a tensor, an LSTM's
``(h, c)`` pair, or a list with one of those per layer) and returns a NamedTuple with optional fields; exporters
and runtimes want a fixed list of tensors. :class:`LMStep` is that fixed list around an unchanged RNNLM:

    ids [B, T], h_0 [B, H_0], (c_0 [B, H_0],) h_1 [B, H_1], ...   ->   logits [B, T, V], h_0', (c_0',) h_1', ...

one state tensor per layer (and per LSTM memory cell), batch first, whichever stack (fused or layer by layer) the
model runs, so that a server feeds the states it got back into the next call without knowing the model's insides.
:class:`ClassifierStep` is :class:`~rnnlm.network.classifier.Classifier` with its ``(ids, lengths) -> logits``
face. Both compute with the wrapped model's own modules (no copy of the weights, no second implementation), so
their outputs are the eager model's; :mod:`rnnlm.sharing.serving` exports them and checks that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnlm.errors import ConfigError
from rnnlm.network.classifier import Classifier
from rnnlm.network.lm import RNNLM, LayerStack


def _refuse_training_mode(model: nn.Module) -> None:
    # Exporters trace one mode; a model in training mode would bake random dropout masks into the graph.
    if model.training:
        raise ConfigError(f"{type(model).__name__} is in training mode: call .eval() before wrapping it for serving "
                          "(dropout would otherwise be part of the exported graph).")


class _EvalOnly(nn.Module):
    """A wrapper that stays in eval mode. torch.onnx.export puts a module back into the mode it found it in, and
    ``train(True)`` on a fresh wrapper would reach the wrapped model and switch its dropout and weight drop on."""

    def __init__(self) -> None:
        super().__init__()
        self.training = False

    def train(self, mode: bool = True) -> _EvalOnly:
        if mode:
            raise ConfigError(f"{type(self).__name__} serves a model in eval mode; train the model itself.")
        return super().train(False)


def state_names(model: RNNLM) -> list[str]:
    """Names of the state tensors of :class:`LMStep`, in order: ``h_0`` (``c_0`` for an LSTM), ``h_1``, ..."""
    kinds = ("h", "c") if model.config.cell == "lstm" else ("h",)
    return [f"{kind}_{layer}" for layer in range(model.config.num_layers) for kind in kinds]


class LMStep(_EvalOnly):
    """The forward language model's step with its state as plain tensors (see the module docstring).

    Refused: the adaptive softmax (its log-probabilities are built cluster by cluster, which the exporters do not
    turn into one graph reliably) and the backward direction of a bidirectional model (a server continues text
    left to right; the forward direction of a bidirectional model is served as any other LM).
    """

    def __init__(self, model: RNNLM) -> None:
        super().__init__()
        _refuse_training_mode(model)
        if model.config.output == "adaptive":
            raise ConfigError("Serving export does not support the adaptive softmax (output='adaptive'): its "
                              "log-probabilities are assembled cluster by cluster, which torch.export and ONNX do not "
                              "capture as one graph. Serve it in eager PyTorch (RNNLM.forward).")
        self.model = model
        self.lstm = model.config.cell == "lstm"
        self.sizes = list(model.config.layer_sizes)
        self.per_layer = isinstance(model.rnn, LayerStack)

    @property
    def state_names(self) -> list[str]:
        return state_names(self.model)

    def zero_state(self, batch_size: int) -> list[Tensor]:
        """The start of a text: every state tensor zeros (what RNNLM does with ``state=None``)."""
        like = next(self.model.parameters())
        return [like.new_zeros(batch_size, self.sizes[i // (2 if self.lstm else 1)]) for i in
                range(len(self.state_names))]

    def _to_model_state(self, flat: tuple[Tensor, ...]):
        """The flat per-layer tensors [B, H_l] as the stack's own state."""
        per_kind = 2 if self.lstm else 1
        layers = [flat[i * per_kind:(i + 1) * per_kind] for i in range(len(self.sizes))]
        if self.per_layer:  # a list with each one-layer module's state, [1, B, H_l]
            return [(layer[0][None], layer[1][None]) if self.lstm else layer[0][None] for layer in layers]
        stacked = [torch.stack([layer[k] for layer in layers]) for k in range(per_kind)]  # [L, B, H]
        return (stacked[0], stacked[1]) if self.lstm else stacked[0]

    def _from_model_state(self, state) -> list[Tensor]:
        if self.per_layer:
            out = []
            for layer in state:
                out.extend([layer[0][0], layer[1][0]] if self.lstm else [layer[0]])
            return out
        kinds = list(state) if self.lstm else [state]
        return [kinds[k][layer] for layer in range(len(self.sizes)) for k in range(len(kinds))]

    def forward(self, ids: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """Logits ``[B, T, V]`` of ids ``[B, T]`` read from ``state`` (:attr:`state_names`), then the new state."""
        out = self.model(ids, state=self._to_model_state(state))
        return (out.logits, *self._from_model_state(out.state))


class ClassifierStep(_EvalOnly):
    """A :class:`Classifier` in eval mode: ``(ids [B, T], lengths [B]) -> logits [B, C]``, texts padded as
    :class:`rnnlm.data.classifier.Batch` has them. An exported classifier does not check that every text has a
    token after the separator (a data-dependent branch no exporter keeps, see
    :func:`~rnnlm.network.classifier.concat_pool`): the caller's batching guarantees it, as
    :func:`rnnlm.text.batching.batches_by_length` does."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        _refuse_training_mode(model)
        self.model = model

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        return self.model(ids, lengths)
