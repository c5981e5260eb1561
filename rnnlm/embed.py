"""Contextual features from a trained model (ELMo's use of a language model):
``python -m rnnlm.embed --checkpoint X --input FILE --out PATH``.

Each line of the input is one text, read from a zero state after the separator token, in batches of similar length.
A batch is read :data:`PIECE` positions at a time, each recurrent layer's state carried from one piece to the next
and the pooling (a running sum, maximum and last state) kept up as it goes: the features of one pass (to float
rounding) in the working memory of one piece, however long the lines. Per-token features need their own size on top
(4 bytes a value; a block of :data:`BLOCK` lines at a time), and ``.parquet`` about 4 times the longest line's
features more while it writes that line's row, which Parquet writes whole. The features are the recurrent layers'
states:

- ``--pooling none`` (default): one vector per token; ``mean``, ``max``, ``last`` or ``concat`` (ULMFiT's
  [last, max, mean]): one vector per line.
- ``--layers top`` (default): the top layer; ``all``: every layer (they must have one size); ``mean``: their average.
- A bidirectional model gives, at each token, the forward state (having read the text up to that token) and the
  backward state (having read it from the end back to that token), concatenated; a forward-only model its forward
  state. Pooling runs per direction in its own reading order, so ``last`` is each direction's state after the whole
  text.

Output, by the suffix of ``--out``:

- ``.parquet`` (written as it goes, any size): one row per line, columns ``line`` (the input line's number, from 1
  as ``rnnlm.score`` numbers them), then per token ``tokens`` (the token strings) and ``states`` (a list per token),
  or pooled ``n_tokens`` and ``vector``; with ``--layers all`` one more list level, layers first. The settings are
  in the file's metadata (``rnnlm``).
- ``.npy`` (pooled only, written as it goes): an array ``[lines, dim]`` (``[lines, layers, dim]`` for ``all``); row
  ``i`` is input line ``i + 1`` (arrays count from 0, lines from 1).
- ``.npz`` / ``.safetensors`` (held in memory until written): pooled: ``vectors``; per-token: ``states``
  ``[tokens, dim]`` (``[tokens, layers, dim]``) of every line one after the other, ``offsets`` ``[lines + 1]`` (line i
  is ``states[offsets[i]:offsets[i+1]]``) and ``ids``, the token ids.

An empty line has no tokens: no per-token rows, and a pooled vector of NaN. The checkpoint may be a language model
(anything :func:`rnnlm.load` reads) or a classifier of ``rnnlm.classify`` (its fine-tuned encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import Tensor

from rnnlm.commands import ArgumentParser, add_device_option, progress, read_lines, resolve_device
from rnnlm.errors import ConfigError, UserError, run_main
from rnnlm.files import atomic_path, check_output, load_safely
from rnnlm.network.classifier import reverse_texts, text_mask
from rnnlm.network.lm import DIRECTIONS, RNNLM, map_state, state_batch_size
from rnnlm.sharing.checkpoints import is_classifier_checkpoint
from rnnlm.sharing.classifier import from_checkpoint
from rnnlm.sharing.lm import load
from rnnlm.text.batching import batches_by_length, encode_texts
from rnnlm.text.tokenization import Encoder, batched

POOLINGS = ("none", "mean", "max", "last", "concat")
LAYERS = ("top", "all", "mean")
FORMATS = (".parquet", ".npy", ".npz", ".safetensors")
BLOCK = 4096  # lines read, embedded and written at a time
# Positions of a batch read per forward call. A text read in pieces, each layer's state carried from one piece to
# the next, gets the states of one pass (to float rounding), and only a piece's intermediate tensors are held at a
# time: with 64 rows of a 256-unit layer, 64 MB each. On one CPU core a 2 x 256 LSTM read a 65k-token line as fast in
# pieces of 1,024 as in one pass (pieces of 256: 10% slower), and 64 rows of 8k positions alike.
PIECE = 1024


@dataclass
class FeatureModel:
    """A recurrent encoder with its tokenizer: an LM, or a classifier's encoder."""

    encoder: RNNLM
    tokenizer_encoder: Encoder
    max_length: int
    kind: str


