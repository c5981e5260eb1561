"""The classification LightningModule: a :class:`~rnnlm.network.classifier.Classifier` trained with ULMFiT's recipe.

The encoder starts from a pretrained language model (``init_from``: anything :func:`rnnlm.load` reads) or from
scratch (``config``). Training follows ULMFiT (see ``rnnlm/training/ulmfit.py``): the optimizer gets one parameter group
per layer group with discriminative learning rates, gradual unfreezing trains the head alone in the first epoch and
one more group each epoch, and :class:`~rnnlm.training.ulmfit.SlantedTriangularLR` is the schedule the configs use.

Metrics per split: loss (cross-entropy, nats), accuracy and macro-F1; validation and test also log a confusion
matrix to W&B, and validation the training time so far (``val/train_seconds``, over resumes), for accuracy against
time. A checkpoint holds the labels (class i is ``labels[i]``), the tokenizer and the tokens read per text,
so :func:`rnnlm.sharing.classifier.load` alone can predict.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch import Tensor, nn
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR, ReduceLROnPlateau
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from rnnlm.data.classifier import BucketLoader, batch_tokens
from rnnlm.errors import ConfigError, check_positive_int
from rnnlm.files import CheckpointError
from rnnlm.network.classifier import HEAD_DROPOUT, HEAD_HIDDEN, POOL_DROPOUT, Classifier, scaled_dropouts
from rnnlm.network.config import RNNLMConfig
from rnnlm.sharing.checkpoints import CLASSIFIER as TASK
from rnnlm.sharing.lm import load
from rnnlm.text.batching import Batch
from rnnlm.text.tokenization import TokenizerError
from rnnlm.training.callbacks import TokensPerSecond, writing_step
from rnnlm.training.checkpointing import write_record
from rnnlm.training.ulmfit import (
    SlantedTriangularLR,
    discriminative_param_groups,
    freeze_below,
    scale_learning_rates,
    trainable_groups,
)

STAGES = ("val", "test")
_STEP_SCHEDULERS = (SlantedTriangularLR, OneCycleLR, CyclicLR)  # designed to move every optimizer step


def load_pretrained_encoder(init_from: str, classifier: Classifier, weights: dict[str, Tensor] | None = None) -> None:
    """Copy the embedding and recurrent weights of a pretrained LM (anything :func:`rnnlm.load` reads; ``weights``:
    its state dict, when already loaded) into ``classifier.encoder``."""

    weights = load(init_from).model.state_dict() if weights is None else weights
    own = classifier.encoder.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise CheckpointError(f"The pretrained model {init_from!r} lacks the encoder weights {missing[:5]}.")
    classifier.encoder.load_state_dict({name: weights[name] for name in own})


class TextClassifier(L.LightningModule):
    """Trains a :class:`~rnnlm.network.classifier.Classifier` (ULMFiT).

    Args:
        config: the encoder's settings when training from scratch (``--model.config.*``; the vocabulary size comes
            from the data). With ``init_from`` they come from the pretrained model: leave ``config`` unset.
        labels: the classes, class i = ``labels[i]`` (the CLI takes them from the data module).
        init_from: a pretrained language model to start from: whatever :func:`rnnlm.load` reads (an rnnlm
            checkpoint; also exported folders and Hub ids where that loader reads them).
        dropout_scale: multiplies every dropout of the encoder (fastai's ``drop_mult``; ULMFiT's classifiers use
            0.5 of the LM's dropouts on small data).
        head_hidden, pool_dropout, head_dropout: the head (:class:`~rnnlm.network.classifier.Classifier`; ULMFiT's
            by default).
        gradual_unfreezing: train the head alone in the first epoch, then unfreeze layer groups from the top.
        groups_per_epoch: layer groups unfrozen per epoch after the first.
        lr_factor: discriminative learning rates: each layer group below the head learns ``lr_factor`` times slower
            than the one above it (ULMFiT: 2.6; 1 gives every group the same rate).
        optimizer: the optimizer (``class_path`` / ``init_args`` in YAML; default AdamW); it receives one parameter
            group per layer group.
        lr_scheduler: the learning-rate schedule (e.g. ``rnnlm.training.ulmfit.SlantedTriangularLR``); stepped every
            optimizer step for SlantedTriangularLR, OneCycleLR and CyclicLR, every epoch otherwise.
        label_smoothing: the training loss's label smoothing (0: none); validation and test report the plain
            cross-entropy, so that runs with and without it compare.
        pretrained_weights: with ``init_from``, start from its weights (default); ``false`` takes only its
            architecture and tokenizer and starts the encoder from random weights: the control that tells what the
            LM's weights bring from what the schedule brings.
    """

    def __init__(
        self,
        config: RNNLMConfig,
        labels: list[int | str],
        init_from: str | None = None,
        dropout_scale: float = 1.0,
        head_hidden: int = HEAD_HIDDEN,
        pool_dropout: float = POOL_DROPOUT,
        head_dropout: float = HEAD_DROPOUT,
        gradual_unfreezing: bool = True,
        groups_per_epoch: int = 1,
        lr_factor: float = 2.6,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        pretrained_weights: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("model.groups_per_epoch", groups_per_epoch)
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0 <= label_smoothing < 1:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        if not pretrained_weights and init_from is None:
            raise ConfigError("model.pretrained_weights: false needs model.init_from (whose architecture and tokenizer "
                              "it takes); without init_from the encoder starts from random weights anyway.")
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, (int, float)) or lr_factor < 1:
            raise ConfigError(f"model.lr_factor must be >= 1 (1 turns discriminative rates off), got {lr_factor!r}.")
        config = config if isinstance(config, RNNLMConfig) else RNNLMConfig.from_dict(dict(config))
        labels = list(labels)
        if init_from is not None:

            set_here = [k for k, v in config.to_dict().items()
                        if v != RNNLMConfig(vocab_size=config.vocab_size).to_dict()[k]]
            if set_here:
                raise ConfigError(
                    f"model.config sets {', '.join(set_here)}, but with model.init_from the encoder is the pretrained "
                    "model's: remove those settings (model.dropout_scale scales its dropouts), or drop init_from to "
                    "train from scratch."
                )
            pretrained = load(init_from)
            self.pretrained_tokenizer: str | None = pretrained.tokenizer.to_str()
            config = pretrained.config
        else:
            self.pretrained_tokenizer = None
        config = scaled_dropouts(config, dropout_scale)
        self.model = Classifier(config, len(labels), head_hidden, pool_dropout, head_dropout)
        if init_from is not None and pretrained_weights:
            load_pretrained_encoder(init_from, self.model, pretrained.model.state_dict())
        self.save_hyperparameters(ignore=["config", "optimizer", "lr_scheduler"])
        self.hparams["config"] = config.to_dict()  # the encoder as built: plain types, weights_only loading
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.labels = labels
        num_classes = len(labels)
        self._metrics = nn.ModuleDict({
            stage: MetricCollection({
                "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes, average="macro"),
                "confusion": MulticlassConfusionMatrix(num_classes),
            }) for stage in STAGES
        })  # fmt: skip
        self._losses = nn.ModuleDict({stage: MeanMetric(nan_strategy="disable") for stage in STAGES})
        self.tokenizer_json: str | None = self.pretrained_tokenizer
        self.max_length: int | None = None
        self._data_facts: dict = {}
        # The latest metrics of each evaluation stage and the step they were measured at, for an export's card.
        self.measured: dict[str, dict] = {}
        self.run_config: dict | None = None  # the CLI's resolved settings, for the model card of an export
        # Wall-clock seconds of training (validation included) before this process's, from a resumed checkpoint.
        self._seconds_before = 0.0
        self._started: float | None = None

    # ----------------------------------------------------------------------------------------- data link
    def use_data(self, tokenizer_json: str, classes: list, max_length: int, facts: dict | None = None) -> None:
        """What the classifier needs from its data: the tokenizer (checked against the pretrained model's), the
        classes (checked against ``labels``) and the tokens read per text."""
        if self.pretrained_tokenizer is not None and tokenizer_json != self.pretrained_tokenizer:
            raise TokenizerError(
                f"The data is tokenized differently from the pretrained model {self.hparams.init_from!r}: its weights "
                "would read the wrong tokens. Give the data module the same init_from (the CLI links them) and leave "
                "data.tokenizer unset."
            )
        if list(classes) != self.labels:
            raise ConfigError(f"The data's classes {list(classes)} differ from the model's labels {self.labels}.")
        vocab = self.model.config.vocab_size
        size = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
        if size > vocab:
            raise TokenizerError(f"The data's tokenizer has {size} tokens but the encoder reads only {vocab}.")
        self.tokenizer_json, self.max_length, self._data_facts = tokenizer_json, max_length, dict(facts or {})

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is None or not hasattr(data, "describe"):
            return
        description = data.describe()
        self.use_data(description["tokenizer"].to_str(), description["classes"], description["max_length"],
                      description["facts"])

    def train_seconds(self) -> float:
        """Wall-clock seconds spent in training so far (validation included), over resumes."""
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._seconds_before + running

    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def on_fit_start(self) -> None:
        strategy = self.trainer.strategy
        # DDP expects a gradient for every parameter that required one when it wrapped the model; frozen layer
        # groups have none. (_ddp_kwargs: the keywords the strategy passes to DistributedDataParallel.)
        if (self.hparams.gradual_unfreezing and isinstance(strategy, DDPStrategy)
                and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters")):
            raise ConfigError(
                "Gradual unfreezing leaves the frozen layer groups without gradients, which DDP refuses unless told "
                "to look for them: use --trainer.strategy ddp_find_unused_parameters_true (or set "
                "model.gradual_unfreezing false)."
            )
        facts = {"parameters": sum(p.numel() for p in self.parameters()), "data": self._data_facts}
        for logger in self.loggers:
            logger.log_hyperparams(facts)

    def configure_callbacks(self) -> list[L.Callback]:
        if self.trainer.state.fn != "fit":
            return []
        return [TokensPerSecond(count=batch_tokens)]

    def configure_optimizers(self):
        groups = discriminative_param_groups(self.model.layer_groups(), self.hparams.lr_factor)
        optimizer = self.optimizer_factory(groups)
        scale_learning_rates(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, SlantedTriangularLR) and scheduler.total_steps is None:
            total = self.trainer.estimated_stepping_batches
            if total == float("inf"):
                raise ConfigError("SlantedTriangularLR needs a run of known length: set trainer.max_epochs or "
                                  "trainer.max_steps.")
            scheduler.total_steps = int(total)
        config = {"scheduler": scheduler, "interval": "step" if isinstance(scheduler, _STEP_SCHEDULERS) else "epoch"}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = getattr(scheduler, "monitor", None) or "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ----------------------------------------------------------------------------------------- steps
    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        return self.model(ids, lengths)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loader = self.trainer.train_dataloader
        if isinstance(loader, BucketLoader):
            # What a checkpoint written after this step resumes from (the Trainer fetches a batch ahead).
            loader.position = 0 if batch_idx + 1 >= self.trainer.num_training_batches else batch_idx + 1
        logits = self(batch.ids, batch.lengths)
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=self.hparams.label_smoothing)
        if writing_step(self.trainer):
            accuracy = (logits.detach().argmax(-1) == batch.labels).float().mean()
            self.log_dict({"train/loss": loss.detach(), "train/accuracy": accuracy}, on_step=True, on_epoch=False)
            self.log("loss", loss.detach().cpu(), on_step=True, on_epoch=False, prog_bar=True, logger=False)
            lr = self.optimizers().param_groups[-1]["lr"]  # the head's: the others are fixed fractions of it
            self.log("lr", torch.tensor(float(lr)), on_step=True, on_epoch=False)
            self.log("train/seconds", torch.tensor(self.train_seconds()), on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, stage: str, batch: Batch) -> None:
        logits = self(batch.ids, batch.lengths)
        loss = F.cross_entropy(logits, batch.labels)
        # Text-weighted: the batch mean once per text (torchmetrics ignores `weight` with nan_strategy="disable").
        self._losses[stage].update(loss.detach().expand(len(batch.labels)))
        self._metrics[stage].update(logits.detach(), batch.labels)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_eval(self, stage: str) -> None:
        if not self._losses[stage].update_count:
            return
        loss = self._losses[stage].compute()
        metrics = self._metrics[stage].compute()
        self._losses[stage].reset()
        self._metrics[stage].reset()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/accuracy": metrics["accuracy"],
                       f"{stage}/f1_macro": metrics["f1_macro"]}, prog_bar=(stage == "val"))
        if not self.trainer.sanity_checking:
            self.measured[stage] = {"step": self.global_step, "loss": loss.item(),
                                    "accuracy": metrics["accuracy"].item(), "f1_macro": metrics["f1_macro"].item()}
        if stage == "val" and self.trainer.state.fn == "fit":  # accuracy against training time
            self.log("val/train_seconds", torch.tensor(self.train_seconds()))
        if not self.trainer.sanity_checking:
            self._log_confusion(stage, metrics["confusion"])

    def _log_confusion(self, stage: str, counts: Tensor) -> None:
        """The confusion matrix (rows: true class, columns: predicted) as W&B's confusion-matrix chart."""
        if not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            import wandb  # deferred: heavy, needed only with a W&B logger

            names = [str(label) for label in self.labels]
            rows = [[names[i], names[j], int(counts[i, j])] for i in range(len(names)) for j in range(len(names))]
            chart = wandb.plot.plot_table(
                "wandb/confusion_matrix/v1",
                wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows),
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": f"{stage} confusion matrix"},
            )
            logger.experiment.log({f"{stage}/confusion_matrix": chart, "trainer/global_step": self.global_step})

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ----------------------------------------------------------------------------------------- ULMFiT
    def on_train_epoch_start(self) -> None:
        groups = self.model.layer_groups()
        per_epoch = self.hparams.groups_per_epoch if self.hparams.gradual_unfreezing else None
        trainable = trainable_groups(self.current_epoch, len(groups), per_epoch)
        freeze_below(groups, trainable)
        if self.hparams.gradual_unfreezing:
            names = [name for name, _ in groups[len(groups) - trainable :]]
            rank_zero_info(f"rnnlm: epoch {self.current_epoch}: training {', '.join(names)}")

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        write_record(self, checkpoint, task=TASK, max_length=self.max_length, train_seconds=self.train_seconds())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("rnnlm", {})
        if extra.get("task") != TASK:
            raise CheckpointError("The checkpoint is not a classifier's (rnnlm.classify writes those): resume a "
                                  "classifier run from its own checkpoints, or start one with model.init_from.")
        saved = list(checkpoint.get("hyper_parameters", {}).get("labels", []))
        if saved != self.labels:
            raise CheckpointError(f"The checkpoint's classifier has the labels {saved}, this run {self.labels}: "
                                  "resume with the data it was trained on.")
        if self.tokenizer_json is not None and extra.get("tokenizer") not in (None, self.tokenizer_json):
            raise CheckpointError("The checkpoint was trained with a different tokenizer than this run's data.")
        self.tokenizer_json = extra.get("tokenizer") or self.tokenizer_json
        self.max_length = extra.get("max_length") or self.max_length
        self._seconds_before = float(extra.get("train_seconds", 0.0))
