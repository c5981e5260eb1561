"""ULMFiT's fine-tuning recipe (Howard & Ruder 2018, "Universal Language Model Fine-tuning for Text Classification").

- **Layer groups**: the classifier's parameters cut bottom to top into the input embedding, each recurrent layer
  (both directions of a bidirectional model together) and the head
  (:meth:`rnnlm.network.classifier.Classifier.layer_groups`).
- **Discriminative learning rates**: one optimizer parameter group per layer group; the head gets the configured
  learning rate and each group below it that rate divided once more by ``factor`` (2.6 in the paper), so the
  embedding, farthest from the task, moves least (:func:`discriminative_param_groups`).
- **Gradual unfreezing**: the first epoch trains the head alone, each later epoch unfreezes the next group down
  (:func:`trainable_groups`, :func:`freeze_below`); frozen parameters get no gradient, so the optimizer leaves them
  (and their weight decay) alone.
- **Slanted triangular learning rates**: a short linear warm-up to the peak, then a long linear decay
  (:class:`SlantedTriangularLR`).
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from rnnlm.errors import ConfigError

ParameterGroups = list[tuple[str, list[nn.Parameter]]]


def discriminative_param_groups(groups: ParameterGroups, factor: float) -> list[dict]:
    """Optimizer parameter groups for layer groups given bottom to top: the top group's ``lr_scale`` is 1, the one
    below ``1 / factor``, then ``1 / factor**2``, ... (``factor=1`` gives every group the same rate).

    Each dict carries its group's ``name`` and ``lr_scale``; :func:`scale_learning_rates` applies the scales once the
    optimizer has set every group's base learning rate."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ConfigError(f"The discriminative learning-rate factor must be >= 1 (1 turns it off), got {factor!r}.")
    top = len(groups) - 1
    return [{"params": params, "name": name, "lr_scale": float(factor) ** -(top - i)}
            for i, (name, params) in enumerate(groups)]


def scale_learning_rates(optimizer: Optimizer) -> None:
    """Multiply each parameter group's learning rate by its ``lr_scale`` (before a scheduler records the rates)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)


def trainable_groups(epoch: int, num_groups: int, groups_per_epoch: int | None) -> int:
    """How many layer groups, counted from the top, train in ``epoch`` (0-based): one in the first epoch (the head),
    then ``groups_per_epoch`` more each epoch; all of them when ``groups_per_epoch`` is None (no unfreezing)."""
    if groups_per_epoch is None:
        return num_groups
    return min(num_groups, 1 + epoch * groups_per_epoch)


def freeze_below(groups: ParameterGroups, trainable: int) -> None:
    """Let the top ``trainable`` groups learn and freeze the others (``requires_grad``)."""
    first = len(groups) - trainable
    for i, (_, params) in enumerate(groups):
        for p in params:
            p.requires_grad_(i >= first)


class SlantedTriangularLR(LRScheduler):
    """The slanted triangular schedule of ULMFiT, stepped once per optimizer step.

    With ``T = total_steps``, ``cut = floor(T * cut_frac)`` and ``p = t / cut`` while ``t < cut``, else
    ``p = 1 - (t - cut) / (T - cut)``, the rate at step t is ``lr * (1 + p * (ratio - 1)) / ratio``: it climbs from
    ``lr / ratio`` to the configured ``lr`` over the first ``cut_frac`` of the steps and falls back to ``lr / ratio``
    at the last one. Each parameter group keeps its own peak, so discriminative rates keep their ratios.

    ``total_steps`` None: the classifier sets it from the Trainer (``trainer.estimated_stepping_batches``) right
    after creating the scheduler, so a YAML file needs only ``class_path: rnnlm.training.ulmfit.SlantedTriangularLR``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        cut_frac: float = 0.1,
        ratio: float = 32.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ConfigError(f"SlantedTriangularLR.total_steps must be a positive integer or null, got "
                              f"{total_steps!r}.")
        if not 0 < cut_frac < 1:
            raise ConfigError(f"SlantedTriangularLR.cut_frac must be in (0, 1), got {cut_frac!r}.")
        if not ratio >= 1:
            raise ConfigError(f"SlantedTriangularLR.ratio must be >= 1, got {ratio!r}.")
        self.total_steps = total_steps
        self.cut_frac = cut_frac
        self.ratio = ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the peak learning rate at ``step`` (0-based)."""
        if step <= 0:
            return 1 / self.ratio
        if self.total_steps is None:
            raise ConfigError(
                "SlantedTriangularLR needs total_steps: set it, or use the scheduler through rnnlm.classify, which "
                "sets it from the Trainer."
            )
        total = self.total_steps
        cut = max(1, math.floor(total * self.cut_frac))
        if step < cut:
            p = step / cut
        else:
            p = max(0.0, 1 - (step - cut) / max(1, total - cut))
        return (1 + p * (self.ratio - 1)) / self.ratio

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]