def load_encoder(path: str, map_location: str | torch.device = "cpu", max_length: int | None = None) -> FeatureModel:
    """The encoder of a classifier checkpoint, or of anything :func:`rnnlm.load` reads."""

    if os.path.isfile(path):
        checkpoint = load_safely(path, map_location)
        if is_classifier_checkpoint(checkpoint):
            clf = from_checkpoint(checkpoint, path, map_location)
            return FeatureModel(clf.model.encoder.eval(), clf.encoder, max_length or clf.max_length, "classifier")

    lm = load(path, map_location)
    return FeatureModel(lm.model.eval(), lm.encoder, max_length or 1 << 20, "language model")


class FeatureWriter:
    """Turns batches of texts into the features the options ask for."""

    def __init__(self, model: FeatureModel, pooling: str = "none", layers: str = "top") -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"Unknown --pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")
        if layers not in LAYERS:
            raise ConfigError(f"Unknown --layers {layers!r}; choose one of {', '.join(LAYERS)}.")
        sizes = model.encoder.config.layer_sizes
        if layers != "top" and len(set(sizes)) > 1:
            raise ConfigError(f"--layers {layers} needs layers of one size, but they have {list(sizes)}: use --layers "
                              "top.")
        self.model, self.pooling, self.layers = model, pooling, layers
        directions = 2 if model.encoder.config.bidirectional else 1
        self.dim = sizes[-1] * directions * (3 if pooling == "concat" else 1)
        self.num_layers = len(sizes) if layers == "all" else 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one token's (or one pooled line's) features."""
        return (self.num_layers, self.dim) if self.layers == "all" else (self.dim,)

    def _read(self, ids: Tensor, lengths: Tensor, direction: str) -> Iterator[tuple[int, Tensor]]:
        """This direction's states piece by piece, in its own reading order: ``(start, states)``, the states
        ``[rows, steps, layers, H]`` at positions ``start .. start + steps - 1`` of the rows still reading there (the
        rows are sorted longest first, so these are the first ones); ``layers`` is 1 (the top layer or the layers'
        average) or every layer."""
        encoder = self.model.encoder
        state = None
        for start in range(0, ids.size(1), PIECE):
            rows = int((lengths > start).sum())
            if state is not None and rows < state_batch_size(state):
                state = map_state(lambda s, n=rows: s[:, :n].contiguous(), state)
            piece = ids[:rows, start : start + PIECE]
            if self.layers == "top":
                top, state = encoder.encode(piece, state, direction)
                yield start, top.unsqueeze(2)
                continue
            layer_states, state = encoder.read_layers(piece, state, direction)
            states = torch.stack(layer_states, dim=2)
            yield start, states.mean(dim=2, keepdim=True) if self.layers == "mean" else states

    @torch.no_grad()
    def features(self, ids: Tensor, lengths: Tensor, out: Tensor | None = None,
                 starts: Tensor | None = None) -> Tensor:
        """The features of a batch (:class:`~rnnlm.text.batching.Batch`'s ``ids`` and ``lengths``), read in pieces of
        :data:`PIECE` positions: pooled, ``[B, *shape]``; per token, the states of each row's tokens (the separator
        and the padding left out), row b's at ``out[starts[b] : starts[b] + lengths[b] - 1]`` (by default a new
        ``[sum(lengths - 1), *shape]`` in row order). On the CPU whatever the model's device, float32."""
        order = torch.argsort(lengths, descending=True, stable=True)
        ids, lengths = ids[order], lengths[order]
        directions = DIRECTIONS if self.model.encoder.config.bidirectional else DIRECTIONS[:1]
        width = self.model.encoder.config.layer_sizes[-1]
        if self.pooling == "none":
            if out is None:
                counts = (lengths - 1)[torch.argsort(order)].cpu()
                starts = torch.cumsum(counts, 0) - counts
                out = torch.empty((int(counts.sum()), *self.shape))
            flat = out.view(len(out), self.num_layers, -1)
            starts = starts.to(ids.device)[order]
            for d, direction in enumerate(directions):
                x = ids if direction == "forward" else reverse_texts(ids, lengths)[0]
                for start, states in self._read(x, lengths, direction):
                    row, step = text_mask(lengths, states.size(1), start).nonzero(as_tuple=True)
                    position = step + start
                    # The backward direction read position p of a text of length n where the token n - p was.
                    token = position - 1 if direction == "forward" else lengths[row] - position - 1
                    flat[(starts[row] + token).cpu(), :, d * width : (d + 1) * width] = states[row, step].float().cpu()
            return out
        pooled = torch.cat([self._pooled(ids if direction == "forward" else reverse_texts(ids, lengths)[0], lengths,
                                         direction) for direction in directions], dim=-1)
        return pooled[torch.argsort(order)].view(len(ids), *self.shape).cpu()

    def _pooled(self, ids: Tensor, lengths: Tensor, direction: str) -> Tensor:
        """One direction's pooling ``[B, layers, H]`` (``3H`` for concat), accumulated piece by piece in float32."""
        shape = (len(ids), self.num_layers, self.model.encoder.config.layer_sizes[-1])
        total = ids.new_zeros(shape, dtype=torch.float32)
        biggest = ids.new_full(shape, float("-inf"), dtype=torch.float32)
        last = ids.new_zeros(shape, dtype=torch.float32)
        for start, states in self._read(ids, lengths, direction):
            states = states.float()
            rows, steps = states.shape[:2]
            inside = text_mask(lengths[:rows], steps, start)[..., None, None]
            if self.pooling in ("mean", "concat"):
                total[:rows] += states.masked_fill(~inside, 0.0).sum(dim=1)
            if self.pooling in ("max", "concat"):
                biggest[:rows] = torch.maximum(biggest[:rows], states.masked_fill(~inside, float("-inf")).amax(dim=1))
            if self.pooling in ("last", "concat"):
                end = lengths[:rows] - 1 - start  # the last token's step in this piece
                (ending,) = ((end >= 0) & (end < steps)).nonzero(as_tuple=True)
                last[ending] = states[ending, end[ending]]
        mean = total / (lengths - 1).to(total.dtype)[:, None, None]
        return {"mean": mean, "max": biggest, "last": last,
                "concat": torch.cat([last, biggest, mean], dim=-1)}[self.pooling]

    def block(self, texts: list[str], batch_size: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The token ids of each text, and the features of all: per token ``[tokens, *shape]``, each text's tokens
        after the previous text's (text i's from row ``token_offsets(ids)[i]`` on); pooled ``[texts, *shape]`` (NaN
        for a text with no token)."""
        tokens = encode_texts(self.model.tokenizer_encoder, texts, self.model.max_length)[0]
        device = next(self.model.encoder.parameters()).device
        if self.pooling == "none":
            offsets = torch.from_numpy(token_offsets(tokens))
            out = torch.empty((int(offsets[-1]), *self.shape))
        else:
            out = torch.full((len(texts), *self.shape), float("nan"))
        for batch in batches_by_length(tokens, batch_size, self.model.tokenizer_encoder.separator):
            ids, lengths = batch.ids.to(device), batch.lengths.to(device)
            if self.pooling == "none":
                self.features(ids, lengths, out, offsets[batch.index])
            else:
                out[batch.index] = self.features(ids, lengths)
        return tokens, out.numpy()


def token_offsets(tokens: list[np.ndarray]) -> np.ndarray:
    """``[texts + 1]``: where each text's tokens begin among all of them, and the total last."""
    return np.concatenate([[0], np.cumsum([len(t) for t in tokens], dtype=np.int64)])



