"""What each AWD-LSTM option does to perplexity at a fixed model size and number of epochs.

Every row trains the same 2 x 200 LSTM (the classic word_language_model recipe: SGD lr 20, gradient clipping 0.25,
batch 20, bptt 35, dropout 0.2, lr / 4 when validation does not improve, 6 epochs) with one AWD option added, then
all of them together, through ``python -m rnnlm.fit`` (one process per row), and reports the validation perplexity
after each epoch, the best one and the test perplexity of the best checkpoint. The README's table is

    python scripts/awd_ablation.py --source ../shared/data/ptb --jobs 2 --out runs/ablation.jsonl

``--jobs N`` trains N rows at once, each with its share of the cores (one thread each on a 2-core machine).
``--train_fraction`` trains on the first part of every stream only (``trainer.limit_train_batches``), the same
part each epoch: a small-data regime for quick checks. ``--eval_fraction`` likewise evaluates on the first part of
every validation and test stream."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

BASE = [
    "--config", "configs/wikitext2_word_lstm.yaml",
    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
    "--trainer.enable_progress_bar", "false",
    "--sample.max_new_tokens", "0",
]  # fmt: skip

# Each AWD option at the paper's value (Merity et al. 2017 / the AWD-LSTM README), one at a time.
OPTIONS = {
    "baseline": [],
    "weight_drop": ["--model.config.weight_drop", "0.5"],
    "locked_dropout": ["--model.config.locked_dropout", "true"],
    "embedding_dropout": ["--model.config.dropout_words", "0.1"],
    "ar_tar": ["--model.activation_regularization", "2.0", "--model.temporal_activation_regularization", "1.0"],
    "weight_decay": ["--optimizer.init_args.weight_decay", "1.2e-6"],
    "variable_bptt": ["--data.variable_bptt", "true", "--trainer.reload_dataloaders_every_n_epochs", "1"],
    # NT-ASGD replaces the lr / 4 schedule, as in the paper (constant learning rate, then averaging).
    "nt_asgd": ["--lr_scheduler", "null", "--trainer.callbacks+=rnnlm.training.averaging.NTASGD"],
}
ALL = [arg for name, args in OPTIONS.items() if name != "baseline" for arg in args]
OPTIONS["all"] = ALL


def run_row(name: str, args: argparse.Namespace) -> dict:
    root = Path(args.root) / name
    cmd = [
        sys.executable, "-m", "rnnlm.fit", *BASE,
        "--data.source", args.source,
        "--data.cache_dir", args.cache_dir,
        "--trainer.max_epochs", str(args.epochs),
        "--trainer.limit_train_batches", str(args.train_fraction),
        "--trainer.limit_val_batches", str(args.eval_fraction),
        "--trainer.limit_test_batches", str(args.eval_fraction),
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.save_dir", str(root),
        "--seed_everything", str(args.seed),
        *OPTIONS[name],
    ]  # fmt: skip
    if name in ("nt_asgd", "all"):
        cmd += ["--trainer.callbacks.patience", str(args.patience)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if args.jobs > 1:
        # Rows running side by side each get their share of the cores (torch would start a thread per core each).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"row {name} failed:\n{out.stderr[-4000:]}")
    metrics_files = sorted(root.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows = list(csv.DictReader(metrics_files[-1].open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    test = [float(r["test/loss"]) for r in rows if r.get("test/loss")]
    tps = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    return {
        "row": name,
        "val_ppl_per_epoch": [round(math.exp(v), 2) for v in val],
        "best_val_ppl": round(math.exp(min(val)), 2),
        "test_ppl": round(math.exp(test[-1]), 2) if test else None,
        "train_tokens_per_s": round(sum(tps) / len(tps)) if tps else None,
        "seconds": round(seconds),
        "averaging_started": "NT-ASGD" in out.stdout + out.stderr,
        "args": OPTIONS[name],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="../shared/data/ptb")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train_fraction", type=float, default=1.0, help="share of each training stream used")
    p.add_argument("--eval_fraction", type=float, default=1.0, help="share of each validation/test stream used")
    p.add_argument("--patience", type=int, default=1, help="NT-ASGD's n (the paper: 5, over hundreds of epochs)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--rows", default=",".join(OPTIONS), help=f"comma-separated, from {', '.join(OPTIONS)}")
    p.add_argument("--root", default="runs/awd_ablation")
    p.add_argument("--out", default="runs/awd_ablation.jsonl")
    p.add_argument("--jobs", type=int, default=1, help="rows trained at once (each gets cores / jobs threads)")
    args = p.parse_args()
    rows = args.rows.split(",")
    unknown = [name for name in rows if name not in OPTIONS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    args.cache_dir = args.cache_dir or str(Path(args.root) / "cache")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    failed = []
    # Threads only wait on the row processes; the data cache is shared safely (it is written under a file lock).
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_row, name, args): name for name in rows}
        for future in as_completed(futures):
            try:
                result = future.result()
            except RuntimeError as error:  # one failed row must not lose the others' hours of training
                failed.append(futures[future])
                print(error, file=sys.stderr, flush=True)
                continue
            print(json.dumps(result), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
    if failed:
        sys.exit(f"row(s) failed: {', '.join(failed)} (the others are in {args.out})")


if __name__ == "__main__":
    main()
