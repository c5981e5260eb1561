"""Validation accuracy against training time of classifier runs (e.g. pretrained against from scratch), as a PNG.

    python scripts/plot_accuracy.py runs/nsmc_sentiment/lightning_logs/version_0/metrics.csv \
        runs/nsmc_sentiment_scratch/lightning_logs/version_0/metrics.csv --labels pretrained "from scratch" \
        --reference 0.871 "TF-IDF" -o nsmc_accuracy.png

Reads the CSV logs of ``rnnlm.classify`` runs (``--trainer.logger lightning.pytorch.loggers.CSVLogger``): each
validation logs ``val/accuracy`` with ``val/train_seconds``, the wall-clock time spent training until then. Also
prints each run's points as JSON lines (hours, accuracy).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_points(metrics_csv: str | Path) -> list[tuple[float, float]]:
    """``(hours, validation accuracy)`` of every validation in the log."""
    points = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/accuracy") and row.get("val/train_seconds"):
                points.append((float(row["val/train_seconds"]) / 3600, float(row["val/accuracy"])))
    return points


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics_csv", nargs="+", help="metrics.csv of each run")
    p.add_argument("--labels", nargs="+", default=None, help="a name per run (default: its folder)")
    p.add_argument("--reference", nargs=2, action="append", default=[], metavar=("ACCURACY", "NAME"),
                   help="a horizontal line, e.g. --reference 0.871 TF-IDF (repeatable)")
    p.add_argument("-o", "--output", default="accuracy.png")
    args = p.parse_args(argv)
    labels = args.labels or [Path(m).parent.parent.parent.name for m in args.metrics_csv]
    if len(labels) != len(args.metrics_csv):
        raise SystemExit("Give one label per metrics file.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path, label in zip(args.metrics_csv, labels, strict=True):
        points = read_points(path)
        if not points:
            raise SystemExit(f"{path} has no val/accuracy with val/train_seconds: is it a rnnlm.classify run?")
        print(json.dumps({"run": label, "points": [[round(h, 4), round(a, 4)] for h, a in points]}))
        ax.plot(*zip(*points, strict=True), "o-", label=label, markersize=4)
    for accuracy, name in args.reference:
        ax.axhline(float(accuracy), linestyle="--", color="gray")
        # Below the line, so that a reference above every point stays inside the axes.
        ax.annotate(name, (0, float(accuracy)), textcoords="offset points", xytext=(4, -12), color="gray")
    ax.margins(y=0.08)
    ax.set_xlabel("training time (hours, validation included)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
