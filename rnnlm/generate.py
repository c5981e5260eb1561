"""Generate text from a checkpoint: ``python -m rnnlm.generate --checkpoint PATH --prompt TEXT``.

The prompt primes the hidden state in one pass, then tokens are sampled one at a time.
"""

from __future__ import annotations

import argparse

import torch

from rnnlm.errors import run_main
from rnnlm.inference import load


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m rnnlm.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a .ckpt written by rnnlm.fit, a folder written by rnnlm.export, or a Hub model id OWNER/NAME")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = always the most likely token")
    p.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--seed", type=int, default=None, help="makes the output reproducible")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        p.error("--max_new_tokens must be >= 0")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k <= 0:
        p.error("--top_k must be a positive integer")

    text = load(args.checkpoint, map_location=args.device).sample(
        args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed
    )
    print(args.prompt + text)
    return text


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
