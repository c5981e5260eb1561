"""Shared fixtures and helpers: every test runs offline with its own caches and small generated corpora.

The helpers build the small objects most tests need: ``tiny_trainer``, ``tiny_data`` and ``tiny_model`` for the
Python API, ``fit_args`` / ``run_fit`` for the CLI (``rnnlm.fit.main``; ``FIT`` runs it in a subprocess). Each test
passes only what it needs to differ. The fixture ``tiny_lm_checkpoint`` is the one tiny trained language model that
tests reading a checkpoint share (trained once a session, on ``tiny_lm_corpus``).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported where used, after the environment below is set (datasets reads it on import)
    import lightning as L

    from rnnlm.data.lm import LMDataModule
    from rnnlm.training.lm import LanguageModel

# Never reach for the network in tests: the Hub code path is exercised with local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
FIT = [sys.executable, "-m", "rnnlm.fit"]  # the CLI in a fresh process

WORDS = (
    "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees "
    "every morning we walk along the river to see boats drift past old stone bridges"
).split()


def make_text(n_lines: int, seed: int = 0, words_per_line: int = 12) -> str:
    """Deterministic English-like text with a trailing newline on every line."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words_per_line))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (scripts/gpu_check.sh runs these with -m cuda)")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("RNNLM_CACHE", str(root / "rnnlm-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face Hub cache of this test's own (huggingface_hub reads the variable once, at import)."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A folder with train/valid/test text files, as WikiText and PTB come."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text(make_text(600, seed=1))
    (folder / "valid.txt").write_text(make_text(80, seed=2))
    (folder / "test.txt").write_text(make_text(80, seed=3))
    return folder


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A single text file (one document), as tinyshakespeare comes."""
    path = tmp_path / "input.txt"
    path.write_text(make_text(800, seed=4))
    return path


def sigterm_once_training(cmd: list[str], last: Path, **popen) -> tuple[int, str]:
    """Start ``cmd``, send it SIGTERM as soon as it has written ``last`` (training is under way), return its exit
    status and output."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    return proc.returncode, output


# ----------------------------------------------------------------------------------------- Python API
def tiny_trainer(root: Path, **overrides) -> L.Trainer:
    """A quiet single-process CPU Trainer writing under ``root``: no logger, no checkpoints unless asked."""
    import lightning as L

    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    return L.Trainer(**{**settings, **overrides})


def tiny_data(source: str | Path, root: Path, **overrides) -> LMDataModule:
    """A char-level data module (4 streams, chunks of 9) caching under ``root / "cache"``."""
    from rnnlm.data.lm import LMDataModule

    settings = dict(source=str(source), tokenizer="char", batch_size=4, bptt=9, cache_dir=str(root / "cache"))
    return LMDataModule(**{**settings, **overrides})


def tiny_model(vocab_size: int, **overrides) -> LanguageModel:
    """A 2-layer LSTM with 8-dimensional embeddings and 16 hidden units; ``overrides`` are model settings
    (``RNNLMConfig``) or the LightningModule's own arguments."""
    from rnnlm.network.config import RNNLMConfig
    from rnnlm.training.lm import LanguageModel

    module_args = {"activation_regularization", "temporal_activation_regularization", "on_nonfinite"}
    settings = {"cell": "lstm", "num_layers": 2, "embedding_dim": 8, "hidden_size": 16}
    settings.update({k: v for k, v in overrides.items() if k not in module_args})
    return LanguageModel(RNNLMConfig(vocab_size, **settings), **{k: v for k,
                                     v in overrides.items() if k in module_args})


# ----------------------------------------------------------------------------------------- a trained LM
@pytest.fixture(scope="session")
def tiny_lm_corpus(tmp_path_factory) -> Path:
    """The train/valid/test folder that ``tiny_lm_checkpoint`` is trained on (char level: 25 tokens)."""
    folder = tmp_path_factory.mktemp("tiny-lm") / "corpus"
    folder.mkdir()
    for name, seed, n in (("train.txt", 1, 300), ("valid.txt", 2, 40), ("test.txt", 3, 40)):
        (folder / name).write_text(make_text(n, seed=seed))
    return folder


@pytest.fixture(scope="session")
def tiny_lm_checkpoint(tiny_lm_corpus: Path) -> Path:
    """A checkpoint of ``tiny_model`` (char-level LSTM, 2 layers, 16 units) after 60 steps of real training on
    ``tiny_lm_corpus`` through the Trainer: it has learned something (its loss is well below ln V). Shared by the
    whole session: read it, never write to it."""
    import torch

    root = tiny_lm_corpus.parent
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():  # the session's RNG is left as it was
        mp.setenv("RNNLM_CACHE", str(root / "rnnlm-cache"))  # _isolated_caches is per test: not set up yet here
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
        torch.manual_seed(0)
        data = tiny_data(tiny_lm_corpus, root)
        model = tiny_model(data.vocab_size)
        trainer = tiny_trainer(root, max_steps=60, limit_val_batches=0)
        trainer.fit(model, datamodule=data)
        path = root / "lm.ckpt"
        trainer.save_checkpoint(path)
    return path


# ----------------------------------------------------------------------------------------- the CLI
TINY_ARGS = (
    "--data.batch_size", "2", "--data.bptt", "8",
    "--model.config.embedding_dim", "8", "--model.config.hidden_size", "16",
    "--sample.max_new_tokens", "0",
)  # fmt: skip


def fit_args(root: Path, source: str | Path | None, *extra: str, config: Path = QUICKSTART,
             cache: Path | None = None, tiny: bool = True) -> list[str]:
    """Arguments for ``rnnlm.fit``: ``config``, the data ``source`` (None: the config's), the token cache
    (default ``root / "cache"``), ``root`` as the Trainer's default_root_dir, no progress bar and, with ``tiny``,
    a small model on 2 streams of 8 tokens without samples; then ``extra``, which overrides any of these (the
    last value of an option wins)."""
    args = ["--config", str(config)]
    if source is not None:
        args += ["--data.source", str(source)]
    args += [
        "--data.cache_dir", str(cache if cache is not None else root / "cache"),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    return [*args, *(TINY_ARGS if tiny else ()), *extra]


def run_fit(root: Path, source: str | Path | None, *extra: str, **options):
    """Run ``rnnlm.fit.main`` in this process with ``fit_args(root, source, *extra, **options)``; return its CLI."""
    from rnnlm.fit import main

    return main(fit_args(root, source, *extra, **options))
