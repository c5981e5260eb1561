"""Evaluate a checkpoint on a split: ``python -m rnnlm.evaluate --checkpoint PATH --split test``.

Prints loss (nats/token), perplexity, bits per token and bits per character readably, then the same as one
JSON object on the last line. The hidden state is carried across chunks, so the result barely depends on
``--bptt``; ``--batch_size`` sets how many streams the split is cut into.

``--pointer_window N`` adds the continuous pointer of Grave et al. (2017) (see ``rnnlm/pointer.py``) with
``--pointer_theta`` and ``--pointer_lambda``, and reports perplexity with and without it from the same pass.
"""

from __future__ import annotations

import argparse
import json
import math

import lightning as L
import torch
import torch.nn.functional as F

from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.data import LMDataModule
from rnnlm.lm import LanguageModel
from rnnlm.model import RNNLM, detach_state
from rnnlm.pointer import ContinuousPointer
from rnnlm.streams import ChunkLoader

# AWD-LSTM's pointer settings for WikiText-2 (its README): theta 0.662, lambda 0.1279 (window 3785).
DEFAULT_THETA = 0.662
DEFAULT_LAMBDA = 0.1279


@torch.no_grad()
def pointer_losses(
    model: RNNLM, loader: ChunkLoader, pointer: ContinuousPointer, device: torch.device
) -> tuple[float, float]:
    """Mean loss (nats/token) of the forward model over ``loader`` without and with ``pointer``, in one pass."""
    model.eval()
    state, plain, mixed, count = None, 0.0, 0.0, 0
    pointer.reset()
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        top, state = model.recurrent(x, state)
        state = detach_state(state)
        log_probs = F.log_softmax(model.decode(model.head_input(top)).float(), dim=-1)
        target_lp = log_probs.gather(-1, y[..., None]).squeeze(-1)
        plain -= target_lp.sum().item()
        mixed -= pointer.log_probs(top, y, target_lp).sum().item()
        count += y.numel()
    return plain / count, mixed / count


def evaluate(
    checkpoint: str,
    split: str = "test",
    source: str | None = None,
    config_name: str | None = None,
    batch_size: int | None = None,
    bptt: int | None = None,
    accelerator: str = "auto",
    pointer_window: int | None = None,
    pointer_theta: float = DEFAULT_THETA,
    pointer_lambda: float = DEFAULT_LAMBDA,
) -> dict:
    """Loss, perplexity and bits per character of ``checkpoint`` on ``split`` (of its own data or ``source``).

    With ``pointer_window`` the forward model is also evaluated with a continuous pointer (``pointer_*`` keys).
    """
    pointer = ContinuousPointer(pointer_window, pointer_theta, pointer_lambda) if pointer_window is not None else None
    model = LanguageModel.from_checkpoint(checkpoint)
    data = LMDataModule.from_hparams(
        model.datamodule_hparams, source=source, config_name=config_name, eval_batch_size=batch_size, bptt=bptt
    )
    data.use_tokenizer(model.encoder.tokenizer)
    if split not in data.corpus.splits:
        raise ValueError(f"No split {split!r} in {data.hparams.source!r}; it has {sorted(data.corpus.splits)}.")
    loader = data.loader(split)
    model.chars_per_token["test"] = data.chars_per_token(split)
    with_pointer: dict = {}
    if pointer is not None:
        if model.model.bidirectional:
            raise ValueError("The continuous pointer is for (forward) language models; this one is bidirectional.")
        use_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if use_cuda else "cpu")
        loss, pointer_loss = pointer_losses(model.model.to(device), loader, pointer, device)
        metrics = {"test/bpc": loss / math.log(2) / data.chars_per_token(split)}
        with_pointer = {
            "pointer_loss": pointer_loss,
            "pointer_ppl": math.exp(pointer_loss),
            "pointer_bpc": pointer_loss / math.log(2) / data.chars_per_token(split),
            "pointer_window": pointer.window,
            "pointer_theta": pointer.theta,
            "pointer_lambda": pointer.lam,
        }
    else:
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
        **with_pointer,
    }


class _Renamed(argparse.Action):
    """A flag that was renamed: using it stops with an error that names the new flag."""

    def __init__(self, *args, new: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is now {self.new} (the continuous cache is called the continuous pointer).")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rnnlm.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a .ckpt file written by rnnlm.fit")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--source", default=None, help="evaluate on another data source (default: the training data)")
    p.add_argument("--config_name", default=None, help="config of a Hub dataset given with --source")
    p.add_argument("--batch_size", type=int, default=None, help="number of streams (default: as in training)")
    p.add_argument("--bptt", type=int, default=None, help="chunk length (default: as in training)")
    p.add_argument("--accelerator", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pointer_window", type=int, default=None,
                   help="add a continuous pointer over the last N tokens of each stream (Grave et al. 2017)")
    p.add_argument("--pointer_theta", type=float, default=DEFAULT_THETA,
                   help=f"the pointer attention's inverse temperature (default {DEFAULT_THETA})")
    p.add_argument("--pointer_lambda", type=float, default=DEFAULT_LAMBDA,
                   help=f"the pointer's share of the mixed distribution (default {DEFAULT_LAMBDA})")
    for name in ("window", "theta", "lambda"):  # the flags' former names, refused with their new ones
        p.add_argument(f"--cache_{name}", nargs="?", action=_Renamed, new=f"--pointer_{name}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    keep_freed_memory()
    flush_denormals()
    result = evaluate(args.checkpoint, args.split, args.source, args.config_name, args.batch_size, args.bptt,
                      args.accelerator, args.pointer_window, args.pointer_theta, args.pointer_lambda)
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
    if "pointer_loss" in result:
        change = 100 * (result["pointer_ppl"] / result["ppl"] - 1)
        print(
            f"  with the continuous pointer (window {result['pointer_window']}, theta {result['pointer_theta']}, "
            f"lambda {result['pointer_lambda']}):\n"
            f"  loss            {result['pointer_loss']:.4f} nats/token\n"
            f"  perplexity      {result['pointer_ppl']:.2f} ({change:+.1f}% vs {result['ppl']:.2f} without)\n"
            f"  bits per char   {result['pointer_bpc']:.4f}"
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
