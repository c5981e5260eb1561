"""Contextual features from a trained model (ELMo's use of a language model):
``python -m rnnlm.embed --checkpoint X --input FILE --out PATH``.

Each line of the input is one text, read from a zero state after the separator token, in batches of similar length.
The features are the recurrent layers' states:

- ``--pooling none`` (default): one vector per token; ``mean``, ``max``, ``last`` or ``concat`` (ULMFiT's
  [last, max, mean]): one vector per line.
- ``--layers top`` (default): the top layer; ``all``: every layer (they must have one size); ``mean``: their average.
- A bidirectional model gives, at each token, the forward state (having read the text up to that token) and the
  backward state (having read it from the end back to that token), concatenated; a forward-only model its forward
  state. Pooling runs per direction in its own reading order, so ``last`` is each direction's state after the whole
  text.

Output, by the suffix of ``--out``:

- ``.parquet`` (written as it goes, any size): one row per line, columns ``line`` (the input line's number, from 1
  as ``rnnlm.score`` numbers them), ``tokens`` (the token strings) and
  ``states`` (per-token: a list per token) or ``vector`` (pooled); with ``--layers all`` one more list level, layers
  first. The settings are in the file's metadata (``rnnlm``).
- ``.npy`` (pooled only, written as it goes): an array ``[lines, dim]`` (``[lines, layers, dim]`` for ``all``); row
  ``i`` is input line ``i + 1`` (arrays count from 0, lines from 1).
- ``.npz`` / ``.safetensors`` (held in memory until written): pooled: ``vectors``; per-token: ``states``
  ``[tokens, dim]`` (``[tokens, layers, dim]``) of every line one after the other, ``offsets`` ``[lines + 1]`` (line i
  is ``states[offsets[i]:offsets[i+1]]``) and ``ids``, the token ids. (``.safetensors`` needs the ``safetensors``
  package.)

An empty line has no tokens: no per-token rows, and a pooled vector of NaN. The checkpoint may be a language model
(anything :func:`rnnlm.load` reads) or a classifier of ``rnnlm.classify`` (its fine-tuned encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import Tensor

from rnnlm.commands import ArgumentParser, add_device_option, progress, read_lines, resolve_device
from rnnlm.errors import ConfigError, UserError, run_main
from rnnlm.files import atomic_path, check_output, load_safely
from rnnlm.network.classifier import concat_pool, reverse_texts, text_mask
from rnnlm.network.lm import RNNLM
from rnnlm.sharing.checkpoints import is_classifier_checkpoint
from rnnlm.sharing.classifier import from_checkpoint
from rnnlm.sharing.lm import load
from rnnlm.text.batching import batches_by_length, encode_texts
from rnnlm.text.tokenization import Encoder, batched

POOLINGS = ("none", "mean", "max", "last", "concat")
LAYERS = ("top", "all", "mean")
FORMATS = (".parquet", ".npy", ".npz", ".safetensors")
BLOCK = 4096  # lines read, embedded and written at a time


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

    def _direction(self, ids: Tensor, direction: str) -> list[Tensor]:
        """This direction's states, in its own reading order: the top layer, every layer, or their average."""
        encoder = self.model.encoder
        if self.layers == "top":
            return [encoder.encode(ids, direction=direction)[0]]
        states = encoder.layer_states(ids, direction)
        return [torch.stack(states).mean(dim=0)] if self.layers == "mean" else states

    def _pool(self, states: Tensor, lengths: Tensor) -> Tensor:
        if self.pooling == "concat":
            return concat_pool(states, lengths)
        if self.pooling == "last":
            return states[torch.arange(states.size(0), device=states.device), lengths - 1]
        mask = text_mask(lengths, states.size(1)).unsqueeze(-1)
        if self.pooling == "max":
            return states.masked_fill(~mask, float("-inf")).amax(dim=1)
        return (states * mask).sum(dim=1) / (lengths - 1).unsqueeze(-1).to(states.dtype)

    @torch.no_grad()
    def features(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``[B, T, *shape]`` per token (position 0, the separator, and the padding included) or ``[B, *shape]``
        pooled."""
        per_direction = []
        for direction in ("forward", "backward")[: 2 if self.model.encoder.config.bidirectional else 1]:
            if direction == "forward":
                layer_states = self._direction(ids, direction)
            else:
                reversed_ids, index = reverse_texts(ids, lengths)
                layer_states = self._direction(reversed_ids, direction)
                if self.pooling == "none":  # back to the tokens' own positions
                    layer_states = [s.gather(1, index.unsqueeze(-1).expand_as(s)) for s in layer_states]
            if self.pooling != "none":
                layer_states = [self._pool(s, lengths) for s in layer_states]
            per_direction.append(layer_states)
        layers = [torch.cat(parts, dim=-1) for parts in zip(*per_direction, strict=True)]
        if self.layers != "all":
            return layers[0].float()
        return torch.stack(layers, dim=-2).float()  # [..., layers, dim]

    def block(self, texts: list[str], batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """The token ids and the features of each text (None for an empty text)."""
        tokens = encode_texts(self.model.tokenizer_encoder, texts, self.model.max_length)[0]
        out: list[np.ndarray | None] = [None] * len(texts)
        device = next(self.model.encoder.parameters()).device
        for batch in batches_by_length(tokens, batch_size, self.model.tokenizer_encoder.separator):
            values = self.features(batch.ids.to(device), batch.lengths.to(device)).cpu().numpy()
            for row, i in enumerate(batch.index.tolist()):
                out[i] = values[row, 1 : int(batch.lengths[row])] if self.pooling == "none" else values[row]
        return tokens, out


# ------------------------------------------------------------------------------------------------ output
class _Sink:
    def __init__(self, path: Path, writer: FeatureWriter, metadata: dict) -> None:
        self.path, self.writer, self.metadata = path, writer, metadata

    def nan(self) -> np.ndarray:
        return np.full(self.writer.shape, np.nan, dtype=np.float32)


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
        self.file = pq.ParquetWriter(str(path), self.schema)
        self.line = 1  # input lines are numbered from 1, as rnnlm.score numbers them

    def write(self, tokens: list[np.ndarray], features: list[np.ndarray | None], decode) -> None:
        import pyarrow as pa  # deferred: heavy, needed only for .parquet output

        lines = list(range(self.line, self.line + len(tokens)))
        self.line += len(tokens)
        if self.writer.pooling == "none":
            empty = np.zeros((0, *self.writer.shape), np.float32)
            columns = {"line": lines, "tokens": [[decode([int(t)]) for t in ids] for ids in tokens],
                       "states": [(f if f is not None else empty).tolist() for f in features]}
        else:
            columns = {"line": lines, "n_tokens": [len(ids) for ids in tokens],
                       "vector": [(f if f is not None else self.nan()).tolist() for f in features]}
        self.file.write_table(pa.table(columns, schema=self.schema))

    def close(self) -> None:
        self.file.close()


class _NpySink(_Sink):
    def __init__(self, path: Path, writer: FeatureWriter, metadata: dict, lines: int) -> None:
        super().__init__(path, writer, metadata)
        if writer.pooling == "none":
            raise ConfigError("Per-token states vary in number per line: write them to .parquet, .npz or "
                              ".safetensors, or pool them (--pooling mean) for .npy.")
        self.array = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(lines, *writer.shape))
        self.line = 0

    def write(self, tokens, features, decode) -> None:
        for f in features:
            self.array[self.line] = f if f is not None else self.nan()
            self.line += 1

    def close(self) -> None:
        self.array.flush()
        del self.array


class _ArraysSink(_Sink):
    """``.npz`` and ``.safetensors``: every array in memory, written at the end."""

    def __init__(self, path: Path, writer: FeatureWriter, metadata: dict) -> None:
        super().__init__(path, writer, metadata)
        self.features: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []

    def write(self, tokens, features, decode) -> None:
        for ids, f in zip(tokens, features, strict=True):
            if self.writer.pooling == "none":
                self.features.append(f if f is not None else np.zeros((0, *self.writer.shape), np.float32))
                self.ids.append(ids)
            else:
                self.features.append(f if f is not None else self.nan())

    def close(self) -> None:
        if self.writer.pooling == "none":
            counts = [len(f) for f in self.features]
            arrays = {
                "states": np.concatenate(self.features) if self.features else np.zeros((0, *self.writer.shape)),
                "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                "ids": np.concatenate(self.ids).astype(np.int64) if self.ids else np.zeros(0, np.int64),
            }
        else:
            arrays = {"vectors": np.stack(self.features) if self.features else np.zeros((0, *self.writer.shape))}
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32 if k in ("states", "vectors") else np.int64)
                  for k, v in arrays.items()}
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
    return (lines + len(block), empty + sum(f is None for f in features),
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
