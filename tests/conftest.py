"""Shared fixtures: every test runs offline with its own caches and small generated corpora."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Never reach for the network in tests: the Hub code path is exercised with local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WANDB_MODE", "offline")

WORDS = (
    "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees "
    "every morning we walk along the river to see boats drift past old stone bridges"
).split()


def make_text(n_lines: int, seed: int = 0, words_per_line: int = 12) -> str:
    """Deterministic English-like text with a trailing newline on every line."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words_per_line))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("RNNLM_CACHE", str(root / "rnnlm-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))


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
