"""Classifier training speed against the language model's, for the same encoder; masks against packed sequences.

    python scripts/classifier_speed.py [--texts ../shared/data/nsmc-sentiment/train.tsv] [--hidden 512 --layers 2
        --embedding 128 --vocab 2000 --batch_size 64 --lm_batch_size 64 --bptt 64 --steps 20 --rounds 3]

Times full training steps (forward, loss, backward, AdamW step; every parameter trainable) of

- ``lm``: the language model (``LanguageModel.training_step``: contiguous ``[B, bptt]`` chunks, carried state);
- ``masks, bucketed``: the classifier as ``rnnlm.classify`` trains it (``TextClassifier``'s forward): batches of
  texts of similar length from :class:`~rnnlm.data.classifier.BucketLoader`, right padding, masked pooling;
- ``masks, random batches``: the same with batches drawn at random (``bucket_size=1``): the padding that bucketing
  saves;
- ``packed, bucketed`` / ``packed, random batches``: the classifier's encoder run on ``pack_padded_sequence``
  (the recurrent stack skips the padding), pooled the same way.

Texts get the lengths of real texts (``--texts``: a file with a ``document`` or ``text`` column, one review per row;
character-level lengths, cut to ``--max_length``) and random ids. Tokens count the text tokens read (the
classifier's padding and separator are not counted; the LM's tokens are its targets). The variants run in turn,
``--rounds`` times, and each reports the median over rounds of tokens per wall-clock second and per CPU-second of
this process (the latter is steadier on a shared machine). Prints one JSON line per variant, then the ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnlm.data.classifier import BucketLoader
from rnnlm.network.classifier import concat_pool
from rnnlm.network.config import RNNLMConfig
from rnnlm.training.classifier import TextClassifier
from rnnlm.training.lm import LanguageModel


def text_lengths(path: str | None, n: int, max_length: int, seed: int) -> np.ndarray:
    if path and Path(path).is_file():
        csv.field_size_limit(sys.maxsize)
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
            lengths = [len(r.get("document") or r.get("text") or "") for r in rows]
        lengths = np.array([x for x in lengths if x > 0])
    else:  # NSMC-like: short reviews, mean ~36 characters
        lengths = np.random.default_rng(seed).gamma(1.6, 22, size=n).astype(int) + 1
    return np.minimum(lengths[np.random.default_rng(seed).permutation(len(lengths))[:n]], max_length)


def _timed(step, batches) -> tuple[float, float, int]:
    tokens = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        tokens += step(batch)
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


class LMVariant:
    name = "lm"

    def __init__(self, config: RNNLMConfig, args) -> None:
        self.module = LanguageModel(config)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-3)
        self.ids = torch.randint(0, config.vocab_size, (args.steps, args.lm_batch_size, args.bptt + 1))

    def step(self, chunk) -> int:
        x, y = chunk[:, :-1], chunk[:, 1:]
        out = self.module.model(x, y, self.module.carry.get("train", x.size(0)))
        self.module.carry.put("train", out.state)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        return y.numel()

    def batches(self, warmup: bool):
        return [self.ids[i] for i in range(2 if warmup else len(self.ids))]


class ClassifierVariant:
    def __init__(self, config: RNNLMConfig, args, lengths: np.ndarray, bucketed: bool, packed: bool) -> None:
        self.name = f"{'packed' if packed else 'masks'}, {'bucketed' if bucketed else 'random batches'}"
        self.module = TextClassifier(config, [0, 1], gradual_unfreezing=False)
        self.model = self.module.model
        self.packed = packed
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        tokens = [rng.integers(2, config.vocab_size, size=int(n)) for n in lengths]
        labels = list(rng.integers(0, 2, size=len(tokens)))
        self.loader = BucketLoader(tokens, labels, 1, args.batch_size, seed=0,
                                   bucket_size=args.bucket_size if bucketed else 1)
        self.steps = args.steps
        self.padding = self.loader.padding_fraction

    def _packed_logits(self, ids, lengths):
        encoder = self.model.encoder
        x = encoder.drop_in(encoder._embed(ids, "forward"))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(encoder.rnn(packed)[0], batch_first=True, total_length=ids.size(1))
        return self.model.head(concat_pool(states, lengths))

    def step(self, batch) -> int:
        if self.packed:
            logits = self._packed_logits(batch.ids, batch.lengths)
            loss = F.cross_entropy(logits, batch.labels)
        else:
            loss = F.cross_entropy(self.module(batch.ids, batch.lengths), batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return int(batch.lengths.sum()) - len(batch.lengths)

    def batches(self, warmup: bool):
        it = iter(self.loader)
        return [next(it) for _ in range(2 if warmup else self.steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", default="../shared/data/nsmc-sentiment/train.tsv")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embedding", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64, help="texts per classifier batch")
    parser.add_argument("--bucket_size", type=int, default=50)
    parser.add_argument("--lm_batch_size", type=int, default=64, help="streams per LM batch")
    parser.add_argument("--bptt", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default="lm,masks-bucketed,masks-random,packed-bucketed,packed-random")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = RNNLMConfig(args.vocab, num_layers=args.layers, embedding_dim=args.embedding, hidden_size=args.hidden)
    lengths = text_lengths(args.texts, args.batch_size * args.steps * 4, args.max_length, 0)
    wanted = args.variants.split(",")
    variants = []
    for key in wanted:
        if key == "lm":
            variants.append(LMVariant(config, args))
        else:
            packing, batching = key.split("-")
            variants.append(ClassifierVariant(config, args, lengths, batching == "bucketed", packing == "packed"))
    results: dict[str, dict] = {v.name: {"wall": [], "cpu": []} for v in variants}
    for v in variants:
        _timed(v.step, v.batches(warmup=True))
    for _ in range(args.rounds):
        for v in variants:
            wall, cpu, tokens = _timed(v.step, v.batches(warmup=False))
            results[v.name]["wall"].append(tokens / wall)
            results[v.name]["cpu"].append(tokens / cpu)
    summary = {}
    for v in variants:
        row = {"variant": v.name, "tokens_per_s": round(statistics.median(results[v.name]["wall"])),
               "tokens_per_cpu_s": round(statistics.median(results[v.name]["cpu"])),
               "padding": round(getattr(v, "padding", 0.0), 3), "threads": torch.get_num_threads(),
               "config": {"hidden": args.hidden, "layers": args.layers, "embedding": args.embedding,
                          "vocab": args.vocab, "batch_size": args.lm_batch_size if v.name == "lm" else args.batch_size,
                          **({"bptt": args.bptt} if v.name == "lm" else {})}}
        summary[v.name] = row
        print(json.dumps(row))
    if "lm" in summary:
        lm = summary["lm"]
        ratios = {name: {"wall": round(row["tokens_per_s"] / lm["tokens_per_s"], 2),
                         "cpu": round(row["tokens_per_cpu_s"] / lm["tokens_per_cpu_s"], 2)}
                  for name, row in summary.items() if name != "lm"}
        print(json.dumps({"classifier / lm": ratios}))


if __name__ == "__main__":
    main()
