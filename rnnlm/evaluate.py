"""Evaluate a checkpoint on a split: ``python -m rnnlm.evaluate --checkpoint PATH --split test``.

Prints loss (nats/token), perplexity, bits per token and bits per character readably, then the same as one
JSON object on the last line. The hidden state is carried across chunks, so the result barely depends on
``--bptt``; ``--batch_size`` sets how many streams the split is cut into.
"""

from __future__ import annotations

import argparse
import json
import math

import lightning as L
import torch

from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.data import LMDataModule
from rnnlm.lm import LanguageModel


def evaluate(
    checkpoint: str,
    split: str = "test",
    source: str | None = None,
    config_name: str | None = None,
    batch_size: int | None = None,
    bptt: int | None = None,
    accelerator: str = "auto",
) -> dict:
    """Loss, perplexity and bits per character of ``checkpoint`` on ``split`` (of its own data or ``source``)."""
    model = LanguageModel.from_checkpoint(checkpoint)
    data = LMDataModule.from_hparams(
        model.datamodule_hparams, source=source, config_name=config_name, eval_batch_size=batch_size, bptt=bptt
    )
    data.use_tokenizer(model.encoder.tokenizer)
    if split not in data.corpus.splits:
        raise ValueError(f"No split {split!r} in {data.hparams.source!r}; it has {sorted(data.corpus.splits)}.")
    loader = data.loader(split)
    model.chars_per_token["test"] = data.chars_per_token(split)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False)
    metrics = trainer.test(model, dataloaders=loader, verbose=False)[0]
    loss = metrics["test/loss"]
    return {
        "checkpoint": checkpoint,
        "source": data.hparams.source,
        "split": split,
        "tokens": loader.tokens_per_epoch,
        "loss": loss,
        "ppl": math.exp(loss),
        "bits_per_token": loss / math.log(2),
        "bpc": metrics.get("test/bpc"),
        "bits_per_byte": loss / math.log(2) / data.bytes_per_token(split),
        **{
            f"{direction}_{name}": metrics[f"test/{direction}/{key}"]
            for direction in ("forward", "backward")
            for name, key in (("loss", "loss"), ("ppl", "ppl"), ("bpc", "bpc"))
            if f"test/{direction}/{key}" in metrics
        },
        "batch_size": loader.rows.shape[0],
        "bptt": loader.bptt,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rnnlm.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a .ckpt file written by rnnlm.fit")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--source", default=None, help="evaluate on another data source (default: the training data)")
    p.add_argument("--config_name", default=None, help="config of a Hub dataset given with --source")
    p.add_argument("--batch_size", type=int, default=None, help="number of streams (default: as in training)")
    p.add_argument("--bptt", type=int, default=None, help="chunk length (default: as in training)")
    p.add_argument("--accelerator", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    keep_freed_memory()
    flush_denormals()
    result = evaluate(args.checkpoint, args.split, args.source, args.config_name, args.batch_size, args.bptt,
                      args.accelerator)
    print(
        f"{result['split']} of {result['source']}: {result['tokens']:,} tokens\n"
        f"  loss            {result['loss']:.4f} nats/token\n"
        f"  perplexity      {result['ppl']:.2f}\n"
        f"  bits per token  {result['bits_per_token']:.4f}\n"
        f"  bits per char   {result['bpc']:.4f}\n"
        f"  bits per byte   {result['bits_per_byte']:.4f}"
    )
    if "backward_loss" in result:
        print("  (loss is the mean of the two directions)")
        for direction in ("forward", "backward"):
            print(f"  {direction:<8} loss {result[direction + '_loss']:.4f}  ppl {result[direction + '_ppl']:.2f}  "
                  f"bpc {result[direction + '_bpc']:.4f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
