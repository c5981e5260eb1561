"""Score text with a trained model: ``python -m rnnlm.score --checkpoint PATH --input FILE`` (``-`` reads stdin).

Writes one JSON object per item on stdout, in input order, and nothing else there, so that the output is valid
JSON lines (``jq``, ``pandas.read_json(lines=True)``); a summary goes to stderr. An item is a line (``--per
line``, the default), a paragraph (``--per paragraph``: a run of non-blank lines, its newlines kept) or the whole
input (``--per document``):

    {"index": 0, "line": 1, "tokens": 36, "characters": 36, "logprob": -58.3, "ppl": 5.05, "bpc": 2.34}

Each item is read as a document of its own, the way the training data is read: from a fresh state at the
document separator, the model predicts the item's tokens and then the separator that ends it. So ``tokens``
counts the item's tokens plus that separator, ``characters`` counts its characters plus one for the separator
(it stands for the newline), ``logprob`` is the sum of the log-probabilities of those tokens in nats, ``ppl =
exp(-logprob / tokens)`` and ``bpc = -logprob / ln 2 / characters``: the definitions of ``rnnlm.evaluate``.
The summary is token-weighted over all items, as ``evaluate``'s loss over a split. ``--end newline`` predicts a
newline after each item instead of the separator (for a model trained on whole documents, in which lines end
with a newline and the separator comes only at the end of a document), ``--end none`` nothing.

Items are scored in batches (``--batch_size``): sorted by length, padded at the end, the padding masked out of
every sum. A recurrent model reads left to right, so padding after an item never reaches its scores: an item
gets the same numbers alone as in any batch (up to float rounding). A bidirectional model is scored by both of
its language models and reports their mean, as ``rnnlm.evaluate`` does, with ``forward_logprob`` and
``backward_logprob``; ``--direction`` picks one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import torch
from tqdm import tqdm

from rnnlm.commands import ArgumentParser, add_device_option, close_input, open_input, resolve_device
from rnnlm.cpu import flush_denormals, keep_freed_memory
from rnnlm.errors import ConfigError, UserError, run_main
from rnnlm.network.lm import DIRECTIONS, RNNLM, map_state, state_batch_size
from rnnlm.sharing.lm import TrainedModel, load
from rnnlm.text.sources import DataError

PER = ("line", "paragraph", "document")
ENDS = ("separator", "newline", "none")
LN2 = math.log(2)
DEFAULT_BATCH_SIZE = 64
# Logits computed per pass (B x T x V floats): bounds memory for large vocabularies and long items.
LOGITS_PER_PASS = 1 << 24
MAX_STEPS_PER_PASS = 1024
# Items read, sorted and scored together before their results are written: bounds memory on endless inputs.
WINDOW_ITEMS = 16384
WINDOW_CHARACTERS = 1 << 26


@dataclass(frozen=True)
class Item:
    """A piece of input to score: its number (from 0), the input line it starts on (from 1), its text."""

    index: int
    line: int
    text: str


class Undecodable:
    """Where the input stopped being UTF-8 (set by :func:`decoded_lines`): the items before it are still scored
    and written, and the command then says where it stopped."""

    def __init__(self) -> None:
        self.line: int | None = None
        self.error: UnicodeDecodeError | None = None


def decoded_lines(stream: TextIO, stop: Undecodable) -> Iterator[str]:
    """The lines of a stream of :func:`~rnnlm.commands.open_input`, decoded one at a time: a text stream decodes
    blocks of several kilobytes, so the lines before a bad byte in the same block would be lost with it. At an
    undecodable line the lines end, and ``stop`` says which."""
    raw = getattr(stream, "buffer", None)
    if raw is None:  # a stream of text already (standard input replaced by a StringIO)
        yield from stream
        return
    for n, line in enumerate(raw, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            stop.line, stop.error = n, err
            return
        # Universal newlines, as the text stream reads them: \r\n and a lone \r end a line too.
        yield from text.replace("\r\n", "\n").replace("\r", "\n").splitlines(keepends=True)


def read_items(lines: Iterable[str], per: str = "line", stop: Undecodable | None = None) -> Iterator[Item]:
    """The items of an input given as lines (each with its newline, as a text file iterates). When the lines end
    at an undecodable byte (``stop``), a paragraph or document they end inside is left out: it is incomplete."""
    if per not in PER:
        raise ConfigError(f"Unknown --per {per!r}; choose one of {', '.join(PER)}.")
    if per == "line":
        for n, line in enumerate(lines):
            yield Item(n, n + 1, line.removesuffix("\n"))
    elif per == "paragraph":
        index, start, block = 0, 0, []
        for n, line in enumerate(lines, start=1):
            if line.strip():
                start = start if block else n
                block.append(line.removesuffix("\n"))
            elif block:
                yield Item(index, start, "\n".join(block))
                index, block = index + 1, []
        if block and not (stop and stop.line):
            yield Item(index, start, "\n".join(block))
    else:
        text = "".join(lines)
        if text and not (stop and stop.line):
            yield Item(0, 1, text)


@torch.no_grad()
def log_probs(
    model: RNNLM,
    sequences: Sequence[np.ndarray],
    separator: int,
    direction: str = "forward",
    batch_size: int = DEFAULT_BATCH_SIZE,
    predict_separator: bool = True,
    on_tokens: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The log-probability in nats of each id sequence read as a document: from a fresh state at ``separator``,
    its ids and then (with ``predict_separator``) the separator that ends it are predicted; a backward model
    reads the ids right to left. Float64 ``[N]``.

    Sequences are batched by length (longest first), padded at the end and masked; rows whose sequence has
    ended leave the batch, so padding costs little and never changes a result. ``on_tokens`` is told how many
    tokens each pass predicted (progress inside a long sequence, which may take minutes).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    result = np.empty(len(sequences), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [sequences[i] for i in rows]
        result[rows] = _batch_log_probs(model, batch, separator, direction, predict_separator, device, on_tokens)
    return result


def _batch_log_probs(
    model: RNNLM,
    sequences: list[np.ndarray],
    separator: int,
    direction: str,
    predict_separator: bool,
    device: torch.device,
    on_tokens: Callable[[int], None] | None = None,
) -> np.ndarray:
    """:func:`log_probs` of one batch of sequences sorted longest first."""
    lengths = torch.tensor([len(s) + int(predict_separator) for s in sequences])  # targets per row
    width = int(lengths[0])
    # Row b is [separator, ids..., separator, padding...]: inputs are columns [0, width), targets [1, width].
    ids = np.full((len(sequences), width + 1), separator, dtype=np.int64)
    for b, seq in enumerate(sequences):
        ids[b, 1 : len(seq) + 1] = seq if direction == "forward" else seq[::-1]
    ids_t = torch.from_numpy(ids).to(device)
    lengths = lengths.to(device)
    totals = torch.zeros(len(sequences), dtype=torch.float64, device=device)
    steps = max(1, min(MAX_STEPS_PER_PASS, LOGITS_PER_PASS // (len(sequences) * model.config.vocab_size)))
    state = None
    for t in range(0, width, steps):
        # Sorted longest first, so the rows still reading at step t are the first ones.
        active = int((lengths > t).sum())
        if state is not None and active < state_batch_size(state):
            state = map_state(lambda s, n=active: s[:, :n].contiguous(), state)
        end = min(t + steps, width)
        x, y = ids_t[:active, t:end], ids_t[:active, t + 1 : end + 1]
        token_log_probs, state = model.log_probs(x, y, state, direction)
        inside = torch.arange(t, end, device=device) < lengths[:active, None]
        totals[:active] += token_log_probs.double().masked_fill(~inside, 0.0).sum(dim=1)
        if on_tokens is not None:
            on_tokens(int((lengths[:active] - t).clamp(max=end - t).sum()))
    return totals.cpu().numpy()


def scores(
    trained: TrainedModel,
    texts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    directions: Sequence[str] | None = None,
    end: str = "separator",
    on_tokens: Callable[[int], None] | None = None,
) -> list[dict]:
    """Tokens, characters, log-probability, perplexity and bits per character of each of ``texts``, each read
    as a document from a fresh state (see the module's documentation for the definitions).

    ``directions`` defaults to both for a bidirectional model (``logprob`` is then their mean, and each one's is
    reported as ``forward_logprob`` / ``backward_logprob``), else to the forward one. ``end`` is what is
    predicted after each text: the document separator (``"separator"``), a newline (``"newline"``: the text
    continues with "\n", for models trained on whole documents whose lines end with one) or nothing (``"none"``).
    ``ppl`` and ``bpc`` are None for an item with no token (or character) to predict.
    """
    if end not in ENDS:
        raise ConfigError(f"Unknown end {end!r}; choose one of {', '.join(ENDS)}.")
    directions = tuple(directions or default_directions(trained))
    check_directions(trained, directions)
    if end == "newline":
        texts = [text + "\n" for text in texts]
    extra = 1 if end == "separator" else 0  # the separator: one token, counted as one character
    model = trained.model
    was_training = model.training
    model.eval()
    try:
        sequences = trained.encoder.encode_each(texts)
        per_direction = {d: log_probs(model, sequences, trained.encoder.separator, d, batch_size, bool(extra),
                                      on_tokens).tolist() for d in directions}
    finally:
        model.train(was_training)
    results = []
    for i, (text, seq) in enumerate(zip(texts, sequences, strict=True)):
        tokens, characters = len(seq) + extra, len(text) + extra
        logprob = sum(per_direction[d][i] for d in directions) / len(directions)
        result = {
            "tokens": tokens,
            "characters": characters,
            "logprob": logprob,
            "ppl": _exp(-logprob / tokens) if tokens else None,
            "bpc": -logprob / LN2 / characters if characters else None,
        }
        if len(directions) > 1:
            result.update({f"{d}_logprob": per_direction[d][i] for d in directions})
        results.append(result)
    return results


def default_directions(trained: TrainedModel) -> tuple[str, ...]:
    return DIRECTIONS if trained.config.bidirectional else DIRECTIONS[:1]


def check_directions(trained: TrainedModel, directions: Sequence[str]) -> None:
    for d in directions:
        if d not in DIRECTIONS:
            raise ConfigError(f"Unknown direction {d!r}; choose from {', '.join(DIRECTIONS)}.")
        if d == "backward" and not trained.config.bidirectional:
            raise ConfigError("This model reads forward only: --direction backward (or both) needs a model "
                              "trained with bidirectional: true; leave --direction out to score forward.")


def _exp(x: float) -> float | None:
    # None rather than inf, which is not JSON.
    try:
        return math.exp(x)
    except OverflowError:
        return None


def summary(totals: dict, directions: Sequence[str]) -> dict:
    """Token-weighted metrics over every item, as ``rnnlm.evaluate`` reports them for a split (None where there
    was no token or character to predict)."""
    tokens, characters = totals["tokens"], totals["characters"]

    def metrics(logprob: float, prefix: str = "") -> dict:
        loss = -logprob / tokens if tokens else None
        return {
            f"{prefix}loss": loss,
            f"{prefix}ppl": _exp(loss) if tokens else None,
            **({} if prefix else {"bits_per_token": loss / LN2 if tokens else None}),
            f"{prefix}bpc": -logprob / LN2 / characters if characters else None,
        }

    result = {"items": totals["items"], "tokens": tokens, "characters": characters, "logprob": totals["logprob"]}
    result.update(metrics(totals["logprob"]))
    if len(directions) > 1:
        for d in directions:
            result.update(metrics(totals[f"{d}_logprob"], f"{d}_"))
    return result


# ----------------------------------------------------------------------------------------- the command
def _windows(items: Iterator[Item]) -> Iterator[list[Item]]:
    window: list[Item] = []
    size = 0
    for item in items:
        window.append(item)
        size += len(item.text)
        if len(window) >= WINDOW_ITEMS or size >= WINDOW_CHARACTERS:
            yield window
            window, size = [], 0
    if window:
        yield window


def _count_lines(path: str) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def write_scores(
    trained: TrainedModel,
    items: Iterable[Item],
    out: TextIO,
    batch_size: int = DEFAULT_BATCH_SIZE,
    directions: Sequence[str] | None = None,
    end: str = "separator",
    include_text: bool = False,
    progress: tqdm | None = None,
) -> dict:
    """Score ``items`` window by window and write one JSON line per item to ``out``, in input order; return the
    totals (items, tokens, characters, log-probabilities) that :func:`summary` reads."""
    directions = tuple(directions or default_directions(trained))
    keys = ["items", "tokens", "characters", "logprob"]
    if len(directions) > 1:
        keys += [f"{d}_logprob" for d in directions]
    totals = dict.fromkeys(keys, 0)
    scored = 0

    def tokens_done(count: int) -> None:  # progress inside a window: one long line may take minutes
        nonlocal scored
        scored += count
        if progress is not None:
            progress.set_postfix_str(f"{scored:,} tokens", refresh=False)
            progress.update(0)  # shows the bar when its interval has passed

    for window in _windows(iter(items)):
        results = scores(trained, [item.text for item in window], batch_size, directions, end, tokens_done)
        for item, result in zip(window, results, strict=True):
            record = {"index": item.index, "line": item.line, **result}
            if not math.isfinite(record["logprob"]):
                raise UserError(f"The model gave line {item.line} a log-probability of {record['logprob']}: its "
                                "weights are not finite (a damaged checkpoint, or a diverged run). Score with another "
                                "checkpoint; the lines before it were written.")
            if include_text:
                record["text"] = item.text
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            totals["items"] += 1
            for key in keys[1:]:
                totals[key] += record[key]
        out.flush()
        if progress is not None:
            progress.update(len(window))
    return totals


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m rnnlm.score``."""
    p = ArgumentParser(prog="python -m rnnlm.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the model: anything rnnlm.load reads (a .ckpt file "
                   "written by rnnlm.fit)")
    p.add_argument("--input", required=True, help="a UTF-8 text file, or - for standard input")
    p.add_argument("--per", default="line", choices=PER,
                   help="what an item is: a line (default), a paragraph (run of non-blank lines), the whole input")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"items scored together (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--end", default="separator", choices=ENDS,
                   help="what is predicted after each item: the document separator (default, as rnnlm.evaluate "
                        "counts it), a newline (for models trained on whole documents), or nothing")
    p.add_argument("--direction", default=None, choices=[*DIRECTIONS, "both"],
                   help="which language model of a bidirectional model scores (default: both, and their mean)")
    p.add_argument("--include_text", action="store_true", help="add each item's text to its JSON object")
    add_device_option(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error("--batch_size must be a positive integer")
    keep_freed_memory()
    flush_denormals()

    device = resolve_device(args.device)
    stream, name = open_input(args.input, DataError)
    stop = Undecodable()
    interactive = sys.stderr.isatty()  # elsewhere (a log, a batch job) the bar still shows life, every 30 s
    try:
        trained = load(args.checkpoint, map_location=device)
        if args.direction is None:
            directions = default_directions(trained)
        else:
            directions = DIRECTIONS if args.direction == "both" else (args.direction,)
        check_directions(trained, directions)
        total = _count_lines(args.input) if args.input != "-" and args.per == "line" else None
        start = time.perf_counter()
        with tqdm(total=total, unit=args.per, file=sys.stderr, delay=2.0, dynamic_ncols=True,
                  mininterval=0.5 if interactive else 30.0) as bar:
            items = read_items(decoded_lines(stream, stop), args.per, stop)
            totals = write_scores(trained, items, sys.stdout, args.batch_size, directions, args.end,
                                  args.include_text, bar)
        seconds = time.perf_counter() - start
    finally:
        close_input(stream)
    if stop.line is not None:
        done = totals["items"]
        written = (f"the {done:,} {_plural(done, args.per)} before it {'was' if done == 1 else 'were'} written"
                   if done else "nothing was written")
        raise DataError(f"{name} is not UTF-8 text: line {stop.line} has a byte that cannot be decoded "
                        f"({stop.error.reason}, byte {stop.error.start + 1} of the line); {written}. Convert it "
                        "first, e.g. with iconv -f LATIN1 -t UTF-8.")
    if totals["items"] == 0:
        what = "paragraph (blank lines make none)" if args.per == "paragraph" else args.per
        raise DataError(f"{name} is empty: there is nothing to score. Give text with one item per {what}.")
    result = {
        "checkpoint": args.checkpoint,
        "input": args.input,
        "per": args.per,
        "end": args.end,
        "directions": list(directions),
        **summary(totals, directions),
        "batch_size": args.batch_size,
        "seconds": seconds,
        "items_per_second": totals["items"] / seconds,
        "tokens_per_second": totals["tokens"] / seconds,
    }
    noun = _plural(result["items"], args.per)
    print(
        f"rnnlm.score: {result['items']:,} {noun}, {result['tokens']:,} tokens, {result['characters']:,} characters\n"
        f"  loss {_fmt(result['loss'])} nats/token, perplexity {_fmt(result['ppl'], 2)}, "
        f"{_fmt(result['bpc'])} bits/char\n"
        f"  {seconds:.2f} s: {result['items_per_second']:,.0f} {args.per}s/s, {result['tokens_per_second']:,.0f} "
        "tokens/s\n" + json.dumps(result),
        file=sys.stderr, flush=True,
    )
    return result


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else f"{noun}s"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cli() -> None:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")  # JSON lines are UTF-8, whatever the locale
    try:
        run_main(main)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as command-line tools do; stdout goes to /dev/null
        # so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


if __name__ == "__main__":
    cli()
