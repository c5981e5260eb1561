"""Lightning callbacks of rnnlm."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


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

    def _sample(self, trainer: L.Trainer, pl_module) -> str:
        text = pl_module.sample(self.prompt, self.max_new_tokens, self.temperature, self.top_k, self.seed)
        self.samples.append([trainer.global_step, self.prompt, text, self.temperature])
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                # W&B tables are immutable once logged: log the whole, growing table each time.
                logger.log_table("samples", columns=self.COLUMNS, data=[list(r) for r in self.samples],
                                 step=trainer.global_step)
        return text

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_validation and not trainer.sanity_checking and self.max_new_tokens > 0:
            text = self._sample(trainer, pl_module)
            if self.print_every_validation:
                print(f"\n--- sample at step {trainer.global_step} ---\n{self.prompt}{text}\n---", flush=True)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.max_new_tokens > 0:
            text = self._sample(trainer, pl_module)
            print(f"\n--- sample after {trainer.global_step} steps ---\n{self.prompt}{text}\n---", flush=True)

