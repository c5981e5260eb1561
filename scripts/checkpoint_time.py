"""How long writing a resumable checkpoint takes, by model size: what sizes the warning a cluster job needs.

    python scripts/checkpoint_time.py [--dir runs/checkpoint-time] [--sizes quickstart,awd_lstm_wikitext2,...]

For each size (the configs' models at their usual vocabulary sizes, and two larger made-up ones) it builds the model,
takes one Adam step through a Lightning Trainer with rnnlm's checkpointing callbacks (so the optimizer state exists,
as in a real checkpoint), then times ``trainer.save_checkpoint`` the way a run writes ``last.ckpt``: Lightning's
dump, ``torch.save`` to a temporary file beside the target, fsync, rename. Prints one JSON line per size with the
parameters, the file size and the fastest and slowest of ``--repeat`` writes. Run it with ``--dir`` on the file
system your jobs write checkpoints to: that, not this script, is what decides the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from rnnlm.network.config import RNNLMConfig
from rnnlm.training.checkpointing import ResumableCheckpoints, SafeCheckpointIO
from rnnlm.training.lm import LanguageModel

SIZES = {
    "quickstart": dict(vocab_size=100, num_layers=2, embedding_dim=64, hidden_size=256),
    "wikitext2_word_lstm": dict(vocab_size=33278, num_layers=2, embedding_dim=200, hidden_size=200,
                                tie_weights=False),
    "wikitext103_bpe_lstm": dict(vocab_size=16000, num_layers=2, embedding_dim=512, hidden_size=1024,
                                 tie_weights=True),
    "awd_lstm_wikitext2": dict(vocab_size=33278, num_layers=3, embedding_dim=400, hidden_sizes=[1150, 1150, 400],
                               tie_weights=True),
    "4x2048": dict(vocab_size=50000, num_layers=4, embedding_dim=1024, hidden_size=2048, tie_weights=False),
    "4x3072": dict(vocab_size=50000, num_layers=4, embedding_dim=1536, hidden_size=3072, tie_weights=False),
}


class Adam(LanguageModel):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def measure(name: str, folder: Path, repeat: int) -> dict:
    config = RNNLMConfig(**SIZES[name])
    model = Adam(config)
    ids = torch.randint(0, config.vocab_size, (1, 9))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=folder, plugins=[SafeCheckpointIO()],
                        callbacks=[ResumableCheckpoints(every_n_minutes=None, handle_signals=False)])
    trainer.fit(model, train_dataloaders=DataLoader([(ids[0, :-1], ids[0, 1:])], batch_size=1))
    path = folder / "last.ckpt"
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        trainer.save_checkpoint(path, weights_only=False)
        seconds.append(time.perf_counter() - start)
    size = path.stat().st_size
    path.unlink()
    return {
        "model": name,
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "checkpoint_MB": round(size / 1e6, 1),
        "write_s_min": round(min(seconds), 2),
        "write_s_max": round(max(seconds), 2),
        "MB_per_s": round(size / 1e6 / min(seconds)),
        "device": str(model.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="checkpoint-time-"))
    base.mkdir(parents=True, exist_ok=True)
    for name in args.sizes.split(","):
        print(json.dumps(measure(name, base / name, args.repeat)), flush=True)
    if not args.dir:
        for folder in base.iterdir():
            os.rmdir(folder)
        os.rmdir(base)


if __name__ == "__main__":
    main()
