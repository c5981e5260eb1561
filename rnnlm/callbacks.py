"""Lightning callbacks of rnnlm."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
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

