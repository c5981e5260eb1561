"""Train a language model: ``python -m rnnlm.fit --config configs/quickstart.yaml [--section.key value ...]``.

A LightningCLI without subcommands: the config file and dotted overrides set the data module (``--data.*``),
the model (``--model.*``), the Trainer (``--trainer.*``), the optimizer and learning-rate scheduler
(``--optimizer``, ``--lr_scheduler``), checkpointing (``--checkpoint.*``, and ``--resumable.*`` for the
``last.ckpt`` that SIGTERM, Ctrl-C and a periodic timer write) and the closing text sample (``--sample.*``).
``--print_config`` shows the resolved configuration. ``--ckpt_path last`` continues the newest checkpoint of the run
in ``trainer.default_root_dir`` exactly, in a new process too (a requeued or resubmitted job), or starts the run
when it has none yet. ``--model.init_from PATH_OR_HUB_ID`` fine-tunes a pretrained model: its architecture and
tokenizer are used, with a fresh optimizer, schedule and step count.
"""

from __future__ import annotations

from rnnlm.data.lm import LMDataModule
from rnnlm.errors import run_main
from rnnlm.training.cli import LanguageModelCLI, train
from rnnlm.training.lm import LanguageModel


def main(args: list[str] | None = None) -> LanguageModelCLI:
    """Train a language model with ``args`` (default: the command line); returns the CLI object."""
    return train(LanguageModelCLI, LanguageModel, LMDataModule, "rnnlm.fit", __doc__, args)


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
