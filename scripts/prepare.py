"""Prepare a config's data without training: load, train the tokenizer, encode and cache every split.

    python scripts/prepare.py --config configs/wikitext2_word_lstm.yaml --data.source ../shared/data/wikitext-2

Useful on a login node before a cluster job, and to time data preparation. Takes the same flags as
``rnnlm.fit``; prints the cache summary, the time each stage took, the encoding throughput and the peak memory
(resident set) of this process and of its encoding workers.
"""

from __future__ import annotations

import resource
import sys
import time

from rnnlm.data.lm import LMDataModule
from rnnlm.training.cli import LanguageModelCLI
from rnnlm.training.lm import LanguageModel


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    cli = LanguageModelCLI(LanguageModel, LMDataModule, run=False, args=argv, save_config_callback=None)
    data = cli.datamodule
    built = time.perf_counter()  # the tokenizer is built while the CLI links the vocabulary size
    data.prepare_data()
    encoded = time.perf_counter()
    data.setup("fit")
    print(f"load + tokenizer: {built - start:.1f}s   encode + cache: {encoded - built:.1f}s   "
          f"total: {time.perf_counter() - start:.1f}s")
    for split, hit in data.cache_hits.items():
        stats = data.stats[split]
        rate = stats["bytes"] / 1e6 / max(stats["seconds"], 1e-9)
        print(f"{split}: {stats['tokens']:,} tokens from {stats['bytes'] / 1e6:,.1f} MB, "
              f"cache {'hit' if hit else 'miss'}, encoded by {stats['encoder']} with {stats.get('workers', 1)} "
              f"process(es) in {stats['seconds']}s ({rate:,.1f} MB/s)")
    # ru_maxrss is in KiB on Linux; the children are the encoding workers (forked, so they share pages with this one).
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"peak resident memory: {own:.2f} GiB (this process), {workers:.2f} GiB (largest worker)")


if __name__ == "__main__":
    main(sys.argv[1:])
