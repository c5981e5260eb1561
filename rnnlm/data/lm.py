"""The LightningDataModule: dataset -> tokenizer -> cached token stream -> truncated-BPTT chunks.

``prepare_data`` (one process) trains or loads the tokenizer and encodes every split once into the token cache
(``token_cache.py``: a compact numpy file per split, keyed by the split's text and the tokenizer); ``setup`` (every
process) memory-maps those files and cuts them into streams for this rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer

from rnnlm.data.reading import TextDataModule
from rnnlm.errors import check_positive_int
from rnnlm.sharing.transfer import read_pretrained_tokenizer
from rnnlm.text.encoding import PARALLEL_MIN_CHARS, default_workers
from rnnlm.text.sources import Corpus, DataError, load_corpus
from rnnlm.text.streams import ChunkLoader, rank_rows
from rnnlm.text.token_cache import TokenCache, cached_tokenizer
from rnnlm.text.tokenization import (
    LEVELS,
    Encoder,
    describe_tokenizer,
    load_pretrained,
    tokenizers_parallelism,
    train_tokenizer,
)


class LMDataModule(TextDataModule):
    """Text from a Hugging Face dataset, tokenized once, served as contiguous truncated-BPTT chunks.

    The reading settings (``text_field``, the splits, ``vocab_size``, ``cache_dir``, ...) are those of
    :class:`~rnnlm.data.reading.TextDataModule`; these are the language model's own.

    Args:
        source: a Hub dataset name (``Salesforce/wikitext``), a local file or folder (text, json/jsonl, csv,
            parquet; splits found from file names), a ``save_to_disk`` folder, or ``builtin:python-docs``.
        sample_by: for text files: one document per ``line`` (WikiText/PTB), ``paragraph`` or whole ``document``.
        val_fraction: share of the training text carved off its end for validation when the source has none.
        test_fraction: likewise for the test split.
        tokenizer: ``char``, ``byte``, ``word``, ``bpe``, ``unigram``, ``wordpiece``, or a ``tokenizer.json`` path
            or Hub tokenizer name.
        batch_size: streams per rank; each rank trains ``batch_size`` rows in parallel.
        bptt: chunk length T: backpropagation runs through T steps, the state is carried further.
        bidirectional: also serve the backward direction's chunks (set from model.bidirectional by the CLI).
        streaming: read the source as a stream (``datasets`` streaming mode) instead of downloading and converting
            it first: for corpora larger than the disk or memory. The ids are still written to the cache, task by
            task. The source must have its own validation and test splits (or set val/test_fraction to 0).
        encode_workers: processes that encode a split into the cache (default: one per core for splits of more
            than 32 M characters and streams, one otherwise). The ids do not depend on it.
        variable_bptt: draw the training chunk lengths around ``bptt`` anew each epoch, as AWD-LSTM does (the
            streams stay contiguous; the model scales each step's learning rate by its length). Needs
            ``trainer.reload_dataloaders_every_n_epochs: 1`` so the Trainer picks up each epoch's schedule.
        variable_bptt_seed: seeds the lengths together with the epoch (default: the run's ``seed_everything``).
    """

    def __init__(
        self,
        # A corpus comes with the package, so that a first run needs no download.
        source: str = "builtin:python-docs",
        sample_by: str = "document",
        # Carved off the end of a corpus: a twentieth of it is plenty to validate on.
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        tokenizer: str = "char",
        # Streams, not texts: each is a row carried on from batch to batch.
        batch_size: int = 32,
        bptt: int = 64,
        bidirectional: bool = False,
        streaming: bool = False,
        encode_workers: int | None = None,
        variable_bptt: bool = False,
        variable_bptt_seed: int | None = None,
        **reading,
    ) -> None:
        for name, value in (("bptt", bptt), ("encode_workers", encode_workers)):
            if value is not None:
                check_positive_int(f"data.{name}", value, DataError)
        super().__init__(source=source, val_fraction=val_fraction, tokenizer=tokenizer, batch_size=batch_size,
                         **reading)
        self.token_cache = TokenCache(self.cache_dir)
        self._corpus: Corpus | None = None
        self._tokenizer: Tokenizer | None = None
        self._encoder: Encoder | None = None
        self.ids: dict[str, np.ndarray] = {}
        self.stats: dict[str, dict] = {}
        self.cache_hits: dict[str, bool] = {}
        self._summary_logged = False

    @classmethod
    def from_hparams(cls, hparams: dict, **overrides) -> LMDataModule:
        """Rebuild a data module from the hyperparameters saved in a checkpoint (with some overridden)."""
        kwargs = dict(hparams)
        kwargs["vocab_size"] = kwargs.pop("target_vocab_size", None)
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    # ----------------------------------------------------------------------------------------- corpus, tokenizer
    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            hp = self.hparams
            self._corpus = load_corpus(
                hp.source,
                hp.config_name,
                hp.text_field,
                {"train": hp.train_split, "validation": hp.val_split, "test": hp.test_split},
                hp.sample_by,
                hp.val_fraction,
                hp.test_fraction,
                self.cache_dir,
                streaming=hp.streaming,
                revision=hp.revision,
            )
        return self._corpus

    @property
    def splits(self) -> list[str]:
        """The names of the splits the source has (``train``, ``validation``, ``test``)."""
        return self.corpus.splits

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, trained on the training split on first use and cached (or loaded from the cache)."""
        if self._tokenizer is None:
            self.use_tokenizer(self._load_or_train_tokenizer())
        return self._tokenizer  # type: ignore[return-value]

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use a given tokenizer (e.g. the one stored in a checkpoint) instead of training one."""
        self._encoder = Encoder(tokenizer)  # adds a separator if the tokenizer has none
        self._tokenizer = tokenizer

    @property
    def encoder(self) -> Encoder:
        self.tokenizer  # noqa: B018 - builds it on first use
        return self._encoder  # type: ignore[return-value]

    @property
    def vocab_size(self) -> int:
        """The real vocabulary size (what the model's embedding and decoder need)."""
        return self.encoder.vocab_size

    def _load_or_train_tokenizer(self) -> Tokenizer:
        hp = self.hparams
        if hp.get("init_from"):

            tokenizer = read_pretrained_tokenizer(hp.init_from)
            rank_zero_info(
                f"rnnlm data: the tokenizer of the pretrained model {hp.init_from} ({describe_tokenizer(tokenizer)}) "
                f"reads this data, so the ids are those its weights were trained on (data.tokenizer={hp.tokenizer} "
                "is not used)."
            )
            return tokenizer
        if hp.tokenizer not in LEVELS:
            return load_pretrained(hp.tokenizer)
        cap = hp.max_vocab_size if hp.max_vocab_size is not None else (
            hp.target_vocab_size if hp.tokenizer in ("char", "word") else None
        )

        def train() -> Tokenizer:
            texts = (t for batch in self.corpus.texts("train") for t in batch)
            with tokenizers_parallelism(True):  # every core; no process has been forked yet
                return train_tokenizer(hp.tokenizer, texts, hp.target_vocab_size, hp.min_frequency, cap)

        settings = (hp.target_vocab_size, hp.min_frequency, cap)
        return cached_tokenizer(self.cache_dir, hp.tokenizer, self.corpus.keys["train"], settings, train)

    # ----------------------------------------------------------------------------------------- token cache
    def _cache_path(self, split: str) -> Path:
        return self.token_cache.entry(split, self.corpus.keys[split], self.tokenizer)

    def prepare_data(self) -> None:
        """Encode every split once and cache the ids on disk (runs in one process per node)."""
        for split in self.corpus.splits:
            # Several nodes may share the cache folder: one encodes, the others wait and reuse it.
            self.cache_hits[split] = self.token_cache.prepare(
                self._cache_path(split),
                split,
                self.encoder,
                self.corpus.texts(split, batch_size=2000),  # a generator: nothing is read on a cache hit
                self.corpus.num_documents(split),
                self._encode_workers(split),
            )

    def _encode_workers(self, split: str) -> int:
        if self.hparams.encode_workers:
            return self.hparams.encode_workers
        size = self.corpus.size_in_bytes(split)
        return default_workers() if size is None or size > PARALLEL_MIN_CHARS else 1

    def _load_split(self, split: str) -> None:
        folder = self._cache_path(split)
        if not self.token_cache.complete(folder):
            self.prepare_data()  # not run by a Trainer (e.g. plain use) or another node's cache
        self.ids[split], self.stats[split] = self.token_cache.load(folder, self.vocab_size)

    # ----------------------------------------------------------------------------------------- streams
    @property
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _batch_size(self, split: str) -> int:
        hp = self.hparams
        return hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)

    def setup(self, stage: str | None = None) -> None:
        for split in self.corpus.splits:
            if split not in self.ids:
                self._load_split(split)
        if self.stats["train"]["tokens"] <= self.stats["train"]["documents"]:
            raise DataError(
                f"The training split of {self.hparams.source!r} holds no text to learn from "
                f"({self.stats['train']['documents']} empty documents). Check data.source and data.text_field."
            )
        for split in self.corpus.splits:
            self.loader(split)  # checks that every split is large enough, before training starts
        if not self._summary_logged:
            self._log_summary()
            self._summary_logged = True

    def _log_summary(self) -> None:
        world, _ = self._world
        tokenizer = (f"from:{self.hparams.init_from}" if self.hparams.get("init_from") else self.hparams.tokenizer)
        lines = [
            f"rnnlm data: source={self.hparams.source} tokenizer={tokenizer} "
            f"vocab={self.vocab_size:,} world_size={world}"
        ]
        for split in self.corpus.splits:
            st, loader = self.stats[split], self.loader(split)
            hit = {True: "hit", False: "miss"}.get(self.cache_hits.get(split), "hit")
            lines.append(
                f"  {split:<10} {st['tokens']:>12,} tokens {st['characters']:>13,} chars  "
                f"streams={self._batch_size(split) * world} x {loader.rows.shape[1]:,}  "
                f"chunks/epoch={len(loader):,}  cache {hit}"
            )
        rank_zero_info("\n".join(lines))

    def loader(self, split: str, batch_size: int | None = None, bptt: int | None = None) -> ChunkLoader:
        """The chunk sequence this rank sees for ``split``."""
        if split not in self.ids:
            self._load_split(split)
        world, rank = self._world
        batch_size = batch_size or self._batch_size(split)
        bptt = bptt or self.hparams.bptt
        need_len = bptt + 1 if split == "train" else 2
        streams = batch_size * world
        if len(self.ids[split]) < streams * need_len:
            raise DataError(
                f"The {split} split has {len(self.ids[split]):,} tokens, too few for {streams} streams "
                f"(batch size x world size) of {need_len} tokens: it needs at least {streams * need_len:,}. "
                "Lower data.batch_size" + (" or data.bptt" if split == "train" else " or data.eval_batch_size")
                + ", or use more text."
            )
        rows = rank_rows(self.ids[split], batch_size, world, rank)
        trainer = self.trainer
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        if split != "train" or not self.hparams.variable_bptt:
            return ChunkLoader(rows, bptt, pin_memory=pin, bidirectional=self.hparams.bidirectional)
        seed = self.hparams.variable_bptt_seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set on every rank by seed_everything
        epoch = trainer.current_epoch if trainer is not None else 0
        return ChunkLoader(rows, bptt, pin_memory=pin, bidirectional=self.hparams.bidirectional,
                           variable_length=True, seed=seed, epoch=epoch)

    def facts(self) -> dict:
        """What a run trains on, for experiment tracking (plain types)."""
        world, _ = self._world
        return {
            "source": self.hparams.source,
            "config_name": self.hparams.config_name,
            "tokenizer": self.hparams.tokenizer,
            **({"tokenizer_from": self.hparams.init_from} if self.hparams.get("init_from") else {}),
            "vocab_size": self.vocab_size,
            "world_size": world,
            "streams": self.hparams.batch_size * world,
            "bptt": self.hparams.bptt,
            "splits": {
                split: {
                    "tokens": st["tokens"],
                    "characters": st["characters"],
                    "chunks_per_epoch": len(self.loader(split)),
                    "cache": "hit" if self.cache_hits.get(split, True) else "miss",
                }
                for split, st in self.stats.items()
            },
        }

    def describe(self) -> dict:
        """What a model trained on this data needs to know of it: the tokenizer, the characters per token of each
        stage (for bits per character), whether it serves backward chunks, and facts for experiment tracking."""
        stages = {"train": "train", "validation": "val", "test": "test"}
        return {
            "tokenizer": self.tokenizer,
            "chars_per_token": {stages[s]: self.chars_per_token(s) for s in self.stats},
            "bidirectional": self.hparams.bidirectional,
            "facts": self.facts(),
        }

    def chars_per_token(self, split: str) -> float:
        st = self.stats[split]
        return st["characters"] / max(st["tokens"], 1)

    def bytes_per_token(self, split: str) -> float:
        st = self.stats[split]
        return st["bytes"] / max(st["tokens"], 1)

    def train_dataloader(self) -> ChunkLoader:
        trainer = self.trainer
        if self.hparams.variable_bptt and trainer is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise DataError(
                "data.variable_bptt draws new chunk lengths every epoch, so the Trainer must rebuild the training "
                "loader every epoch: set trainer.reload_dataloaders_every_n_epochs: 1 (it is "
                f"{trainer.reload_dataloaders_every_n_epochs})."
            )
        return self.loader("train")

    def val_dataloader(self) -> ChunkLoader | list:
        return self.loader("validation") if "validation" in self.corpus.splits else []

    def test_dataloader(self) -> ChunkLoader | list:
        return self.loader("test") if "test" in self.corpus.splits else []