# ------------------------------------------------------------------------------------------------ output
class _Sink:
    def __init__(self, path: Path, writer: FeatureWriter, metadata: dict) -> None:
        self.path, self.writer, self.metadata = path, writer, metadata


class _ParquetSink(_Sink):
    def __init__(self, path: Path, writer: FeatureWriter, metadata: dict) -> None:
        super().__init__(path, writer, metadata)
        import pyarrow as pa  # deferred: heavy, needed only for .parquet output
        import pyarrow.parquet as pq

        values = pa.float32()
        for _ in range(len(writer.shape) + (1 if writer.pooling == "none" else 0) - 1):
            values = pa.list_(values)
        if writer.pooling == "none":
            fields = [("line", pa.int64()), ("tokens", pa.list_(pa.string())), ("states", pa.list_(values))]
        else:
            fields = [("line", pa.int64()), ("n_tokens", pa.int64()), ("vector", pa.list_(values))]
        self.schema = pa.schema(fields, metadata={"rnnlm": json.dumps(metadata)})
        # Dictionary encoding suits the token strings only: tried on the floats, Parquet holds back every page of a
        # row group until it gives up on it (8 GB for one line of 200k tokens x 256), and compression saves
        # nothing on them.
        self.file = pq.ParquetWriter(str(path), self.schema, use_dictionary=["tokens"],
                                     compression={"line": "snappy", "tokens": "snappy", fields[2][0]: "none"})
        self.line = 1  # input lines are numbered from 1, as rnnlm.score numbers them

    def write(self, tokens: list[np.ndarray], features: np.ndarray, decode) -> None:
        import pyarrow as pa  # deferred: heavy, needed only for .parquet output

        per_token = self.writer.pooling == "none"
        # Rows of features per line, from which the Arrow lists are built over the features without a copy.
        rows = token_offsets(tokens) if per_token else np.arange(len(tokens) + 1, dtype=np.int64)
        values = int(np.prod(self.writer.shape))
        for a, b in _spans(rows * values, self.line):
            lines = pa.array(np.arange(self.line + a, self.line + b, dtype=np.int64))
            vectors = _lists(features[rows[a] : rows[b]])
            if per_token:
                ids = np.concatenate([np.zeros(0, np.int64), *tokens[a:b]]).astype(np.int64)
                pieces, where = np.unique(ids, return_inverse=True)
                strings = pa.array([decode([int(i)]) for i in pieces], pa.string()).take(pa.array(where))
                columns = [lines, _grouped(strings, rows[a : b + 1]), _grouped(vectors, rows[a : b + 1])]
            else:
                columns = [lines, pa.array([len(ids) for ids in tokens[a:b]], pa.int64()), vectors]
            self.file.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.line += len(tokens)

    def close(self) -> None:
        self.file.close()


