"""The LightningModule: truncated BPTT with the hidden state carried from chunk to chunk.

Each batch is one ``[B, T]`` chunk whose row b continues row b of the previous batch (see ``streams.py``). The
state left by a chunk is detached and fed to the next one, so the model reads unbounded context while gradients
flow through T steps only. Optimisation stays automatic, so the Trainer's gradient clipping, accumulation,
mixed precision and LightningCLI's optimizer / lr_scheduler settings all keep working.

A checkpoint holds everything a run needs to continue exactly where it stopped, mid-epoch included: besides
what Lightning saves (weights, optimizer, schedulers, loop counters, the chunk loader's position) it carries the
training streams' hidden states and the random-number generators' states of every process.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from tokenizers import Tokenizer
from torch import Tensor
from torchmetrics import MeanMetric

from rnnlm.errors import ConfigError
from rnnlm.files import CheckpointError
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import DIRECTIONS, RNNLM, Output, State, detach_state, map_state, state_batch_size
from rnnlm.sharing.checkpoints import config_of_checkpoint, is_classifier_checkpoint
from rnnlm.sharing.transfer import PretrainedStart
from rnnlm.text.streams import ChunkLoader
from rnnlm.training.callbacks import ChunkLengthLR, NonFiniteGuard, TokensPerSecond, writing_step
from rnnlm.training.checkpointing import write_record

LN2 = math.log(2)
NONFINITE_POLICIES = ("stop", "skip", "ignore")


def loss_metrics(loss, chars_per_token: float | None = None) -> dict:
    """A loss in nats/token with what is derived from it: perplexity, bits per token and, given the characters per
    token of the text, bits per character. ``loss`` is a tensor or a float, and so are the results."""
    exp = torch.exp if isinstance(loss, Tensor) else math.exp
    metrics = {"loss": loss, "ppl": exp(loss), "bits_per_token": loss / LN2}
    if chars_per_token is not None:
        metrics["bpc"] = loss / LN2 / chars_per_token
    return metrics


class CarriedState:
    """The detached hidden state each stage's streams carry from one chunk to the next, per direction.

    Keys are ``"<stage>"`` for the forward direction and ``"<stage>/backward"``; validation and test keep their own
    so that they never disturb the training streams.
    """

    def __init__(self) -> None:
        self.states: dict[str, State] = {}

    def get(self, key: str, streams: int) -> State | None:
        state = self.states.get(key)
        if state is not None and state_batch_size(state) != streams:
            return None  # a different number of streams: nothing to carry
        return state

    def put(self, key: str, state: State) -> None:
        self.states[key] = detach_state(state)

    def of_stage(self, stage: str) -> dict[str, State]:
        return {k: v for k, v in self.states.items() if k.split("/")[0] == stage}

    def reset(self, stage: str) -> None:
        for key in self.of_stage(stage):
            del self.states[key]


class LanguageModel(L.LightningModule):
    """Trains :class:`~rnnlm.network.lm.RNNLM` on contiguous chunks.

    Args:
        config: the model's settings (``--model.config.*``); ``vocab_size`` comes from the data module (the CLI
            links ``data.vocab_size`` to it).
        activation_regularization: AR (Merity et al. 2017): adds ``alpha * mean(h^2)`` of the decoder input (the
            top layer's output after output dropout) to the training loss.
        temporal_activation_regularization: TAR: adds ``beta * mean((h_t - h_{t-1})^2)`` of the top layer's output
            before dropout, so the state moves slowly.
        on_nonfinite: what a NaN or infinite training loss or gradient does: ``stop`` (default) writes a checkpoint
            of the state before that step and stops with an explanation; ``skip`` drops the step (no weight update,
            the carried state restarts from zeros) and goes on; ``ignore`` does not check, which saves one host
            synchronisation per step on a GPU (see :class:`~rnnlm.training.callbacks.NonFiniteGuard`).
        init_from: start from the weights of a pretrained model (a ``.ckpt``, a folder written by
            ``rnnlm.export``, or a Hub id ``OWNER/NAME``) instead of random ones: fine-tuning. The optimizer,
            schedule and step count start afresh. ``config`` must have its architecture (the CLI takes it from the
            pretrained model); the regularisers (dropouts, weight drop) may differ. The data must use the
            pretrained tokenizer (the CLI sets ``data.init_from``), unless ``init_vocab="match"``.
        init_vocab: ``same`` (the pretrained tokenizer, so the ids match) or ``match``: a word- or char-level
            model fine-tuned with the vocabulary of the new data, whose tokens that the pretrained vocabulary has
            get their pretrained embedding and decoder rows and the others the mean of the pretrained rows
            (ULMFiT's recipe).

    With variable-length BPTT (``data.variable_bptt``) each step's learning rate is scaled by ``chunk length /
    bptt``, as in AWD-LSTM (:class:`~rnnlm.training.callbacks.ChunkLengthLR`).
    """

    def __init__(
        self,
        config: RNNLMConfig,
        activation_regularization: float = 0.0,
        temporal_activation_regularization: float = 0.0,
        on_nonfinite: str = "stop",
        init_from: str | None = None,
        init_vocab: str = "same",
    ) -> None:
        super().__init__()
        for name, value in (("activation_regularization", activation_regularization),
                            ("temporal_activation_regularization", temporal_activation_regularization)):
            if value < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {value!r}.")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {on_nonfinite!r}.")
        config = config if isinstance(config, RNNLMConfig) else RNNLMConfig.from_dict(dict(config))
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = config.to_dict()  # plain types: checkpoints load with weights_only=True
        self.config = config
        self.model = RNNLM(config)
        self.carry = CarriedState()
        # nan_strategy="disable": the default NaN check reads a device value on every batch (a GPU sync); a NaN
        # loss still shows, as a NaN mean. With it, torchmetrics ignores the weight argument, hence _eval_step.
        self._eval_loss = torch.nn.ModuleDict(
            {f"{stage}_{d}": MeanMetric(nan_strategy="disable") for stage in ("val", "test") for d in DIRECTIONS}
        )
        # What the model knows of its data, set by use_data: saved in every checkpoint.
        self.tokenizer_json: str | None = None
        self.chars_per_token: dict[str, float] = {}
        self._data_facts: dict = {}
        self._resume: dict | None = None  # what on_load_checkpoint read, applied when training starts
        # Metrics of the last validation / test pass (plain floats, with the step): saved with the weights they
        # were measured on, for the model card of an export.
        self.measured: dict[str, dict] = {}
        # The resolved run configuration (set by the CLI), saved in checkpoints for the model card.
        self.run_config: dict | None = None
        # Fine-tuning: the pretrained weights are in self.model from here on (with init_vocab="match", once the
        # data's tokenizer is known).
        self.start = PretrainedStart(init_from, init_vocab, self.model) if init_from is not None else None

    # ----------------------------------------------------------------------------------------- data link
    def use_data(self, tokenizer: Tokenizer, chars_per_token: dict[str, float], facts: dict | None = None) -> None:
        """What the model needs from its data: the tokenizer (saved in checkpoints, for sampling), the characters
        per token of each stage (for bits per character) and facts for the experiment log."""
        if tokenizer.get_vocab_size(with_added_tokens=True) != self.config.vocab_size:
            raise ConfigError(
                f"The model was built for {self.config.vocab_size} tokens but the data's tokenizer has "
                f"{tokenizer.get_vocab_size(with_added_tokens=True)}; they must match (leave model.config.vocab_size "
                "to the data module)."
            )
        if self.start is not None:
            self.start.use_tokenizer(tokenizer)
        self.tokenizer_json = tokenizer.to_str()
        self.chars_per_token = dict(chars_per_token)
        self._data_facts = dict(facts or {})

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is None or not hasattr(data, "describe"):
            return  # plain loaders: no tokenizer, no bits per character
        description = data.describe()
        if description["bidirectional"] != self.config.bidirectional:
            raise ConfigError(
                f"model.config.bidirectional={self.config.bidirectional} but data.bidirectional="
                f"{description['bidirectional']}: a bidirectional model needs the data module's backward chunks "
                "(the CLI links the two)."
            )
        self.use_data(description["tokenizer"], description["chars_per_token"], description["facts"])

    def on_fit_start(self) -> None:
        if self.start is not None:
            self.start.check_complete()
        facts = {"parameters": sum(p.numel() for p in self.parameters()), "data": self._data_facts}
        for logger in self.loggers:
            logger.log_hyperparams(facts)

    def configure_callbacks(self) -> list[L.Callback]:
        # What training this module needs besides the steps: kept out of the module, each with one job.
        if self.trainer.state.fn != "fit":
            return []
        return [NonFiniteGuard(self.hparams.on_nonfinite), ChunkLengthLR(), TokensPerSecond()]

    def configure_optimizers(self):
        # Used when no optimizer is configured (plain Python use); configs set their own through LightningCLI.
        return torch.optim.AdamW(self.parameters(), lr=2e-3)

    # ----------------------------------------------------------------------------------------- steps
    def forward(self, idx: Tensor, targets: Tensor | None = None, state: State | None = None,
                direction: str = "forward") -> Output:
        return self.model(idx, targets, state, direction)

    def _run(self, stage: str, batch: tuple[Tensor, ...]) -> dict[str, Output]:
        """Each direction's pass over this chunk, carrying its state within ``stage``."""
        if self.config.bidirectional and len(batch) != 4:
            raise ConfigError(
                "A bidirectional model needs the backward chunks too: use LMDataModule(bidirectional=True) "
                "(the CLI sets it from model.config.bidirectional)."
            )
        outputs = {}
        for i, direction in enumerate(DIRECTIONS[: 2 if self.config.bidirectional else 1]):
            x, y = batch[2 * i], batch[2 * i + 1]
            key = stage if direction == "forward" else f"{stage}/backward"
            out = self.model(x, y, self.carry.get(key, x.size(0)), direction)
            self.carry.put(key, out.state)
            outputs[direction] = out
        return outputs

    def _penalty(self, outputs: dict[str, Output]) -> Tensor | None:
        """AR and TAR, averaged over the directions like the loss."""
        alpha, beta = self.hparams.activation_regularization, self.hparams.temporal_activation_regularization
        terms = []
        for out in outputs.values():
            if alpha > 0:
                terms.append(alpha * out.features.float().pow(2).mean())
            if beta > 0 and out.outputs.size(1) > 1:
                terms.append(beta * (out.outputs[:, 1:] - out.outputs[:, :-1]).float().pow(2).mean())
        return sum(terms) / len(outputs) if terms else None

    def _metrics(self, stage: str, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """loss (mean of the directions), ppl, bits per token and per character; per direction when there are two."""
        named = {f"{stage}/": sum(losses.values()) / len(losses)}
        if len(losses) > 1:
            named.update({f"{stage}/{direction}/": loss for direction, loss in losses.items()})
        return {
            prefix + name: value
            for prefix, loss in named.items()
            for name, value in loss_metrics(loss, self.chars_per_token.get(stage)).items()
        }

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        outputs = self._run("train", batch)
        loader = self.trainer.train_dataloader
        if isinstance(loader, ChunkLoader):
            # What a checkpoint written after this step resumes from; 0 once the epoch is done (the Trainer may
            # end it before the loader does, with limit_train_batches).
            loader.position = 0 if batch_idx + 1 >= self.trainer.num_training_batches else batch_idx + 1
        losses = {direction: out.loss for direction, out in outputs.items()}
        loss = sum(losses.values()) / len(losses)
        penalty = self._penalty(outputs)
        if penalty is not None:
            loss = loss + penalty
        if writing_step(self.trainer):
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
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr", torch.tensor(float(lr)), on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, stage: str, batch: tuple[Tensor, ...]) -> None:
        for direction, out in self._run(stage, batch).items():
            # Token-weighted: the chunk's mean repeated once per target. (With nan_strategy="disable", torchmetrics
            # 1.x ignores the `weight` argument, so weighting through it would silently give a plain batch mean.)
            self._eval_loss[f"{stage}_{direction}"].update(out.loss.detach().expand(batch[1].numel()))

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
            metrics = self._metrics(stage, losses)
            self.log_dict(metrics, prog_bar=(stage == "val"), sync_dist=False)
            if not self.trainer.sanity_checking:
                self.measured[stage] = {"step": self.trainer.global_step,
                                        **{k.split("/", 1)[1]: float(v) for k, v in metrics.items()}}

    # ----------------------------------------------------------------------------------------- epochs
    def on_train_start(self) -> None:
        # Lightning does not call on_train_epoch_start when it resumes an epoch half way, so the streams' state
        # from a mid-epoch checkpoint is put back here.
        resume, self._resume = self._resume, None
        loader = self.trainer.train_dataloader
        if resume and isinstance(loader, ChunkLoader) and loader.position > 0:
            self._restore(resume)
        elif resume and resume.get("world_size") == self.trainer.world_size:
            # At an epoch end the streams start afresh, but the dropout masks go on from where they were.
            self._restore_rng(resume)

    def on_train_epoch_start(self) -> None:
        self.carry.reset("train")

    def on_validation_epoch_start(self) -> None:
        self.carry.reset("val")

    def on_test_epoch_start(self) -> None:
        self.carry.reset("test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings, numbers and tensors only, so the checkpoint alone is enough to generate or evaluate and
        # loads with weights_only=True. Runs on every process (the gathers below are collective); rank 0 writes.
        entries = {"chars_per_token": dict(self.chars_per_token)}
        if self.trainer.state.fn == "fit":
            entries["resume"] = self._resume_state()
        write_record(self, checkpoint, **entries)

    def _resume_state(self) -> dict:
        """The training streams' carried states and the RNG states, one slice per process."""

        def gathered(t: Tensor) -> Tensor:
            # One row per process. A distributed strategy adds that dimension even for a single process (a one-task
            # SLURM job with strategy ddp); a single-device strategy returns the tensor as it is.
            all_ranks = self.all_gather(t.to(self.device))
            return (all_ranks if all_ranks.dim() > t.dim() else all_ranks.unsqueeze(0)).cpu()

        carried = {key: map_state(gathered, state) for key, state in self.carry.of_stage("train").items()}
        rng = {"cpu": gathered(torch.get_rng_state())}
        if self.device.type == "cuda":
            rng["cuda"] = gathered(torch.cuda.get_rng_state(self.device))
        return {"carried": carried, "rng": rng, "world_size": self.trainer.world_size}

    def _restore(self, resume: dict) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if resume.get("world_size", world) != world:
            raise CheckpointError(
                f"The checkpoint was written by {resume['world_size']} processes and this run has {world}: a "
                "mid-epoch checkpoint continues only with the same number of processes (or resume from a "
                "checkpoint written at the end of an epoch)."
            )
        for key, state in resume.get("carried", {}).items():
            self.carry.states[key] = map_state(lambda t: t[rank].to(self.device), state)
        self._restore_rng(resume)

    def _restore_rng(self, resume: dict) -> None:
        rank = self.trainer.global_rank
        rng = resume.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"][rank].clone())  # a row of a bigger tensor is not accepted as is
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][rank].clone(), self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("rnnlm", {})
        self._check_compatible(checkpoint)
        self.tokenizer_json = extra.get("tokenizer") or self.tokenizer_json
        self.chars_per_token = dict(extra.get("chars_per_token", {})) or self.chars_per_token
        self._resume = extra.get("resume")

    def _check_compatible(self, checkpoint: dict) -> None:
        """Refuse, before any weight is touched, a checkpoint that does not belong to this run's model and data."""
        if is_classifier_checkpoint(checkpoint):
            raise CheckpointError("The checkpoint is a text classifier's (written by rnnlm.classify), not a language "
                                  "model's: resume a classifier with python -m rnnlm.classify --ckpt_path, or resume "
                                  "this run from one of its own checkpoints.")
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
        saved = config_of_checkpoint(checkpoint).architecture()
        ours = self.config.architecture()
        differ = [f"{name}: checkpoint {saved[name]!r}, this run {ours[name]!r}" for name in ours
                  if saved.get(name) != ours[name]]
        if differ:
            raise CheckpointError(
                "The checkpoint holds a different model than this run builds (" + "; ".join(differ) + "). "
                "Resume with the model settings it was trained with (see the run's config.yaml), "
                "or start a new run without --ckpt_path."
            )
