"""Evaluate a checkpoint on a split: ``python -m rnnlm.evaluate --checkpoint PATH --split test``.

Prints loss (nats/token), perplexity, bits per token, per character and per byte readably, then the same as one
JSON object on the last line. The hidden state is carried across chunks, so the result barely depends on
``--bptt``; ``--batch_size`` sets how many streams the split is cut into.

``--pointer_window N`` adds the continuous pointer of Grave et al. (2017) (see ``rnnlm/network/pointer.py``) with
``--pointer_theta`` and ``--pointer_lambda``, and reports perplexity with and without it from the same pass.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from rnnlm.commands import ArgumentParser, add_device_option, resolve_device
from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.data.lm import LMDataModule
from rnnlm.errors import ConfigError, run_main
from rnnlm.network.lm import DIRECTIONS, RNNLM
from rnnlm.network.pointer import ContinuousPointer
from rnnlm.sharing.lm import load
from rnnlm.text.sources import DataError
from rnnlm.text.streams import ChunkLoader
from rnnlm.training.lm import LN2, loss_metrics

# AWD-LSTM's pointer settings for WikiText-2 (its README): theta 0.662, lambda 0.1279 (window 3785).
DEFAULT_THETA = 0.662
DEFAULT_LAMBDA = 0.1279


@torch.no_grad()
def stream_losses(
    model: RNNLM, loader: ChunkLoader, device: torch.device, pointer: ContinuousPointer | None = None
) -> dict[str, float]:
    """Mean loss (nats/token) of each direction over ``loader``, the state carried from chunk to chunk; with a
    ``pointer``, also the forward direction's loss with it (``"pointer"``), from the same pass."""
    model.eval()
    directions = DIRECTIONS if model.config.bidirectional else DIRECTIONS[:1]
    states: dict = dict.fromkeys(directions)
    totals = {name: torch.zeros((), dtype=torch.float64, device=device)
              for name in (*directions, *(("pointer",) if pointer is not None else ()))}
    if pointer is not None:
        pointer.reset()
    count = 0
    for batch in loader:
        batch = [t.to(device) for t in batch]
        for i, direction in enumerate(directions):
            x, y = batch[2 * i], batch[2 * i + 1]
            if pointer is not None and direction == "forward":
                out = model(x, state=states[direction])
                log_probs = F.log_softmax(out.logits.float(), dim=-1).gather(-1, y[..., None]).squeeze(-1)
                totals[direction] -= log_probs.sum()
                totals["pointer"] -= pointer.log_probs(out.outputs, y, log_probs).sum()
            else:
                out = model(x, y, states[direction], direction)
                totals[direction] += out.loss.double() * y.numel()
            states[direction] = out.state
        count += batch[1].numel()
    return {name: total.item() / count for name, total in totals.items()}


def evaluation_data(trained_on: dict, source: str | None = None, config_name: str | None = None,
                    batch_size: int | None = None, bptt: int | None = None) -> LMDataModule:
    """The data module of an evaluation: the model's own data (``trained_on``, its saved data settings), or
    ``source`` read with the model's settings (text field, splitting) but not its training source's own: that
    source's Hub configuration and revision would be looked for in the new one."""
    settings = dict(trained_on)
    if source is not None:
        settings.update(source=source, config_name=config_name, revision=None)
    return LMDataModule.from_hparams(settings, eval_batch_size=batch_size, bptt=bptt)


