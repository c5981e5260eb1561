"""The LightningModule: truncated BPTT with the hidden state carried from chunk to chunk.

Each batch is one ``[B, T]`` chunk whose row b continues row b of the previous batch (see ``streams.py``). The
state left by a chunk is detached and fed to the next one, so the model reads unbounded context while gradients
flow through T steps only. Optimisation stays automatic, so the Trainer's gradient clipping, accumulation,
mixed precision and LightningCLI's optimizer / lr_scheduler settings all keep working.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time

import lightning as L
import torch
from tokenizers import Tokenizer
from torch import Tensor
from torchmetrics import MeanMetric

from rnnlm import __version__
from rnnlm.model import DIRECTIONS, RNNLM, State, detach_state
from rnnlm.tokenization import Encoder

LN2 = math.log(2)


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
    """Trains :class:`~rnnlm.model.RNNLM` on contiguous chunks; arguments as in ``RNNLM``.

    ``vocab_size`` comes from the data module (LightningCLI links ``data.vocab_size`` to it).
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
        output: str = "softmax",
        adaptive_cutoffs: list[int] | None = None,
        adaptive_div_value: float = 4.0,
    ) -> None:
        super().__init__()
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
        if not self._writing_step():
            return
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
        if state is not None and (state[0] if isinstance(state, tuple) else state).size(1) != x.size(0):
            state = None  # a different number of streams: nothing to carry
        with _rnn_kernels_for_cpu_autocast():
            loss, state = self.model.loss(x, y, state, direction)
        self._state[key] = detach_state(state)
        return loss

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
        losses = self._losses("train", batch)
        loss = sum(losses.values()) / len(losses)
        metrics = self._metrics("train", {k: v.detach() for k, v in losses.items()})
        # Device tensors: a logger reads them only on the steps it writes (log_every_n_steps), so no per-step sync.
        self.log_dict(metrics, on_step=True, on_epoch=False)
        writing = self._writing_step()
        if writing or self.device.type == "cpu":
            # The progress bar turns what it shows into Python numbers after every step, which on a GPU would wait
            # for the step to finish: there it gets a host copy of the loss on the logging steps only.
            self.log("loss", metrics["train/loss"].cpu(), on_step=True, on_epoch=False, prog_bar=True, logger=False)
        if writing:
            # A host tensor: a Python float would be copied to the device and back.
            lr = torch.tensor(float(self.optimizers().param_groups[0]["lr"]))
            self.log("lr", lr, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
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
            # One entry per target token: the token-weighted mean (the last chunk of a pass is shorter).
            self._eval_loss[f"{stage}_{direction}"].update(loss.expand(batch[1].numel()))

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
