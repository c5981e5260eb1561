"""The LightningModule: truncated BPTT with the hidden state carried from chunk to chunk.

Each batch is one ``[B, T]`` chunk whose row b continues row b of the previous batch (see ``streams.py``). The
state left by a chunk is detached and fed to the next one, so the model reads unbounded context while gradients
flow through T steps only. Optimisation stays automatic, so the Trainer's gradient clipping, accumulation,
mixed precision and LightningCLI's optimizer / lr_scheduler settings all keep working.

A checkpoint holds everything a run needs to continue exactly where it stopped, mid-epoch included: besides
what Lightning saves (weights, optimizer, schedulers, loop counters, the chunk loader's position) it carries the
training stream's hidden state and the random-number generators' states of every process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from tokenizers import Tokenizer
from torch import Tensor
from torchmetrics import MeanMetric

from rnnlm import __version__
from rnnlm.checkpointing import CheckpointError, load_safely
from rnnlm.model import DIRECTIONS, RNNLM, State, detach_state, state_batch_size
from rnnlm.streams import ChunkLoader
from rnnlm.tokenization import Encoder

LN2 = math.log(2)
NONFINITE_POLICIES = ("stop", "skip", "ignore")
# Settings that change the shapes or meaning of the weights: a checkpoint only continues a run that agrees on them.
ARCHITECTURE = ("vocab_size", "cell", "num_layers", "embedding_dim", "hidden_size", "input_mode", "tie_weights",
                "bidirectional", "share_directions", "output", "adaptive_cutoffs", "adaptive_div_value", "hidden_sizes")


def _map_state(fn, state):
    """Apply ``fn`` to every tensor of a carried state, keeping its nesting (tensor, LSTM tuple, list per layer)."""
    if isinstance(state, (list, tuple)):
        return type(state)(_map_state(fn, s) for s in state)
    return fn(state)


class NonFiniteLossError(RuntimeError):
    """The training loss or gradients became NaN or infinite."""


@functools.cache
def _onednn_has_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def _rnn_kernels_for_cpu_autocast():
    """Under CPU autocast (``precision="bf16-mixed"``) torch hands the recurrent layers to oneDNN in bf16, which fails
    on CPUs without bf16 instructions ("could not create a primitive descriptor"). There the recurrent layers run on
    torch's own kernels, in float32; the decoder and softmax, where large vocabularies spend the time, stay bf16."""
    low_precision = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32
    if not low_precision or _onednn_has_bf16():
        yield
        return
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


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

    ``on_nonfinite`` says what a NaN or infinite training loss (or gradient) does: ``stop`` (default) writes a
    checkpoint of the state before that step and stops with an explanation; ``skip`` drops the step (no weight
    update, the carried state restarts from zeros) and goes on; ``ignore`` does not check, which saves one host
    synchronisation per step on a GPU.
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
        output: str = "softmax",
        adaptive_cutoffs: list[int] | None = None,
        adaptive_div_value: float = 4.0,
        on_nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        for name, value in (("activation_regularization", activation_regularization),
                            ("temporal_activation_regularization", temporal_activation_regularization)):
            if value < 0:
                raise ValueError(f"model.{name} must be >= 0, got {value!r}.")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {on_nonfinite!r}.")
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
            output=output,
            adaptive_cutoffs=adaptive_cutoffs,
            adaptive_div_value=adaptive_div_value,
            hidden_sizes=hidden_sizes,
            weight_drop=weight_drop,
            locked_dropout=locked_dropout,
            dropout_words=dropout_words,
        )
        # Carried hidden state per stage: validation must not disturb the training stream's state.
        self._state: dict[str, State | None] = {}
        # nan_strategy="disable": the default NaN check reads a device value on every batch (a GPU sync); a NaN
        # loss still shows, as a NaN mean. With it, torchmetrics ignores the weight argument, hence _eval_step.
        self._eval_loss = torch.nn.ModuleDict(
            {
                f"{stage}_{direction}": MeanMetric(nan_strategy="disable")
                for stage in ("val", "test")
                for direction in DIRECTIONS
            }
        )
        self.tokenizer_json: str | None = None
        self._encoder: tuple[str, Encoder] | None = None
        self.chars_per_token: dict[str, float] = {}
        self._data_facts: dict = {}
        self._tps: tuple[float, int] | None = None
        self._resume: dict | None = None  # what on_load_checkpoint read, applied when training resumes
        self._before_step: dict = {}  # stream position and carried state before the current step
        self._last_loss: Tensor | None = None
        self.skipped_steps = 0
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

    def _writing_step(self) -> bool:
        """Whether the loggers write this step's metrics (Lightning writes every ``log_every_n_steps``)."""
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def on_before_optimizer_step(self, optimizer) -> None:
        # The global gradient norm before clipping (the hook runs before the Trainer clips); logged as a tensor,
        # so it costs no device sync, and computed only on the steps that are written (a pass over all gradients).
        grad_norm = None
        if self._writing_step():
            norms = [torch.linalg.vector_norm(p.grad) for p in self.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
            if grad_norm is not None:
                self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        if self.hparams.on_nonfinite != "ignore":
            # The loss every step; the gradients too on the steps where their norm is computed anyway.
            self._check_finite(optimizer, grad_norm)

    def on_before_backward(self, loss: Tensor) -> None:
        self._last_loss = loss.detach()  # the loss actually backpropagated, whatever training_step did to it

    def _check_finite(self, optimizer, grad_norm: Tensor | None) -> None:
        checks = [self._last_loss] if self._last_loss is not None else []
        # With fp16 loss scaling, infinite gradients are routine: the GradScaler skips those steps itself.
        if grad_norm is not None and "16-mixed" not in str(self.trainer.precision):
            checks.append(grad_norm)
        if not checks:
            return
        bad = not bool(torch.isfinite(torch.stack([c.float() for c in checks])).all())  # one host sync
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)  # every rank acts alike
        if not bad:
            return
        where = f"step {self.global_step} (epoch {self.current_epoch}, chunk {self._before_step.get('position')})"
        if self.hparams.on_nonfinite == "skip":
            optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without gradients: no update
            self._reset_state("train")  # the state left by this chunk may be NaN too
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            if self.trainer.is_global_zero:
                warnings.warn(f"rnnlm: non-finite loss or gradient at {where}: step skipped "
                              f"({self.skipped_steps} so far).", stacklevel=1)
            return
        path = self._save_last_good_state()
        raise NonFiniteLossError(
            f"The training loss or gradient became NaN or infinite at {where}, so training stopped before that "
            f"step changed the weights. The state before it is saved in {path}. The usual remedies: a lower "
            "learning rate (--optimizer.init_args.lr), gradient clipping (--trainer.gradient_clip_val 0.25), "
            "fp32 or bf16-mixed instead of 16-mixed precision, or a look at the data around that chunk. "
            "--model.on_nonfinite skip drops such steps instead of stopping."
        )

    def _save_last_good_state(self) -> str:
        """Write a checkpoint of the weights, optimizer, stream position and carried state before this step."""
        before = self._before_step
        self._reset_state("train")
        self._state.update(before.get("state", {}))
        loader = self.trainer.train_dataloader
        if isinstance(loader, ChunkLoader):
            loader.position = before.get("position", 0)
        ckpt = self.trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or self.trainer.default_root_dir
        path = os.path.join(folder, f"nonfinite-step{self.global_step}.ckpt")
        self.trainer.save_checkpoint(path, weights_only=False)
        return path

    @property
    def encoder(self) -> Encoder:
        if self.tokenizer_json is None:
            raise RuntimeError("This model has no tokenizer yet: train it with LMDataModule or load a checkpoint.")
        if self._encoder is None or self._encoder[0] != self.tokenizer_json:
            self._encoder = (self.tokenizer_json, Encoder(Tokenizer.from_str(self.tokenizer_json)))
        return self._encoder[1]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings, numbers and tensors only, so the checkpoint alone is enough to generate or evaluate and
        # loads with weights_only=True. Runs on every process (the gathers below are collective); rank 0 writes.
        checkpoint["rnnlm"] = {
            "version": __version__,
            "tokenizer": self.tokenizer_json,
            "chars_per_token": dict(self.chars_per_token),
        }
        if self._trainer is not None and self.trainer.state.fn == "fit":
            checkpoint["rnnlm"]["resume"] = self._resume_state()
            for logger in self.loggers:
                if isinstance(logger, WandbLogger) and self.trainer.is_global_zero:
                    # A resumed run continues the same W&B run (and so the same checkpoint folder).
                    checkpoint["rnnlm"]["wandb_run"] = {"id": logger.version, "name": logger.name}

    def _resume_state(self) -> dict:
        """The training stream's carried state and the RNG states, one slice per process."""

        def gathered(t: Tensor) -> Tensor:
            t = self.all_gather(t.to(self.device))
            return (t if self.trainer.world_size > 1 else t.unsqueeze(0)).cpu()

        carried = {}
        for key in ("train", "train/backward"):
            state = self._state.get(key)
            if state is not None:
                carried[key] = _map_state(gathered, state)  # same nesting (tuple for LSTM, list per layer)
        rng = {"cpu": gathered(torch.get_rng_state())}
        if self.device.type == "cuda":
            rng["cuda"] = gathered(torch.cuda.get_rng_state(self.device))
        return {"carried": carried, "rng": rng, "world_size": self.trainer.world_size}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("rnnlm", {})
        self._check_compatible(checkpoint)
        self.tokenizer_json = extra.get("tokenizer") or self.tokenizer_json
        self.chars_per_token = dict(extra.get("chars_per_token", {})) or self.chars_per_token
        self._resume = extra.get("resume")

    def _check_compatible(self, checkpoint: dict) -> None:
        """Refuse, before any weight is touched, a checkpoint that does not belong to this run's model and data."""
        saved_tokenizer = checkpoint.get("rnnlm", {}).get("tokenizer")
        if self.tokenizer_json is not None and saved_tokenizer is not None and saved_tokenizer != self.tokenizer_json:
            saved, ours = Tokenizer.from_str(saved_tokenizer), Tokenizer.from_str(self.tokenizer_json)
            raise CheckpointError(
                "The checkpoint was trained with a different tokenizer than this run's data "
                f"(checkpoint: {saved.get_vocab_size()} tokens, {type(saved.model).__name__}; this run: "
                f"{ours.get_vocab_size()} tokens, {type(ours.model).__name__}); its weights would read the wrong "
                "tokens. Resume with the data settings it was trained with (data.source, data.tokenizer, "
                "data.vocab_size, ...: see the run's config.yaml), or start a new run without --ckpt_path."
            )
        saved_hp = checkpoint.get("hyper_parameters", {})
        differ = [
            f"{name}: checkpoint {saved_hp[name]!r}, this run {self.hparams[name]!r}"
            for name in ARCHITECTURE
            if name in saved_hp and saved_hp[name] != self.hparams[name]
        ]
        if differ:
            raise CheckpointError(
                "The checkpoint holds a different model than this run builds (" + "; ".join(differ) + "). "
                "Resume with the model settings it was trained with (see the run's config.yaml), "
                "or start a new run without --ckpt_path."
            )

    def forward(self, idx: Tensor, state: State | None = None, direction: str = "forward") -> tuple[Tensor, State]:
        return self.model(idx, state, direction)

    # ----------------------------------------------------------------------------------------- steps
    def _direction_loss(self, key: str, direction: str, x: Tensor, y: Tensor) -> Tensor:
        state = self._state.get(key)
        if state is not None and state_batch_size(state) != x.size(0):
            state = None  # a different number of streams: nothing to carry
        with _rnn_kernels_for_cpu_autocast():
            top, state = self.model.recurrent(x, state, direction)
        self._state[key] = detach_state(state)
        hidden = self.model.head_input(top, direction)
        if self.training:
            self._activation_penalties(top, hidden)
        return self.model.head_loss(hidden, y, direction)

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
        loader = self.trainer.train_dataloader
        self._before_step = {
            "position": batch_idx,
            "state": {k: v for k, v in self._state.items() if k.split("/")[0] == "train"},
        }
        self._penalties = []
        losses = self._losses("train", batch)
        if isinstance(loader, ChunkLoader):
            # What a checkpoint written after this step resumes from; 0 once the epoch is done (the Trainer may
            # end it before the loader does, with limit_train_batches).
            loader.position = 0 if batch_idx + 1 >= self.trainer.num_training_batches else batch_idx + 1
        loss = sum(losses.values()) / len(losses)
        penalty = sum(self._penalties) / len(losses) if self._penalties else None
        if penalty is not None:
            loss = loss + penalty
        if self._writing_step():
            # Loggers write only every log_every_n_steps, and each self.log costs about a millisecond of Python in
            # Lightning, which is several percent of a small model's step: the metrics are logged on those steps
            # only (the progress bar shows them from there too). Device tensors: no host sync on a GPU.
            metrics = self._metrics("train", {k: v.detach() for k, v in losses.items()})
            if penalty is not None:
                metrics["train/activation_penalty"] = penalty.detach()
            self.log_dict(metrics, on_step=True, on_epoch=False)
            # The progress bar turns what it shows into Python numbers; a host copy keeps that from waiting for a
            # GPU mid-step. The learning rate is a host tensor too (a float would be copied to the device and back).
            self.log("loss", metrics["train/loss"].cpu(), on_step=True, on_epoch=False, prog_bar=True, logger=False)
            lr = self._unscaled_lrs[0] if self._unscaled_lrs else self.optimizers().param_groups[0]["lr"]
            self.log("lr", torch.tensor(float(lr)), on_step=True, on_epoch=False)
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
            # A host tensor, so that showing it in the progress bar needs no device sync.
            rate = torch.tensor(seen / (now - t0))
            self.log("train/tokens_per_s", rate, on_step=True, on_epoch=False, prog_bar=True)
            self._tps = (now, 0)
        else:
            self._tps = (t0, seen)

    def _eval_step(self, stage: str, batch: tuple[Tensor, ...]) -> None:
        for direction, loss in self._losses(stage, batch).items():
            # Token-weighted: the chunk's mean repeated once per target. (With nan_strategy="disable", torchmetrics
            # 1.x ignores the `weight` argument, so weighting through it would silently give a plain batch mean.)
            self._eval_loss[f"{stage}_{direction}"].update(loss.detach().expand(batch[1].numel()))

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

    def on_train_start(self) -> None:
        # Lightning does not call on_train_epoch_start when it resumes an epoch half way, so the stream's state
        # from a mid-epoch checkpoint is put back here.
        resume, self._resume = self._resume, None
        loader = self.trainer.train_dataloader
        if resume and isinstance(loader, ChunkLoader) and loader.position > 0:
            self._restore(resume)

    def on_train_epoch_start(self) -> None:
        self._reset_state("train")
        self._tps = None

    def _restore(self, resume: dict) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if resume.get("world_size", world) != world:
            raise CheckpointError(
                f"The checkpoint was written by {resume['world_size']} processes and this run has {world}: a "
                "mid-epoch checkpoint continues only with the same number of processes (or resume from a "
                "checkpoint written at the end of an epoch)."
            )
        for key, state in resume.get("carried", {}).items():
            self._state[key] = _map_state(lambda t: t[rank].to(self.device), state)
        rng = resume.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"][rank].clone())  # a row of a bigger tensor is not accepted as is
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][rank].clone(), self.device)

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
        ckpt = load_safely(path, map_location)
        if "rnnlm" not in ckpt or "hyper_parameters" not in ckpt:
            raise CheckpointError(f"{path!r} is not an rnnlm checkpoint (it lacks the model settings and tokenizer).")
        # LightningCLI adds private entries (``_instantiator``) that are not model settings.
        model = cls(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
        model.load_state_dict(ckpt["state_dict"])
        model.on_load_checkpoint(ckpt)
        model.datamodule_hparams = {
            k: v for k, v in ckpt.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")
        }
        return model.to(map_location).eval()