# An Arrow list counts its values with 32-bit offsets: the lines written as one table hold at most this many floats.
ARROW_LIST_VALUES = (1 << 31) - 1


def _spans(ends: np.ndarray, first_line: int) -> Iterator[tuple[int, int]]:
    """Runs ``[a, b)`` of lines whose values (``ends``: their cumulative counts, from 0) one Arrow list holds."""
    a = 0
    while a < len(ends) - 1:
        b = max(int(np.searchsorted(ends, ends[a] + ARROW_LIST_VALUES, side="right")) - 1, a + 1)
        if ends[b] - ends[a] > ARROW_LIST_VALUES:
            raise UserError(f"Line {first_line + a} has more per-token features ({ends[b] - ends[a]:,} floats) than "
                            f"a Parquet row holds ({ARROW_LIST_VALUES:,}): write .npz instead, pool them (--pooling), "
                            "or cut the lines (--max_length).")
        yield a, b
        a = b


def _lists(values: np.ndarray):
    """``values`` ``[n, *shape]`` as n nested Arrow lists of float32, over the same memory."""
    import pyarrow as pa  # deferred: heavy, needed only for .parquet output

    array = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.ListArray.from_arrays(pa.array(np.arange(0, len(array) + 1, size, dtype=np.int32)), array)
    return array


def _grouped(array, offsets: np.ndarray):
    """An Arrow list per line of ``array``'s items: line i holds items ``offsets[i] .. offsets[i + 1] - 1``
    (``offsets`` counted from where ``array`` begins)."""
    import pyarrow as pa  # deferred: heavy, needed only for .parquet output

    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), array)


class _NpySink(_Sink):
    def __init__(self, path: Path, writer: FeatureWriter, metadata: dict, lines: int) -> None:
        super().__init__(path, writer, metadata)
        if writer.pooling == "none":
            raise ConfigError("Per-token states vary in number per line: write them to .parquet, .npz or "
                              ".safetensors, or pool them (--pooling mean) for .npy.")
        self.array = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(lines, *writer.shape))
        self.line = 0

    def write(self, tokens, features, decode) -> None:
        self.array[self.line : self.line + len(features)] = features
        self.line += len(features)

    def close(self) -> None:
        self.array.flush()
        del self.array


class _ArraysSink(_Sink):
    """``.npz`` and ``.safetensors``: every array in memory, written at the end."""

    def __init__(self, path: Path, writer: FeatureWriter, metadata: dict) -> None:
        super().__init__(path, writer, metadata)
        self.features: list[np.ndarray] = [np.zeros((0, *writer.shape), np.float32)]
        self.tokens: list[np.ndarray] = []

    def write(self, tokens, features, decode) -> None:
        self.features.append(features)
        if self.writer.pooling == "none":
            self.tokens.extend(tokens)

    def close(self) -> None:
        features = np.concatenate(self.features)
        if self.writer.pooling == "none":
            ids = np.concatenate([np.zeros(0, np.int64), *self.tokens]).astype(np.int64)
            arrays = {"states": features, "offsets": token_offsets(self.tokens), "ids": ids}
        else:
            arrays = {"vectors": features}
        if self.path.suffix == ".safetensors":
            save_file(arrays, str(self.path), metadata={"rnnlm": json.dumps(self.metadata)})
        else:
            np.savez(self.path, **arrays, rnnlm=np.array(json.dumps(self.metadata)))


