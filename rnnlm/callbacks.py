"""Lightning callbacks of rnnlm."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from tokenizers import Tokenizer

from rnnlm.inference import sample
from rnnlm.tokenization import Encoder


class TextSample(L.Callback):
    """Samples text from the model after each validation pass and at the end of training.

    Every sample is added to a ``samples`` table (prompt, continuation, temperature, step) in each logger that
    keeps tables (W&B); the final one is also printed.

    Args:
        prompt: text that primes the hidden state before sampling.
        max_new_tokens: tokens to generate (0 turns sampling off).
        temperature: softmax temperature (0 = greedy).
        top_k: sample only from the k most likely tokens.
        seed: makes the samples reproducible.
        every_validation: also sample after each validation pass (and print it when ``print_every_validation``).
        print_every_validation: print the samples taken after validation passes, not just the final one.
    """

    COLUMNS = ["step", "prompt", "continuation", "temperature"]

    def __init__(
        self,
        prompt: str = "",
        max_new_tokens: int = 300,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 0,
        every_validation: bool = True,
        print_every_validation: bool = False,
    ) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.every_validation = every_validation
        self.print_every_validation = print_every_validation
        self.samples: list[list] = []
        self._encoder: tuple[str, Encoder] | None = None

    def _can_sample(self, pl_module) -> bool:
        # A model trained on plain loaders has no tokenizer to write text with.
        return self.max_new_tokens > 0 and pl_module.tokenizer_json is not None

    def _sample(self, trainer: L.Trainer, pl_module) -> str:
        if self._encoder is None or self._encoder[0] != pl_module.tokenizer_json:
            self._encoder = (pl_module.tokenizer_json, Encoder(Tokenizer.from_str(pl_module.tokenizer_json)))
        text = sample(pl_module.model, self._encoder[1], self.prompt, self.max_new_tokens, self.temperature,
                      self.top_k, self.seed)
        self.samples.append([trainer.global_step, self.prompt, text, self.temperature])
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                # W&B tables are immutable once logged: log the whole, growing table each time.
                logger.log_table("samples", columns=self.COLUMNS, data=[list(r) for r in self.samples],
                                 step=trainer.global_step)
        return text

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_validation and not trainer.sanity_checking and self._can_sample(pl_module):
            text = self._sample(trainer, pl_module)
            if self.print_every_validation:
                print(f"\n--- sample at step {trainer.global_step} ---\n{self.prompt}{text}\n---", flush=True)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._can_sample(pl_module):
            text = self._sample(trainer, pl_module)
            print(f"\n--- sample after {trainer.global_step} steps ---\n{self.prompt}{text}\n---", flush=True)


class NTASGD(L.Callback):
    """Non-monotonically triggered averaged SGD (NT-ASGD; Merity et al. 2017, "Regularizing and Optimizing LSTM
    Language Models", section 3).

    Training runs with the configured optimizer (SGD with a constant learning rate in the paper) until validation
    stops improving: averaging is triggered at the first validation whose loss is worse than the best loss of the
    checks made more than ``patience`` checks before it (the paper's non-monotone criterion, n = 5). From then on
    the running mean of the weights after every optimizer step is kept, which is ASGD with its averaging started
    at the trigger and no learning-rate decay (``torch.optim.ASGD`` with ``t0`` at the trigger and ``lambd=0``),
    so the optimizer itself and its state carry on unchanged.

    Once averaging has started, validation and test run with the averaged weights, the checkpoints' ``state_dict``
    holds them (so the "best" checkpoint, ``rnnlm.evaluate`` and ``rnnlm.generate`` use them) and the model ends
    training holding them. The training weights, the running means and the trigger history are this callback's
    checkpoint state, so a resumed run continues exactly.

    Args:
        patience: the paper's non-monotone interval n, in validation checks.
        monitor: the validation metric to watch (lower is better).
    """

    def __init__(self, patience: int = 5, monitor: str = "val/loss") -> None:
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"NTASGD patience must be a non-negative integer, got {patience!r}.")
        self.patience = patience
        self.monitor = monitor
        self.history: list[float] = []
        self.start_step: int | None = None  # global step at which averaging started
        self.count = 0  # optimizer steps averaged so far
        self.last_step = -1
        self.averages: dict[str, torch.Tensor] = {}
        self._training_weights: dict[str, torch.Tensor] | None = None  # held aside while averages are in use
        self._restored_weights: dict[str, torch.Tensor] | None = None  # from a checkpoint, applied at train start

    @property
    def averaging(self) -> bool:
        return self.start_step is not None

    # ----------------------------------------------------------------------------------------- averaging
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        self.count = 0
        self.last_step = trainer.global_step
        self.averages = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        rank_zero_info(
            f"rnnlm: NT-ASGD: validation has not improved on the best of more than {self.patience} checks ago; "
            f"averaging the weights from step {trainer.global_step} on"
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.averaging or trainer.global_step == self.last_step:
            return  # not averaging yet, or no optimizer step in this batch (gradient accumulation)
        self.last_step = trainer.global_step
        self.count += 1
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                self.averages[name].lerp_(p.detach(), 1.0 / self.count)

    def _use_averages(self, pl_module: L.LightningModule) -> None:
        if not self.averaging or self._training_weights is not None:
            return
        self._training_weights = {}
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                self._training_weights[name] = p.detach().clone()
                p.copy_(self.averages[name])

    def _use_training_weights(self, pl_module: L.LightningModule) -> None:
        if self._training_weights is None:
            return
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                p.copy_(self._training_weights[name])
        self._training_weights = None

    # ----------------------------------------------------------------------------------------- trigger, evaluation
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._use_averages(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._use_training_weights(pl_module)
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.monitor not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics[self.monitor])
        if not self.averaging and self.should_start(self.history, loss, self.patience):
            self._start(trainer, pl_module)
        self.history.append(loss)

    @staticmethod
    def should_start(history: list[float], loss: float, patience: int) -> bool:
        """The non-monotone trigger: ``loss`` is worse than the best of the checks before the last ``patience``."""
        earlier = history[: len(history) - patience]
        return bool(earlier) and loss > min(earlier)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run: the checkpoint's state_dict held the averages; put the training weights back.
        params = dict(pl_module.named_parameters())
        self.averages = {name: t.to(params[name].device, params[name].dtype) for name, t in self.averages.items()}
        if self._restored_weights is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self._restored_weights[name])
            self._restored_weights = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The trained model is the averaged one (what the paper evaluates and saves).
        if self.averaging:
            with torch.no_grad():
                for name, p in pl_module.named_parameters():
                    p.copy_(self.averages[name])

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        state = {
            "patience": self.patience,
            "history": list(self.history),
            "start_step": self.start_step,
            "count": self.count,
            "last_step": self.last_step,
        }
        if self.averaging:
            state["averages"] = {name: t.detach().clone() for name, t in self.averages.items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self.start_step = state_dict["start_step"]
        self.count = state_dict["count"]
        self.last_step = state_dict["last_step"]
        self.averages = dict(state_dict.get("averages", {}))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not self.averaging:
            return
        # The module's weights go in as averages; the training weights travel in this callback's state.
        training = self._training_weights or {n: p.detach() for n, p in pl_module.named_parameters()}
        by_tensor = {id(p): name for name, p in pl_module.named_parameters()}
        for key, tensor in pl_module.state_dict(keep_vars=True).items():
            name = by_tensor.get(id(tensor))
            if name is not None and key in checkpoint["state_dict"]:
                checkpoint["state_dict"][key] = self.averages[name].detach().clone()
        state = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})
        state["training_weights"] = {name: t.detach().clone() for name, t in training.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":  # resuming; a checkpoint loaded for testing keeps its averaged weights
            state = checkpoint.get("callbacks", {}).get(self.state_key, {})
            self._restored_weights = state.get("training_weights")
