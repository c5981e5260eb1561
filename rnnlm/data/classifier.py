"""The classification LightningDataModule: labelled texts -> token ids -> batches of texts of similar length.

Any ``datasets`` source with a text field and a label field works: a Hub dataset, a local CSV / TSV / JSON lines /
parquet file or a folder of them (splits found from file names), or a ``save_to_disk`` folder. The text is read by
the pretrained model's tokenizer (``init_from``), or by one trained here for a classifier trained from scratch.

Checks made before any training, each a :class:`~rnnlm.text.sources.DataError` that says what to change: a missing
text or label field (the columns are listed), a single class, validation or test labels that training never shows, a
split left empty. Rows with an empty text or no label are skipped, and counted in the summary and the run's facts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer

from rnnlm.data.reading import TextDataModule
from rnnlm.errors import ConfigError, check_positive_int
from rnnlm.sharing.lm import load
from rnnlm.text.batching import Batch, batches_by_length, encode_texts, make_batch
from rnnlm.text.sources import DataError, load_raw
from rnnlm.text.tokenization import (
    LEVELS,
    Encoder,
    TokenizerError,
    load_pretrained,
    tokenizers_parallelism,
    train_tokenizer,
)

SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev")}


# ------------------------------------------------------------------------------------------------ labels
def label_value(value: Any) -> int | str | bool | None:
    """A label as a plain JSON-able value: integers (also 1.0 read from a CSV column with gaps), strings or booleans;
    None for a missing one. Anything else is refused."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return int(value)
    if isinstance(value, str):
        return value if value.strip() else None
    raise DataError(
        f"Labels must be classes (integers or strings), but found {value!r} ({type(value).__name__}). For a "
        "regression target, this classifier is the wrong tool; otherwise map the values to classes first."
    )


def sorted_labels(values: set) -> list:
    """Classes in a stable order: numbers ascending, then strings."""
    return sorted(values, key=lambda v: (isinstance(v, str), v))


# ------------------------------------------------------------------------------------------------ batches
class BucketLoader:
    """Training batches of texts of similar length, in a new random order every epoch.

    Each epoch the texts are shuffled, cut into pools of ``batch_size * bucket_size`` texts, each pool sorted by
    length and cut into batches, and the batches shuffled (the "sortish" sampling of fastai and torchtext's
    ``BucketIterator``): padding stays small, and a batch still mixes texts from all over the split. Every process
    of a DDP run draws the same batches and takes every ``world_size``-th one; batches that would leave the processes
    uneven are dropped. ``position`` and :meth:`state_dict` let a run resume mid-epoch exactly.
    """

    def __init__(self, tokens: Sequence[np.ndarray], labels: Sequence[int], separator: int, batch_size: int,
                 seed: int = 0, bucket_size: int = 50, world_size: int = 1, rank: int = 0, epoch: int = 0,
                 pin_memory: bool = False, epoch_of: Callable[[], int] | None = None) -> None:
        self.tokens, self.labels, self.separator = tokens, labels, separator
        self.batch_size, self.bucket_size = batch_size, bucket_size
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.pin_memory = pin_memory
        self.epoch_of = epoch_of  # where the current epoch is read at each iter() (the Trainer's)
        self.lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        self.position = 0  # batches of this epoch already trained on (set by the module after each step)
        self._start = 0
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.tokens))
        pool = self.batch_size * self.bucket_size
        batches: list[np.ndarray] = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # BatchNorm cannot train on one text: a batch of one joins the batch before it.
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2] = np.concatenate([batches[-2], batches.pop()])
        batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.world_size
        self._batches = batches[self.rank : usable : self.world_size]

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def padding_fraction(self) -> float:
        """The share of the tokens in this epoch's batches that are padding."""
        real = padded = 0
        for rows in self._batches:
            lengths = self.lengths[rows] + 1
            real += int(lengths.sum())
            padded += int(lengths.max()) * len(rows)
        return 1 - real / max(padded, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "texts": len(self.tokens),
                "batch_size": self.batch_size, "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = int(state.get("position", 0))
        self.set_epoch(int(state.get("epoch", self.epoch)))
        if position <= 0 or position >= len(self):
            self._start = self.position = 0
            return
        layout = {"texts": len(self.tokens), "batch_size": self.batch_size, "world_size": self.world_size,
                  "seed": self.seed}
        saved = {k: state.get(k) for k in layout}
        if saved != layout:
            raise ConfigError(
                f"Cannot resume mid-epoch: the checkpoint was written at batch {position} of batches made from "
                f"{saved}, but this run makes them from {layout}. Resume with the same data, data.batch_size, seed "
                "and number of processes, or from a checkpoint written at the end of an epoch."
            )
        self._start = self.position = position

    def __iter__(self) -> Iterator[Batch]:
        if self.epoch_of is not None and self.epoch_of() != self.epoch:
            self.set_epoch(self.epoch_of())
        start, self._start = self._start, 0
        self.position = start
        for rows in self._batches[start:]:
            batch = make_batch([self.tokens[i] for i in rows], self.separator, [self.labels[i] for i in rows], rows)
            yield Batch(*(t.pin_memory() for t in batch)) if self.pin_memory else batch


class SortedLoader:
    """Evaluation batches: texts sorted by length, longest first (the least padding); under DDP each process takes
    every ``world_size``-th text."""

    def __init__(self, tokens: Sequence[np.ndarray], labels: Sequence[int] | None, separator: int, batch_size: int,
                 world_size: int = 1, rank: int = 0) -> None:
        self._batches = list(batches_by_length(tokens, batch_size, separator, labels, world_size, rank))

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._batches)


