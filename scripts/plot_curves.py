"""Draw the learning curves of a run from its CSV logs: loss, perplexity and bits per character against steps.

    python scripts/plot_curves.py runs/quickstart/lightning_logs/version_0/metrics.csv -o curves.png

For runs logged with ``--trainer.logger lightning.pytorch.loggers.CSVLogger`` (or TensorBoard users who also
keep CSV logs). Training curves are drawn as logged per step; validation points where validation ran.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

PANELS = (("loss", "loss (nats/token)"), ("ppl", "perplexity"), ("bpc", "bits per character"))


def read_curves(metrics_csv: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{"train/loss": (steps, values), "val/ppl": ...}`` for every metric of PANELS that the file holds."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for stage in ("train", "val"):
                for name, _ in PANELS:
                    key = f"{stage}/{name}"
                    if row.get(key) not in (None, ""):
                        steps, values = curves.setdefault(key, ([], []))
                        steps.append(int(float(row["step"])))
                        values.append(float(row[key]))
    return curves


def plot_curves(metrics_csv: str | Path, output: str | Path) -> list[str]:
    """Write the PNG and return the names of the curves drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    curves = read_curves(metrics_csv)
    if not curves:
        raise SystemExit(f"{metrics_csv} holds none of the metrics train/val loss, ppl, bpc: is it a rnnlm run?")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    drawn = []
    for ax, (name, label) in zip(axes, PANELS, strict=True):
        for stage, style in (("train", "-"), ("val", "o-")):
            key = f"{stage}/{name}"
            if key in curves:
                steps, values = curves[key]
                ax.plot(steps, values, style, label=stage, markersize=4)
                drawn.append(key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if name == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(metrics_csv))
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics_csv", help="metrics.csv written by Lightning's CSVLogger")
    p.add_argument("-o", "--output", default="curves.png", help="PNG file to write")
    args = p.parse_args(argv)
    drawn = plot_curves(args.metrics_csv, args.output)
    print(f"wrote {args.output}: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
