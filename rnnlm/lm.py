"""The LightningModule: truncated BPTT with the hidden state carried from chunk to chunk.

Each batch is one ``[B, T]`` chunk whose row b continues row b of the previous batch (see ``streams.py``). The
state left by a chunk is detached and fed to the next one, so the model reads unbounded context while gradients
flow through T steps only. Optimisation stays automatic, so the Trainer's gradient clipping, accumulation,
mixed precision and LightningCLI's optimizer / lr_scheduler settings all keep working.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor
from torchmetrics import MeanMetric

from rnnlm import __version__
from rnnlm.model import DIRECTIONS, RNNLM, State, detach_state, state_batch_size
from rnnlm.tokenization import Encoder

LN2 = math.log(2)


class LanguageModel(L.LightningModule):
    """Trains :class:`~rnnlm.model.RNNLM` on contiguous chunks; arguments as in ``RNNLM``, plus:

    Args:
        activation_regularization: AR (Merity et al. 2017): adds ``alpha * mean(h^2)`` of the decoder input (the
            top layer's output after output dropout) to the training loss.
        temporal_activation_regularization: TAR: adds ``beta * mean((h_t - h_{t-1})^2)`` of the top layer's output
            before dropout, so the state moves slowly.

    ``vocab_size`` comes from the data module (LightningCLI links ``data.vocab_size`` to it). With variable-length
    BPTT (``data.variable_bptt``) the learning rate of each step is scaled by ``chunk length / bptt``, as in
    AWD-LSTM, so that short chunks do not weigh as much as long ones.
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
        hidden_sizes: list[int] | None = None,
        weight_drop: float = 0.0,
        locked_dropout: bool = False,
        dropout_words: float = 0.0,
        activation_regularization: float = 0.0,
        temporal_activation_regularization: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("activation_regularization", activation_regularization),
                            ("temporal_activation_regularization", temporal_activation_regularization)):
            if value < 0:
                raise ValueError(f"model.{name} must be >= 0, got {value!r}.")
        self.save_hyperparameters()
        self.model = RNNLM(
            vocab_size=vocab_size,
            cell=cell,
            num_layers=num_layers,
            embedding_dim=embedding_dim,
            hidden_size=hidden_size,
            input_mode=input_mode,
            dropout_embedding=dropout_embedding,
            dropout_between=dropout_between,
            dropout_output=dropout_output,
            tie_weights=tie_weights,
            bidirectional=bidirectional,
            share_directions=share_directions,
            hidden_sizes=hidden_sizes,
            weight_drop=weight_drop,
            locked_dropout=locked_dropout,
            dropout_words=dropout_words,
        )
        # Carried hidden state per stage: validation must not disturb the training stream's state.
        self._state: dict[str, State | None] = {}
        self._eval_loss = torch.nn.ModuleDict(
            {f"{stage}_{direction}": MeanMetric() for stage in ("val", "test") for direction in DIRECTIONS}
        )
        self.tokenizer_json: str | None = None
        self._encoder: tuple[str, Encoder] | None = None
        self.chars_per_token: dict[str, float] = {}
        self._data_facts: dict = {}
        self._tps: tuple[float, int] | None = None
        self._penalties: list[Tensor] = []  # AR/TAR terms of the current training step
        self._unscaled_lrs: list[float] | None = None  # learning rates before this step's length scaling

    # ----------------------------------------------------------------------------------------- plumbing
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "encoder"):
            return
        if dm.hparams.bidirectional != self.hparams.bidirectional:
            raise ValueError(
                f"model.bidirectional={self.hparams.bidirectional} but data.bidirectional={dm.hparams.bidirectional}: "
                "a bidirectional model needs the data module's backward chunks (the CLI links the two)."
            )
        if dm.vocab_size != self.hparams.vocab_size:
            raise ValueError(
                f"The model was built for {self.hparams.vocab_size} tokens but the data's tokenizer has "
                f"{dm.vocab_size}; they must match (leave model.vocab_size to the data module)."
            )
        self.tokenizer_json = dm.tokenizer.to_str()
        for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
            if split in dm.stats:
                self.chars_per_token[name] = dm.chars_per_token(split)
        self._data_facts = dm.facts()

    def on_fit_start(self) -> None:
        facts = {"parameters": sum(p.numel() for p in self.parameters()), "data": self._data_facts}
        for logger in self.loggers:
            logger.log_hyperparams(facts)

    def on_before_optimizer_step(self, optimizer) -> None:
        # The global gradient norm before clipping (the hook runs before the Trainer clips); logged as a tensor,
        # so it costs no device sync.
        norms = [torch.linalg.vector_norm(p.grad) for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms)), on_step=True, on_epoch=False)

    @property
    def encoder(self) -> Encoder:
        if self.tokenizer_json is None:
            raise RuntimeError("This model has no tokenizer yet: train it with LMDataModule or load a checkpoint.")
        if self._encoder is None or self._encoder[0] != self.tokenizer_json:
            self._encoder = (self.tokenizer_json, Encoder(Tokenizer.from_str(self.tokenizer_json)))
        return self._encoder[1]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings and numbers only, so the checkpoint alone is enough to generate or evaluate.
        checkpoint["rnnlm"] = {
            "version": __version__,
            "tokenizer": self.tokenizer_json,
            "chars_per_token": dict(self.chars_per_token),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("rnnlm", {})
        self.tokenizer_json = extra.get("tokenizer")
        self.chars_per_token = dict(extra.get("chars_per_token", {}))

    def forward(self, idx: Tensor, state: State | None = None, direction: str = "forward") -> tuple[Tensor, State]:
        return self.model(idx, state, direction)

    # ----------------------------------------------------------------------------------------- steps
    def _direction_loss(self, key: str, direction: str, x: Tensor, y: Tensor) -> Tensor:
        state = self._state.get(key)
        if state is not None and state_batch_size(state) != x.size(0):
            state = None  # a different number of streams: nothing to carry
        top, state = self.model.recurrent(x, state, direction)
        self._state[key] = detach_state(state)
        hidden = self.model.head_input(top, direction)
        if self.training:
            self._activation_penalties(top, hidden)
        logits = self.model.decode(hidden, direction)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    def _activation_penalties(self, top: Tensor, hidden: Tensor) -> None:
        alpha, beta = self.hparams.activation_regularization, self.hparams.temporal_activation_regularization
        if alpha > 0:
            self._penalties.append(alpha * hidden.float().pow(2).mean())
        if beta > 0 and top.size(1) > 1:
            self._penalties.append(beta * (top[:, 1:] - top[:, :-1]).float().pow(2).mean())

    def _losses(self, stage: str, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """Loss of each direction on this chunk, carrying each direction's state within ``stage``."""
        losses = {"forward": self._direction_loss(stage, "forward", batch[0], batch[1])}
        if self.model.bidirectional:
            if len(batch) != 4:
                raise ValueError(
                    "A bidirectional model needs the backward chunks too: use LMDataModule(bidirectional=True) "
                    "(the CLI sets it from model.bidirectional)."
                )
            losses["backward"] = self._direction_loss(f"{stage}/backward", "backward", batch[2], batch[3])
        return losses

    def _metrics(self, stage: str, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """loss (mean of the directions), ppl, bits per token and per character; per direction when there are two."""
        named = {f"{stage}/": sum(losses.values()) / len(losses)}
        if len(losses) > 1:
            named.update({f"{stage}/{direction}/": loss for direction, loss in losses.items()})
        metrics = {}
        for prefix, loss in named.items():
            metrics[prefix + "loss"] = loss
            metrics[prefix + "ppl"] = torch.exp(loss)
            metrics[prefix + "bits_per_token"] = loss / LN2
            if stage in self.chars_per_token:
                metrics[prefix + "bpc"] = loss / LN2 / self.chars_per_token[stage]
        return metrics

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        self._penalties = []
        losses = self._losses("train", batch)
        loss = sum(losses.values()) / len(losses)
        if self._penalties:
            penalty = sum(self._penalties) / len(losses)
            self.log("train/activation_penalty", penalty.detach(), on_step=True, on_epoch=False)
            loss = loss + penalty
        metrics = self._metrics("train", {k: v.detach() for k, v in losses.items()})
        self.log("train/loss", metrics.pop("train/loss"), on_step=True, on_epoch=False, prog_bar=True)
        self.log_dict(metrics, on_step=True, on_epoch=False)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            # A Python float becomes a device tensor when logged: only pay that copy on the steps that are written.
            lr = self._unscaled_lrs[0] if self._unscaled_lrs else self.optimizers().param_groups[0]["lr"]
            self.log("lr", lr, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_start(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        # Variable-length BPTT: this step's learning rate is scaled by its chunk length / bptt (restored after).
        loader = self.trainer.train_dataloader
        if not getattr(loader, "variable_length", False):
            return
        self._restore_lrs()  # a batch that did not step (gradient accumulation) left its scaling behind
        scale = batch[0].size(1) / loader.bptt
        groups = [g for opt in self.trainer.optimizers for g in opt.param_groups]
        self._unscaled_lrs = [g["lr"] for g in groups]
        for group in groups:
            group["lr"] = group["lr"] * scale

    def _restore_lrs(self) -> None:
        if self._unscaled_lrs is not None:
            groups = [g for opt in self.trainer.optimizers for g in opt.param_groups]
            for group, lr in zip(groups, self._unscaled_lrs):
                group["lr"] = lr
            self._unscaled_lrs = None

    def optimizer_step(self, *args, **kwargs) -> None:
        # Restored right after the step, so that whatever runs next (callbacks, checkpoints, schedulers) sees the
        # configured learning rate.
        try:
            super().optimizer_step(*args, **kwargs)
        finally:
            self._restore_lrs()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._restore_lrs()
        # Tokens/s over each logging window; no device sync, which would stall a GPU every step.
        now, ntok = time.perf_counter(), batch[1].numel() * self.trainer.world_size
        if self._tps is None:
            self._tps = (now, 0)
            return
        t0, seen = self._tps
        seen += ntok
        if (self.global_step % self.trainer.log_every_n_steps == 0) and now > t0:
            self.log("train/tokens_per_s", seen / (now - t0), on_step=True, on_epoch=False, prog_bar=True)
            self._tps = (now, 0)
        else:
            self._tps = (t0, seen)

    def _eval_step(self, stage: str, batch: tuple[Tensor, ...]) -> None:
        for direction, loss in self._losses(stage, batch).items():
            self._eval_loss[f"{stage}_{direction}"].update(loss, weight=batch[1].numel())

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_eval(self, stage: str) -> None:
        losses = {}
        for direction in DIRECTIONS:
            metric = self._eval_loss[f"{stage}_{direction}"]
            if metric.update_count:
                losses[direction] = metric.compute()  # token-weighted mean over all batches and ranks
                metric.reset()
        if losses:
            self.log_dict(self._metrics(stage, losses), prog_bar=(stage == "val"), sync_dist=False)

    # ----------------------------------------------------------------------------------------- epoch hooks
    def _reset_state(self, stage: str) -> None:
        for key in [k for k in self._state if k.split("/")[0] == stage]:
            del self._state[key]

    def on_train_epoch_start(self) -> None:
        self._reset_state("train")
        self._tps = None

    def on_validation_epoch_start(self) -> None:
        self._reset_state("val")

    def on_test_epoch_start(self) -> None:
        self._reset_state("test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def configure_optimizers(self):
        # Used when no optimizer is configured (plain Python use); configs set their own through LightningCLI.
        return torch.optim.AdamW(self.parameters(), lr=2e-3)

    # ----------------------------------------------------------------------------------------- use
    def sample(
        self,
        prompt: str = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> str:
        """Generate text after ``prompt``; the hidden state starts from a document boundary."""
        enc = self.encoder
        prompt_ids = enc.encode_text(prompt)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            new = self.model.generate(
                torch.tensor([enc.separator, *prompt_ids], device=self.device),
                max_new_tokens,
                temperature,
                top_k,
                generator,
            ).tolist()
        finally:
            self.train(was_training)
        # Decode prompt and continuation together so that word-level spacing comes out right.
        head, full = enc.decode(prompt_ids), enc.decode(prompt_ids + new)
        return full[len(head) :] if full.startswith(head) else full

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> LanguageModel:
        """Load a trained model (weights, hyperparameters and tokenizer) from one checkpoint file.

        Loads with ``weights_only=True``: the file holds tensors and plain types only, so loading runs no code.
        """
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"Checkpoint {path!r} does not exist.") from None
        except Exception as err:
            raise ValueError(f"Could not read checkpoint {path!r} (corrupt or not a checkpoint?): {err}") from err
        if not isinstance(ckpt, dict) or "rnnlm" not in ckpt or "hyper_parameters" not in ckpt:
            raise ValueError(f"{path!r} is not an rnnlm checkpoint (it lacks the model settings and tokenizer).")
        # LightningCLI adds private entries (``_instantiator``) that are not model settings.
        model = cls(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
        model.load_state_dict(ckpt["state_dict"])
        model.on_load_checkpoint(ckpt)
        model.datamodule_hparams = {
            k: v for k, v in ckpt.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")
        }
        return model.to(map_location).eval()