# ------------------------------------------------------------------------------------------------ the module
class ClassificationDataModule(TextDataModule):
    """Labelled texts from a ``datasets`` source, tokenized once, served in batches of texts of similar length.

    The reading settings (``config_name``, ``revision``, the splits, ``vocab_size``, ``init_from``, ...) are those
    of :class:`~rnnlm.data.reading.TextDataModule`; these are the classifier's own.

    Args:
        source: a Hub dataset name (``e9t/nsmc``), a local file or folder (csv, tsv, json/jsonl, parquet; splits
            found from file names: ``train``, ``validation``/``valid``/``dev``, ``test``), or a ``save_to_disk``
            folder.
        label_field: the column holding the label (integers or strings, any number of classes).
        delimiter: the field separator of CSV files; default: a tab for ``.tsv`` files, a comma otherwise.
        val_fraction: share of the training rows held out at random for validation when the source has no
            validation split (0: train without validation).
        split_seed: seed of that draw.
        label_order: the classes in the order of the model's outputs; default: a ``ClassLabel`` column's names,
            else the values found in training, sorted.
        tokenizer: for a classifier trained from scratch: a level (``char``, ``byte``, ``word``, ``bpe``, ...) trained
            on the training texts, or a ``tokenizer.json`` path / Hub name. With ``init_from`` leave it unset: the
            pretrained model's tokenizer is used, and another one is refused.
        max_length: tokens read per text; longer texts are cut to their first ``max_length`` tokens (counted).
        batch_size: texts per training batch (per process).
        bucket_size: training batches drawn together and sorted by length; larger means less padding and less
            randomness in what a batch holds.
        seed: seed of the training batch order (default: the run's ``seed_everything``).
    """

    def __init__(
        self,
        source: str,
        label_field: str = "label",
        delimiter: str | None = None,
        # Drawn at random from the training rows, which a review corpus has plenty of.
        val_fraction: float = 0.1,
        split_seed: int = 0,
        label_order: list[int | str] | None = None,
        # Unset: the pretrained model's (init_from); a classifier from scratch names a level.
        tokenizer: str | None = None,
        max_length: int = 512,
        # Texts, not streams: a batch is independent of the one before.
        batch_size: int = 64,
        bucket_size: int = 50,
        seed: int | None = None,
        **reading,
    ) -> None:
        for name, value in (("max_length", max_length), ("bucket_size", bucket_size)):
            check_positive_int(f"data.{name}", value, DataError)
        if label_order is not None and len(set(label_order)) != len(label_order):
            raise DataError(f"data.label_order lists a class twice: {label_order!r}.")
        super().__init__(source=source, val_fraction=val_fraction, tokenizer=tokenizer, batch_size=batch_size,
                         **reading)
        self._tokenizer: Tokenizer | None = None
        self._encoder: Encoder | None = None
        self._classes: list | None = None
        self._tokens: dict[str, list[np.ndarray]] = {}
        self._targets: dict[str, list[int]] = {}
        self._stats: dict[str, dict] = {}
        self._summary_logged = False

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Read the text with ``tokenizer`` (e.g. a trained classifier's own) instead of making one."""
        if self._classes is not None:
            raise RuntimeError("use_tokenizer must be called before the data is read.")
        self._tokenizer = tokenizer

    # ----------------------------------------------------------------------------------------- reading
    @property
    def classes(self) -> list:
        """The labels in the order of the model's outputs (class i is ``classes[i]``)."""
        self._prepare()
        return list(self._classes)  # type: ignore[arg-type]

    @property
    def tokenizer(self) -> Tokenizer:
        self._prepare()
        return self._tokenizer  # type: ignore[return-value]

    @property
    def encoder(self) -> Encoder:
        self._prepare()
        return self._encoder  # type: ignore[return-value]

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def splits(self) -> list[str]:
        """The splits there are (train, and validation and test where the source has or carves them)."""
        self._prepare()
        return list(self._tokens)

    @property
    def tokens(self) -> dict[str, list[np.ndarray]]:
        """Each split's texts as token ids (no separator, cut to ``max_length``)."""
        self._prepare()
        return self._tokens

    @property
    def targets(self) -> dict[str, list[int]]:
        """Each split's class indices (into :attr:`classes`)."""
        self._prepare()
        return self._targets

    @property
    def stats(self) -> dict[str, dict]:
        """Per split: texts kept, texts skipped (empty, unlabelled), tokens, texts cut, texts per class."""
        self._prepare()
        return self._stats

    def _load_options(self) -> dict:
        hp = self.hparams
        return {} if hp.delimiter is None else {"delimiter": hp.delimiter}

    def _raw_splits(self) -> dict:
        import datasets  # deferred: ~1 s to import, and only reading a source needs it

        hp = self.hparams
        raw, _ = load_raw(hp.source, hp.config_name, "document", self.cache_dir, options=self._load_options(),
                          revision=hp.revision)
        if isinstance(raw, datasets.Dataset):
            raw = datasets.DatasetDict({"train": raw})
        available = dict(raw)
        wanted = {"train": hp.train_split, "validation": hp.val_split, "test": hp.test_split}
        found = {}
        for split, name in wanted.items():
            for candidate in (name, *SPLIT_ALIASES.get(split, ())):
                if candidate in available:
                    found[split] = available[candidate]
                    break
        if "train" not in found:
            raise DataError(f"The source {hp.source!r} has no split {hp.train_split!r}; its splits are "
                            f"{sorted(available)}. Set data.train_split to one of them.")
        for split, ds in found.items():
            missing = [f for f in (hp.text_field, hp.label_field) if f not in ds.column_names]
            if missing:
                fields = " and ".join(f"{f!r}" for f in missing)
                raise DataError(
                    f"The {split} split of {hp.source!r} has no field {fields}; its columns are {ds.column_names}. "
                    "Set data.text_field and data.label_field to the columns holding the text and the label."
                )
        if "validation" not in found and hp.val_fraction > 0:
            held = found["train"].train_test_split(test_size=hp.val_fraction, seed=hp.split_seed, shuffle=True)
            found["train"], found["validation"] = held["train"], held["test"]
        return found

    def _prepare(self) -> None:
        """Read the source, fix the classes and the tokenizer, and tokenize every split (once)."""
        if self._classes is not None:
            return
        import datasets  # deferred: ~1 s to import, and only reading a source needs it

        hp = self.hparams
        raw = self._raw_splits()
        feature = raw["train"].features.get(hp.label_field)
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        rows: dict[str, tuple[list[str], list]] = {}
        for split, ds in raw.items():
            texts, labels, skipped = [], [], {"empty_text": 0, "no_label": 0}
            columns = ds.select_columns([hp.text_field, hp.label_field])
            for batch in columns.iter(batch_size=10_000):
                for text, label in zip(batch[hp.text_field], batch[hp.label_field], strict=True):
                    label = label_value(label)
                    if names is not None and isinstance(label, int):
                        # datasets' convention: -1 in a ClassLabel column is "no label" (e.g. GLUE's test splits)
                        label = names[label] if 0 <= label < len(names) else None
                    if text is None or not str(text).strip():
                        skipped["empty_text"] += 1
                    elif label is None:
                        skipped["no_label"] += 1
                    else:
                        texts.append(str(text))
                        labels.append(label)
            if not texts and split != "train":
                rank_zero_info(f"rnnlm data: the {split} split of {hp.source} has no labelled text "
                               f"({skipped['empty_text']} empty, {skipped['no_label']} unlabelled): left out")
                continue
            if not texts and skipped["empty_text"] and not skipped["no_label"]:
                raise DataError(f"Every text of the {split} split of {hp.source!r} is empty "
                                f"({skipped['empty_text']:,} rows): there is nothing to classify in it. Check that "
                                f"data.text_field ({hp.text_field!r}) is the column that holds the texts.")
            if not texts:
                raise DataError(
                    f"The {split} split of {hp.source!r} holds no usable row: {skipped['empty_text']:,} empty texts "
                    f"and {skipped['no_label']:,} rows without a label. Check data.text_field and data.label_field."
                )
            rows[split] = (texts, labels)
            self._stats[split] = {"rows": len(texts), "skipped_empty_text": skipped["empty_text"],
                                 "skipped_no_label": skipped["no_label"]}
        self._classes = self._fix_classes(rows, names)
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer(rows["train"][0])
        self._encoder = Encoder(self._tokenizer)
        index = {label: i for i, label in enumerate(self._classes)}
        for split, (texts, labels) in rows.items():
            tokens, cut = encode_texts(self._encoder, texts, hp.max_length)
            self._tokens[split] = tokens
            self._targets[split] = [index[label] for label in labels]
            counts = np.bincount(self._targets[split], minlength=len(self._classes))
            self._stats[split].update(
                tokens=int(sum(len(t) for t in tokens)), truncated=int(cut),
                class_counts={str(label): int(n) for label, n in zip(self._classes, counts, strict=True)},
            )

    def _fix_classes(self, rows: dict[str, tuple[list[str], list]], names: list | None) -> list:
        hp = self.hparams
        seen = {split: set(labels) for split, (_, labels) in rows.items()}
        if hp.label_order is not None:
            classes = [label_value(v) for v in hp.label_order]
            for split, values in seen.items():
                unknown = sorted_labels(values - set(classes))
                if unknown:
                    raise DataError(
                        f"The {split} split of {hp.source!r} has labels {unknown} that are not among the classes "
                        f"{classes} (data.label_order, or the classes of the model being evaluated): they could never "
                        "be predicted. Fix the labels, or choose data that uses these classes."
                    )
        elif names is not None:
            classes = names
        else:
            classes = sorted_labels(seen["train"])
        if len(seen["train"]) < 2:
            only = next(iter(seen["train"]))
            raise DataError(
                f"The training split of {hp.source!r} has a single class: every one of its {len(rows['train'][0]):,} "
                f"rows is labelled {only!r} in {hp.label_field!r}. A classifier needs at least two classes; check "
                "data.label_field and the source."
            )
        for split in ("validation", "test"):
            unknown = sorted_labels(seen.get(split, set()) - set(classes))
            if unknown:
                raise DataError(
                    f"The {split} split has labels {unknown} that the training split never shows (its classes: "
                    f"{classes}); the model could never predict them. Fix the labels, or list every class in "
                    "data.label_order."
                )
        return classes

    def _make_tokenizer(self, train_texts: list[str]) -> Tokenizer:
        hp = self.hparams
        if hp.init_from is not None:

            pretrained = load(hp.init_from).tokenizer
            if hp.tokenizer is not None:
                given = self._tokenizer_of_setting(train_texts)
                if given.to_str() != pretrained.to_str():
                    raise TokenizerError(
                        f"data.tokenizer={hp.tokenizer!r} does not match the tokenizer of the pretrained model "
                        f"{hp.init_from!r} ({given.get_vocab_size()} tokens against {pretrained.get_vocab_size()}): "
                        "its weights would read the wrong tokens. Leave data.tokenizer unset to use the model's own."
                    )
            return pretrained
        return self._tokenizer_of_setting(train_texts)

    def _tokenizer_of_setting(self, train_texts: list[str]) -> Tokenizer:
        hp = self.hparams
        spec = hp.tokenizer or "char"
        if spec not in LEVELS:
            return load_pretrained(spec)
        cap = hp.max_vocab_size if hp.max_vocab_size is not None else (
            hp.target_vocab_size if spec in ("char", "word") else None
        )
        with tokenizers_parallelism(True):  # no process has been forked yet
            return train_tokenizer(spec, train_texts, hp.target_vocab_size, hp.min_frequency, cap)

    # ----------------------------------------------------------------------------------------- Lightning
    @property
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def setup(self, stage: str | None = None) -> None:
        self._prepare()
        if not self._summary_logged:
            self._summary_logged = True
            lines = [f"rnnlm data: source={self.hparams.source} classes={self._classes} vocab={self.vocab_size:,}"]
            for split, st in self.stats.items():
                skipped = st["skipped_empty_text"] + st["skipped_no_label"]
                lines.append(
                    f"  {split:<10} {st['rows']:>9,} texts {st['tokens']:>12,} tokens  per class {st['class_counts']}"
                    + (f"  cut to max_length: {st['truncated']:,}" if st["truncated"] else "")
                    + (f"  skipped: {st['skipped_empty_text']:,} empty, {st['skipped_no_label']:,} unlabelled"
                       if skipped else "")
                )
            rank_zero_info("\n".join(lines))

    def train_dataloader(self) -> BucketLoader:
        world, rank = self._world
        seed = self.hparams.seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set on every rank by seed_everything
        trainer = self.trainer
        loader = BucketLoader(
            self.tokens["train"], self.targets["train"], self.encoder.separator, self.hparams.batch_size, seed,
            self.hparams.bucket_size, world, rank, epoch=trainer.current_epoch if trainer is not None else 0,
            pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
            epoch_of=(lambda: trainer.current_epoch) if trainer is not None else None,
        )
        if len(loader) == 0:
            raise DataError(
                f"The training split has {len(self.tokens['train'])} texts, too few for one batch on each of "
                f"{world} processes. Lower data.batch_size or use more data."
            )
        return loader

    def loader(self, split: str) -> SortedLoader:
        """The evaluation batches of ``split`` for this process."""
        world, rank = self._world
        if len(self.tokens[split]) < world:
            raise DataError(f"The {split} split has {len(self.tokens[split])} texts, fewer than the {world} "
                            "processes that evaluate it: use more data (or data.val_fraction) or fewer processes.")
        size = self.hparams.eval_batch_size or 2 * self.hparams.batch_size
        return SortedLoader(self.tokens[split], self.targets[split], self.encoder.separator, size, world, rank)

    def val_dataloader(self) -> SortedLoader | list:
        return self.loader("validation") if "validation" in self.splits else []

    def test_dataloader(self) -> SortedLoader | list:
        return self.loader("test") if "test" in self.splits else []

    def describe(self) -> dict:
        """What a classifier trained on this data needs to know of it: the tokenizer, the classes, the tokens read
        per text, and facts for experiment tracking."""
        return {
            "tokenizer": self.tokenizer,
            "classes": self.classes,
            "max_length": self.hparams.max_length,
            "facts": {"source": self.hparams.source, "classes": self.classes, "vocab_size": self.vocab_size,
                      "splits": self.stats},
        }


def batch_tokens(batch: Batch) -> int:
    """The text tokens a batch holds (padding and separators left out)."""
    return int(batch.lengths.sum()) - len(batch.lengths)