def evaluate(
    checkpoint: str,
    split: str = "test",
    source: str | None = None,
    config_name: str | None = None,
    batch_size: int | None = None,
    bptt: int | None = None,
    device: str | torch.device = "auto",
    pointer_window: int | None = None,
    pointer_theta: float = DEFAULT_THETA,
    pointer_lambda: float = DEFAULT_LAMBDA,
    *,
    accelerator: str | None = None,
) -> dict:
    """Loss, perplexity and bits per character of ``checkpoint`` on ``split`` (of its own data or ``source``).

    With ``pointer_window`` the forward model is also evaluated with the continuous pointer (``pointer_*`` keys).
    ``device`` is what ``--device`` takes (see :func:`rnnlm.commands.resolve_device`); ``accelerator`` is its old
    name, still accepted.
    """
    device = resolve_device(device if accelerator is None else accelerator)
    pointer = None
    if pointer_window is not None:
        pointer = ContinuousPointer(pointer_window, pointer_theta, pointer_lambda)
    trained = load(checkpoint, map_location=device)
    if pointer is not None and trained.config.bidirectional:
        raise ConfigError("The continuous pointer is for (forward) language models; this one is bidirectional.")
    data = evaluation_data(trained.data, source, config_name, batch_size, bptt)
    data.use_tokenizer(trained.tokenizer)
    if split not in data.corpus.splits:
        raise DataError(f"No split {split!r} in {data.hparams.source!r}; it has {sorted(data.corpus.splits)}.")
    loader = data.loader(split)
    losses = stream_losses(trained.model, loader, device, pointer)
    chars, nbytes = data.chars_per_token(split), data.bytes_per_token(split)
    loss = sum(losses[d] for d in DIRECTIONS if d in losses) / sum(d in losses for d in DIRECTIONS)
    result = {
        "checkpoint": checkpoint,
        "source": data.hparams.source,
        "split": split,
        "tokens": loader.tokens_per_epoch,
        **loss_metrics(loss, chars),
        "bits_per_byte": loss / LN2 / nbytes,
    }
    named = {direction: losses[direction] for direction in DIRECTIONS if "backward" in losses}
    if pointer is not None:
        named["pointer"] = losses["pointer"]
    for prefix, value in named.items():
        result.update({f"{prefix}_{k}": v for k, v in loss_metrics(value, chars).items() if k != "bits_per_token"})
    result.update({"batch_size": loader.rows.shape[0], "bptt": loader.bptt})
    if pointer is not None:
        result.update({
            "pointer_window": pointer.window,
            "pointer_theta": pointer.theta,
            "pointer_lambda": pointer.lam,
        })
    return result


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m rnnlm.evaluate``."""
    p = ArgumentParser(prog="python -m rnnlm.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a .ckpt written by rnnlm.fit, a folder written by rnnlm.export, or a Hub model id OWNER/NAME")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--source", default=None, help="evaluate on another data source (default: the training data)")
    p.add_argument("--config_name", default=None, help="config of a Hub dataset given with --source")
    p.add_argument("--batch_size", type=int, default=None, help="number of streams (default: as in training)")
    p.add_argument("--bptt", type=int, default=None, help="chunk length (default: as in training)")
    add_device_option(p, "--accelerator")  # --accelerator: the old name (auto, cpu, cuda or gpu still work)
    p.add_argument("--pointer_window", type=int, default=None,
                   help="add a continuous pointer over the last N tokens of each stream (Grave et al. 2017)")
    p.add_argument("--pointer_theta", type=float, default=DEFAULT_THETA,
                   help=f"the pointer attention's inverse temperature (default {DEFAULT_THETA})")
    p.add_argument("--pointer_lambda", type=float, default=DEFAULT_LAMBDA,
                   help=f"the pointer's share of the mixed distribution (default {DEFAULT_LAMBDA})")
    for old in ("window", "theta", "lambda"):
        p.add_argument(f"--cache_{old}", dest=f"renamed_cache_{old}", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    for old in ("window", "theta", "lambda"):
        if getattr(args, f"renamed_cache_{old}") is not None:
            p.error(f"--cache_{old} is now --pointer_{old} (the continuous cache is called the continuous pointer, "
                    "so that 'cache' means only the token cache)")
    keep_freed_memory()
    flush_denormals()
    result = evaluate(args.checkpoint, args.split, args.source, args.config_name, args.batch_size, args.bptt,
                      args.device, args.pointer_window, args.pointer_theta, args.pointer_lambda)
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
        for direction in DIRECTIONS:
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


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
