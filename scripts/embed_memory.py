"""Peak memory and time of ``rnnlm.embed`` on one very long line.

    python scripts/embed_memory.py [--tokens 200000 --hidden 256 --layers 2 --embedding 64 --cell lstm
        --bidirectional --pooling none --suffix parquet --work_dir /tmp/embed_memory]

Trains a character-level LM of the given shape for one step on made-up text (its weights do not matter here, only
its shape; it is kept in ``--work_dir`` and reused), writes an input of one line of ``--tokens`` characters (one
token each) and runs ``python -m rnnlm.embed`` on it in a fresh process, then on a one-token line for the baseline
(Python, torch and the model). Reports, as one JSON line each, the peak resident memory of that process (its
``ru_maxrss``), its wall time and its CPU time (user + system).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = "the cat sat on a mat and a dog ran to the park while birds sang in tall green trees".split()


def made_up_text(characters: int, seed: int) -> str:
    rng = random.Random(seed)
    words, size = [], 0
    while size < characters:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:characters]


def checkpoint(args) -> Path:
    path = Path(args.work_dir) / (f"lm-{args.cell}-{args.layers}x{args.hidden}-e{args.embedding}"
                                  f"{'-bi' if args.bidirectional else ''}.ckpt")
    if path.exists():
        return path
    import lightning as L

    from rnnlm.data.lm import LMDataModule
    from rnnlm.network.config import RNNLMConfig
    from rnnlm.training.lm import LanguageModel

    corpus = Path(args.work_dir) / "train.txt"
    corpus.write_text("\n".join(made_up_text(80, seed) for seed in range(200)) + "\n")
    data = LMDataModule(source=str(corpus), tokenizer="char", batch_size=4, bptt=16,
                        cache_dir=str(Path(args.work_dir) / "cache"), bidirectional=args.bidirectional)
    config = RNNLMConfig(data.vocab_size, cell=args.cell, num_layers=args.layers, hidden_size=args.hidden,
                         embedding_dim=args.embedding, bidirectional=args.bidirectional)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_steps=1,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=args.work_dir)
    trainer.fit(LanguageModel(config), datamodule=data)
    trainer.save_checkpoint(path)
    return path


def measure(args, model: Path, text: str, name: str) -> dict:
    source = Path(args.work_dir) / f"{name}.txt"
    source.write_text(text + "\n")
    out = Path(args.work_dir) / f"{name}.{args.suffix}"
    command = [sys.executable, "-m", "rnnlm.embed", "--checkpoint", str(model), "--input", str(source),
               "--out", str(out), "--pooling", args.pooling, "--layers", args.layer_choice, "--device", "cpu"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the largest of all children
    wall = time.perf_counter() - start
    error = process.stderr.read().decode()
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"embed failed:\n{error}")
    return {"line_tokens": len(text), "pooling": args.pooling, "layers": args.layer_choice, "out": args.suffix,
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "wall_s": round(wall, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "output_mb": round(out.stat().st_size / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embedding", type=int, default=64)
    p.add_argument("--cell", default="lstm")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--pooling", default="none")
    p.add_argument("--layer_choice", default="top", help="embed's --layers")
    p.add_argument("--suffix", default="parquet")
    p.add_argument("--work_dir", default="/tmp/embed_memory")
    args = p.parse_args()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    model = checkpoint(args)
    for name, text in (("baseline", "a"), ("long", made_up_text(args.tokens, seed=1))):
        print(json.dumps({"input": name, **measure(args, model, text, name)}), flush=True)


if __name__ == "__main__":
    main()
