"""Validation accuracy against the number of labelled training texts, one line per method, as a PNG.

    python scripts/plot_labels.py docs/nsmc_labels.csv -o docs/nsmc_labels.png

Reads a CSV with the columns ``method``, ``labels`` (training texts) and ``accuracy`` (validation, 0-1), one row
per run, e.g. the pretrained classifier, the one trained from scratch and TF-IDF at 1k, 10k and all labels; a
method with several rows at one size is drawn at its best. The x axis is logarithmic: ULMFiT's claim is about
orders of magnitude of labels.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict


def read_results(path: str) -> dict[str, dict[int, float]]:
    """``{method: {labels: best accuracy}}``, in the file's order of methods."""
    results: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            labels, accuracy = int(row["labels"]), float(row["accuracy"])
            results[row["method"]][labels] = max(accuracy, results[row["method"]].get(labels, 0.0))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_csv")
    p.add_argument("--title", default=None)
    p.add_argument("-o", "--output", default="labels.png")
    args = p.parse_args(argv)
    results = read_results(args.results_csv)
    if not results:
        raise SystemExit(f"{args.results_csv} has no rows: it needs the columns method, labels, accuracy.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in results.items():
        sizes = sorted(points)
        accuracies = [100 * points[n] for n in sizes]
        ax.plot(sizes, accuracies, "o-", label=method, markersize=5)
        for n, a in zip(sizes, accuracies, strict=True):
            ax.annotate(f"{a:.1f}", (n, a), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training reviews")
    ax.set_ylabel("validation accuracy (%)")
    if args.title:
        ax.set_title(args.title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