def embed(checkpoint: str, input: str, out: str, pooling: str = "none", layers: str = "top", batch_size: int = 64,
          max_length: int | None = None, device: str = "auto") -> dict:
    """Write the features of every line of ``input`` to ``out`` (see the module docstring); returns a summary."""
    out_path = Path(out)
    if out_path.suffix not in FORMATS:
        raise ConfigError(f"--out must end in one of {', '.join(FORMATS)} (the format), got {out!r}.")
    if batch_size < 1 or (max_length is not None and max_length < 1):
        raise ConfigError("--batch_size and --max_length must be positive integers.")
    if out_path.suffix == ".npy" and input == "-":
        raise ConfigError(".npy output needs the number of lines first: give --input a file, or write .npz.")
    # Every input and the output location are checked before the model is loaded or anything is written; the
    # output is written beside its final name and renamed into place only when every line is done.
    texts = read_lines(input)
    check_output(out_path, "--out", inputs=(input, checkpoint))
    model = load_encoder(checkpoint, resolve_device(device), max_length)
    writer = FeatureWriter(model, pooling, layers)
    metadata = {"checkpoint": checkpoint, "model": model.kind, "pooling": pooling, "layers": layers,
                "bidirectional": model.encoder.config.bidirectional, "shape": list(writer.shape),
                "max_length": model.max_length}
    count = sum(1 for _ in read_lines(input)) if out_path.suffix == ".npy" else 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    decode = model.tokenizer_encoder.decode
    lines = empty = tokens_total = 0
    with atomic_path(out_path) as tmp:
        if out_path.suffix == ".parquet":
            sink: _Sink = _ParquetSink(tmp, writer, metadata)
        elif out_path.suffix == ".npy":
            sink = _NpySink(tmp, writer, metadata, count)
        else:
            sink = _ArraysSink(tmp, writer, metadata)
        try:
            for block in batched(progress(texts, input, "lines"), BLOCK):
                lines, empty, tokens_total = _flush(block, writer, sink, batch_size, decode, lines, empty,
                                                    tokens_total)
        finally:
            sink.close()
        if lines == 0:
            raise UserError(f"The input {input} holds no line to embed: give a text file with one text per line.")
        if empty == lines:
            raise UserError(f"Every line of {input} is empty: there is no text to embed.")
    summary = {"lines": lines, "empty": empty, "tokens": tokens_total, "shape": list(writer.shape), "out": out}
    print(f"rnnlm: {lines:,} {_plural(lines, 'line')}, {tokens_total:,} {_plural(tokens_total, 'token')} -> {out} "
          f"({'x'.join(map(str, writer.shape))} per {'token' if pooling == 'none' else 'line'})"
          + (f"; {empty:,} empty {_plural(empty, 'line')}" if empty else ""), file=sys.stderr)
    return summary


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else f"{noun}s"


def _flush(block, writer, sink, batch_size, decode, lines, empty, tokens_total):
    tokens, features = writer.block(block, batch_size)
    sink.write(tokens, features, decode)
    return (lines + len(block), empty + sum(len(t) == 0 for t in tokens),
            tokens_total + sum(len(t) for t in tokens))


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m rnnlm.embed``."""
    parser = ArgumentParser(prog="python -m rnnlm.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="A language model (what rnnlm.load reads) or a classifier checkpoint of rnnlm.classify.")
    parser.add_argument("--input", required=True, help="A text file, one text per line ('-': stdin).")
    parser.add_argument("--out", required=True,
                        help=f"The output file; its suffix picks the format ({', '.join(FORMATS)}).")
    parser.add_argument("--pooling", default="none", choices=POOLINGS)
    parser.add_argument("--layers", default="top", choices=LAYERS)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=None,
                        help="Tokens read per line (default: a classifier's own; no limit for an LM).")
    add_device_option(parser)
    return parser


def main(args: list[str] | None = None) -> dict:
    return embed(**vars(parser().parse_args(args)))


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
