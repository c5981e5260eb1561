"""Generate text from a checkpoint: ``python -m rnnlm.generate --checkpoint PATH --prompt TEXT``.

The prompt primes the hidden state in one pass (from a document boundary), then tokens are sampled one at a
time. Each step's distribution is divided by ``--temperature`` (0 = always the most likely token), then cut to
the ``--top_k`` most likely tokens, then to the nucleus of ``--top_p`` (the smallest set of most likely tokens
whose probability reaches p): the order of Hugging Face transformers. ``--num_samples N`` samples N texts after
the same prompt as one batch; ``--stop_at_separator`` ends each text at the document separator; ``--json``
writes one JSON object per text. Without ``--seed`` a seed is drawn, and reported with ``--json``, so that any
output can be made again.
"""

from __future__ import annotations

import argparse
import json
import secrets

from rnnlm.commands import ArgumentParser, add_device_option, resolve_device
from rnnlm.errors import run_main
from rnnlm.sharing.lm import Sample, load


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m rnnlm.generate``."""
    p = ArgumentParser(prog="python -m rnnlm.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a .ckpt written by rnnlm.fit, a folder written by rnnlm.export, or a Hub model id OWNER/NAME")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = always the most likely token")
    p.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling: only from the smallest set of most likely tokens whose probability "
                        "reaches p (0 < p <= 1)")
    p.add_argument("--num_samples", type=int, default=1, help="texts to sample after the prompt, as one batch")
    p.add_argument("--stop_at_separator", action="store_true",
                   help="end each text at the document separator (<eos>) instead of after --max_new_tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per text (prompt, text, tokens, seed, ...)")
    p.add_argument("--seed", type=int, default=None, help="makes the output reproducible (default: drawn)")
    add_device_option(p)
    return p


def main(argv: list[str] | None = None) -> list[Sample]:
    p = parser()
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        p.error("--max_new_tokens must be >= 0")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k <= 0:
        p.error("--top_k must be a positive integer")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    if args.num_samples <= 0:
        p.error("--num_samples must be a positive integer")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    texts = load(args.checkpoint, map_location=resolve_device(args.device)).samples(
        args.prompt, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=seed, stop_at_separator=args.stop_at_separator,
    )
    for i, sample in enumerate(texts):
        if args.json:
            print(json.dumps({
                "index": i,
                "prompt": sample.prompt,
                "text": sample.text,
                "tokens": sample.tokens,
                "stopped_at_separator": sample.stopped_at_separator,
                "seed": seed,
                "num_samples": args.num_samples,
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_k": args.top_k,
                "top_p": args.top_p,
                "checkpoint": args.checkpoint,
            }, ensure_ascii=False), flush=True)
        else:
            if len(texts) > 1:
                print(f"--- sample {i + 1} of {len(texts)} ---")
            print(sample.prompt + sample.text, flush=True)
    return texts


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
