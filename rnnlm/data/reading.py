"""The reading settings both data modules share, declared once: where the text comes from and its splits, the
tokenizer, the batch sizes and the cache.

:class:`~rnnlm.data.lm.LMDataModule` and :class:`~rnnlm.data.classifier.ClassificationDataModule` take them
through ``**reading`` (LightningCLI lists them under ``--data.*`` as their own) and re-declare only the four whose
default means something else to each: ``source``, ``val_fraction``, ``tokenizer`` and ``batch_size``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import lightning as L

from rnnlm.errors import check_positive_int
from rnnlm.text.sources import DataError, default_cache_dir
from rnnlm.text.tokenization import LEVELS, TokenizerError


class TextDataModule(L.LightningDataModule):
    """What a data module of rnnlm reads, and how.

    Args:
        source: the dataset: a Hub name, a local file or folder (splits found from file names: ``train``,
            ``validation``/``valid``/``dev``, ``test``), or a ``save_to_disk`` folder.
        config_name: the dataset's configuration on the Hub (``wikitext-2-raw-v1``).
        revision: the Hub revision (branch, tag or commit) to read, e.g. ``refs/convert/parquet``, the parquet copy
            the Hub keeps of a dataset whose main branch holds a loading script (which datasets >= 4 no longer runs).
        text_field: the column holding the text.
        train_split: name of the training split in the source.
        val_split: name of the validation split (``valid``/``val``/``dev`` are found too).
        test_split: name of the test split.
        val_fraction: share of the training data held out for validation when the source has no validation split.
        tokenizer: ``char``, ``byte``, ``word``, ``bpe``, ``unigram``, ``wordpiece`` (trained on the training split),
            or a ``tokenizer.json`` path or Hub tokenizer name.
        vocab_size: target vocabulary size of bpe/unigram/wordpiece; a cap for char/word (like max_vocab_size).
        min_frequency: drop char/word/bpe/wordpiece entries seen fewer times than this in training.
        max_vocab_size: cap for the char and word vocabularies (most frequent kept, the rest read as ``<unk>``).
        batch_size: rows of a training batch per process.
        eval_batch_size: rows of a validation / test batch per process.
        cache_dir: where tokenizers and token ids are cached (default ``$RNNLM_CACHE`` or ``~/.cache/rnnlm``).
        init_from: a pretrained model (a ``.ckpt``, a folder written by ``rnnlm.export`` or a Hub id) whose
            tokenizer reads the text, so that the ids are the ones its weights were trained on (fine-tuning; the CLI
            sets it from ``model.init_from``).
    """

    def __init__(
        self,
        *,
        source: str,
        config_name: str | None = None,
        revision: str | None = None,
        text_field: str = "text",
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        val_fraction: float,
        tokenizer: str | None,
        vocab_size: int | None = None,
        min_frequency: int = 1,
        max_vocab_size: int | None = None,
        batch_size: int,
        eval_batch_size: int | None = None,
        cache_dir: str | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("min_frequency", min_frequency),
                            ("eval_batch_size", eval_batch_size), ("vocab_size", vocab_size),
                            ("max_vocab_size", max_vocab_size)):
            if value is not None:
                check_positive_int(f"data.{name}", value, DataError)
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}.")
        if tokenizer is not None and tokenizer not in LEVELS and not is_tokenizer_path(tokenizer):
            close = difflib.get_close_matches(tokenizer, LEVELS, n=1, cutoff=0.75)
            if close:
                raise TokenizerError(
                    f"Unknown tokenizer {tokenizer!r}: did you mean {close[0]!r}? Choose one of {', '.join(LEVELS)}, "
                    "or give a tokenizer.json path or Hub tokenizer name."
                )
        # Saved as target_vocab_size: Lightning merges module and data hparams, and the model's vocab_size is
        # the real size, which may differ from the requested one.
        self.save_hyperparameters(ignore=["vocab_size"])
        self.hparams["target_vocab_size"] = vocab_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def is_tokenizer_path(spec: str) -> bool:
    """Whether a tokenizer setting names a file or a Hub tokenizer rather than a level."""
    return "/" in spec or spec.endswith(".json") or os.path.exists(spec)
