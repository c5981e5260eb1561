"""NT-ASGD (Merity et al. 2017) on Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging`."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError


class NTASGD(WeightAveraging):
    """Non-monotonically triggered averaged SGD (NT-ASGD; Merity et al. 2017, "Regularizing and Optimizing LSTM
    Language Models", section 3).

    Training runs with the configured optimizer (SGD with a constant learning rate in the paper) until validation
    stops improving: averaging is triggered at the first validation whose loss is worse than the best loss of the
    checks made more than ``patience`` checks before it (the paper's non-monotone criterion, n = 5). From then on
    the running mean of the weights after every optimizer step is kept, which is ASGD with its averaging started
    at the trigger and no learning-rate decay (``torch.optim.ASGD`` with ``t0`` at the trigger and ``lambd=0``),
    so the optimizer itself and its state carry on unchanged.

    The mean is Lightning's ``WeightAveraging`` (a ``torch.optim.swa_utils.AveragedModel`` with the equal-weight
    SWA average, parameters only), created at the trigger. Once averaging has started, validation runs with the
    averaged weights, the checkpoints' ``state_dict`` holds them (so the "best" checkpoint, ``rnnlm.evaluate`` and
    ``rnnlm.generate`` use them; the training weights are the checkpoint's ``current_model_state``) and the model
    ends training holding them. With the trigger history in this callback's state, a resumed run continues exactly.

    Args:
        patience: the paper's non-monotone interval n, in validation checks.
        monitor: the validation metric to watch (lower is better).
    """

    def __init__(self, patience: int = 5, monitor: str = "val/loss") -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ConfigError(f"NTASGD patience must be a non-negative integer, got {patience!r}.")
        # Parameters only, as ASGD: buffers (none in rnnlm's models) follow the training model.
        super().__init__(use_buffers=False)
        self.patience = patience
        self.monitor = monitor
        self.history: list[float] = []
        self.start_step: int | None = None  # global step at which averaging started

    @property
    def averaging(self) -> bool:
        return self._average_model is not None

    @property
    def count(self) -> int:
        """Optimizer steps averaged so far."""
        return int(self._average_model.n_averaged) if self.averaging else 0

    @property
    def averages(self) -> dict[str, Tensor]:
        """The averaged weights, by parameter name."""
        return dict(self._average_model.module.named_parameters()) if self.averaging else {}

    # ----------------------------------------------------------------------------------------- trigger
    @staticmethod
    def should_start(history: list[float], loss: float, patience: int) -> bool:
        """The non-monotone trigger: ``loss`` is worse than the best of the checks before the last ``patience``."""
        earlier = history[: len(history) - patience]
        return bool(earlier) and loss > min(earlier)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        # After every optimizer step from the trigger on (step_idx counts from 0: step start_step + 1 is the first).
        return self.averaging and step_idx is not None and step_idx >= self.start_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # WeightAveraging copies the model here, at the start of fit, on the device the model has before the
        # strategy moves it (the CPU when it trains on a GPU). NT-ASGD copies it at the trigger instead (_start),
        # on the device it trains on, and holds no second copy of the weights before then.
        pass

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.monitor not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics[self.monitor])
        if not self.averaging and self.should_start(self.history, loss, self.patience):
            self._start(trainer, pl_module)
        self.history.append(loss)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        self._latest_update_step = trainer.global_step
        # Starts as a copy of the current weights (the checkpoint written right after this validation holds them);
        # its first update replaces them with the weights after the next step, its n-th keeps the mean of n.
        self._average_model = AveragedModel(pl_module, use_buffers=False)
        rank_zero_info(
            f"rnnlm: NT-ASGD: validation has not improved on the best of more than {self.patience} checks ago; "
            f"averaging the weights from step {trainer.global_step} on"
        )

    # ----------------------------------------------------------------------------------------- evaluation
    def _swaps(self, trainer: L.Trainer) -> bool:
        # Validation during fit runs on the averages; after fit the model holds them already.
        return self.averaging and trainer.state.fn == "fit" and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swaps(trainer):
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swaps(trainer):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaging:  # restored from a checkpoint before the strategy moved the model
            self._average_model.to(pl_module.device)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The trained model is the averaged one (what the paper evaluates and saves).
        if self.averaging:
            super().on_train_end(trainer, pl_module)

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "patience": self.patience, "history": list(self.history),
                "start_step": self.start_step}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.start_step = state_dict["start_step"]
        if "latest_update_step" in state_dict:
            super().load_state_dict(state_dict)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Averages into state_dict, training weights into current_model_state, n_averaged into averaging_state.
        if self.averaging:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":
            return  # a checkpoint loaded for evaluation keeps its averaged weights
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if state.get("start_step") is None:
            return  # written before the trigger: nothing averaged yet
        if "current_model_state" not in checkpoint:
            raise CheckpointError(
                "This checkpoint was written, with NT-ASGD averaging under way, by an earlier rnnlm whose NTASGD "
                "kept the training weights elsewhere; this version cannot continue it exactly. Continue it with the "
                "rnnlm version that wrote it, or start a new run from its (averaged) weights."
            )
        # The model holds the averages (the checkpoint's state_dict): copy it, then let WeightAveraging load the
        # averages and count into the copy and the training weights back into the model.
        self._average_model = AveragedModel(pl_module, use_buffers=False)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
