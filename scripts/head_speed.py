"""The output layer alone: the fused head (rnnlm.network.head.linear_cross_entropy) against F.linear + F.cross_entropy.

    python scripts/head_speed.py                       # vocabulary sweep at the default block size, then blocks
    python scripts/head_speed.py --vocab 33278 --rows 700 --dim 200 --blocks 64 128 252 512

For each vocabulary size: the forward and backward pass of the output layer of N = ``--rows`` positions (the
WikiText-2 recipe: 20 streams x 35 tokens = 700) of ``--dim`` features, timed in alternating blocks (plain, fused,
plain, ...) of ``--steps`` passes so that other load hits both alike; reported: the medians, and the median of the
per-pair ratios plain time / fused time (> 1: the fused head is faster). This is the measurement behind the
default of ``model.config.loss_block_rows`` (``rnnlm.network.head.auto_block_rows``); ``scripts/bench.py`` measures
whole training steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rnnlm.cpu import flush_denormals
from rnnlm.network.head import CPU_BLOCK_ELEMENTS, MIN_BLOCK_ROWS, linear_cross_entropy


def _pass(head, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> None:
    for t in (x, w, b):
        t.grad = None
    head(x, w, b, y).backward()


def _timed(head, tensors, steps: int) -> float:
    _pass(head, *tensors)  # warm-up: allocations, MKL's first call
    start = time.perf_counter()
    for _ in range(steps):
        _pass(head, *tensors)
    return (time.perf_counter() - start) / steps


def compare(vocab: int, rows: int, dim: int, block_rows: int, steps: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, dim, generator=g) * 0.5).requires_grad_()
    w = (torch.rand(vocab, dim, generator=g) * 0.2 - 0.1).requires_grad_()
    b = torch.zeros(vocab).requires_grad_()
    y = torch.randint(vocab, (rows,), generator=g)
    plain = lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b), y)  # noqa: E731
    fused = lambda x, w, b, y: linear_cross_entropy(x, w, b, y, block_rows)  # noqa: E731
    pairs = [(_timed(plain, (x, w, b, y), steps), _timed(fused, (x, w, b, y), steps)) for _ in range(repeats)]
    return {"vocab": vocab, "block_rows": block_rows,
            "plain_ms": 1e3 * statistics.median(p for p, _ in pairs),
            "fused_ms": 1e3 * statistics.median(f for _, f in pairs),
            "ratio": statistics.median(p / f for p, f in pairs),
            "range": (min(p / f for p, f in pairs), max(p / f for p, f in pairs))}


def _show(r: dict) -> None:
    lo, hi = r["range"]
    print(f"  V={r['vocab']:>6,}  block {r['block_rows']:>5} rows  plain {r['plain_ms']:7.2f} ms  "
          f"fused {r['fused_ms']:7.2f} ms  plain/fused {r['ratio']:.3f} (pairs {lo:.3f}-{hi:.3f})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[105, 1024, 2048, 4096, 8192, 16384, 33278])
    p.add_argument("--rows", type=int, default=700)
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--blocks", type=int, nargs="*", default=[64, 128, 252, 512, 1024],
                   help="block sizes tried at the largest vocabulary (none: skip)")
    p.add_argument("--steps", type=int, default=10, help="passes per timed block")
    p.add_argument("--repeats", type=int, default=5, help="block pairs")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    flush_denormals()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"output layer, forward + backward: {args.rows} rows x {args.dim} features, {torch.get_num_threads()} "
          f"thread(s), median of {args.repeats} block pairs of {args.steps} passes")
    for vocab in args.vocab:
        _show(compare(vocab, args.rows, args.dim, max(MIN_BLOCK_ROWS, CPU_BLOCK_ELEMENTS // vocab), args.steps,
                      args.repeats))
    if args.blocks:
        print(f"block sizes at V={max(args.vocab):,}:")
        for block in args.blocks:
            _show(compare(max(args.vocab), args.rows, args.dim, block, args.steps, args.repeats))


if __name__ == "__main__":
    main()
