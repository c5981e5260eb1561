"""How fast ``rnnlm.score`` scores lines, against ``rnnlm.evaluate`` reading the same text as one stream.

    python scripts/score_speed.py --checkpoint runs/.../last.ckpt --text ../shared/data/tinyshakespeare/input.txt

Takes the first ``--lines`` lines of ``--text`` and times, on the same model:

- ``rnnlm.evaluate``'s pass (``stream_losses``): the lines as the data pipeline reads a split by line (each line
  followed by the separator), cut into ``--eval_batch_size`` streams (default: the model's training batch size,
  as ``evaluate`` does) of ``--bptt`` chunks, the state carried;
- ``rnnlm.score``'s work without loading the model (``write_scores``: reading the file, encoding, batching by
  length, the model, one JSON line per item written to /dev/null), for each ``--batch_sizes``.

Each timing is the best of ``--repeats`` runs, evaluate and score taking turns, in CPU time of this process
(``time.process_time``) and in wall time. On a shared machine CPU time is the steadier of the two, with
``--threads 1`` (several threads spin while they wait for each other, which counts as CPU time when other
processes take the cores). Prints a Markdown table: lines/s and tokens/s of each (per CPU second, and per wall
second), and score's tokens/s as a fraction of evaluate's. Tokens are the targets each one predicts: every token
of the lines plus one separator per line, for both.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.evaluate import stream_losses
from rnnlm.score import read_items, write_scores
from rnnlm.sharing.lm import load
from rnnlm.text.streams import ChunkLoader, cut_streams


def timed(fn) -> tuple[float, float, object]:
    """CPU seconds, wall seconds and result of ``fn()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True, help="a text file; its first --lines lines are scored")
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument("--batch_sizes", default="16,64,256")
    p.add_argument("--eval_batch_size", type=int, default=None)
    p.add_argument("--bptt", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work_dir", default="/tmp", help="where the selected lines are written")
    args = p.parse_args()
    keep_freed_memory()
    flush_denormals()
    if args.threads:
        torch.set_num_threads(args.threads)

    trained = load(args.checkpoint)
    with open(args.text, encoding="utf-8") as f:
        lines = [line.removesuffix("\n") for _, line in zip(range(args.lines), f, strict=False)]
    path = os.path.join(args.work_dir, f"score_speed_{os.getpid()}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    eval_batch = args.eval_batch_size or trained.data.get("eval_batch_size") or trained.data.get("batch_size", 32)
    bptt = args.bptt or trained.data.get("bptt", 100)
    ids = trained.encoder.encode(lines)
    loader = ChunkLoader(cut_streams(ids, eval_batch), bptt)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs: dict = {}  # name -> (best CPU seconds, best wall seconds, tokens, loss)

    def record(name, cpu, wall, tokens, loss):
        old = runs.get(name, (float("inf"), float("inf")))
        runs[name] = (min(old[0], cpu), min(old[1], wall), tokens, loss)

    with open(os.devnull, "w") as sink:
        for _ in range(args.repeats):
            cpu, wall, losses = timed(lambda: stream_losses(trained.model, loader, torch.device("cpu")))
            record("evaluate", cpu, wall, loader.tokens_per_epoch, losses["forward"])
            for batch_size in batch_sizes:
                def run(batch_size=batch_size):
                    with open(path, encoding="utf-8") as f:
                        return write_scores(trained, read_items(f), sink, batch_size)

                cpu, wall, totals = timed(run)
                record(batch_size, cpu, wall, totals["tokens"], -totals["logprob"] / totals["tokens"])

    print(f"model: {trained.config.cell} {list(trained.config.layer_sizes)}, vocabulary {trained.config.vocab_size}; "
          f"text: first {len(lines):,} lines of {args.text} ({len(ids):,} tokens with separators); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; best of {args.repeats}")
    print()
    print("| what | batch | CPU s | lines / CPU s | tokens / CPU s | wall s | tokens / wall s | vs evaluate (CPU) "
          "| loss (nats/token) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    eval_rate = runs["evaluate"][2] / runs["evaluate"][0]
    for name, (cpu, wall, tokens, loss) in runs.items():
        what, batch = ("evaluate (streams, state carried)", f"{eval_batch} x {bptt}") if name == "evaluate" else (
            "score (lines, fresh state each)", str(name))
        print(f"| {what} | {batch} | {cpu:.2f} | {len(lines) / cpu:,.0f} | {tokens / cpu:,.0f} | {wall:.2f} | "
              f"{tokens / wall:,.0f} | {tokens / cpu / eval_rate:.2f} | {loss:.4f} |")
    os.remove(path)


if __name__ == "__main__":
    main()
