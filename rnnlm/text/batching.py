"""Texts as the classifier reads them: token ids cut to a maximum length, padded into batches of texts of similar
length. No Lightning here: a loaded classifier (``rnnlm.sharing.classifier``) and ``rnnlm.embed`` batch texts
with these functions as the classification data module does."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from rnnlm.text.tokenization import Encoder


class Batch(NamedTuple):
    """Texts ready for the classifier: ``ids`` ``[B, T]`` (separator first, right-padded with the separator),
    ``lengths`` ``[B]`` (tokens read per row, separator included), ``labels`` ``[B]`` (class indices; -1 when
    unknown) and ``index`` ``[B]`` (each row's position in its split or input)."""

    ids: Tensor
    lengths: Tensor
    labels: Tensor
    index: Tensor


def make_batch(texts: Sequence[np.ndarray], separator: int, labels: Sequence[int] | None = None,
               index: Sequence[int] | None = None) -> Batch:
    """Pad token-id arrays (one per text, at least one token each) into a :class:`Batch`."""
    lengths = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    ids = np.full((len(texts), int(lengths.max())), separator, dtype=np.int64)
    for row, tokens in enumerate(texts):
        ids[row, 1 : len(tokens) + 1] = tokens
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(lengths),
        torch.as_tensor(labels if labels is not None else [-1] * len(texts), dtype=torch.int64),
        torch.as_tensor(index if index is not None else range(len(texts)), dtype=torch.int64),
    )


def encode_texts(encoder: Encoder, texts: Sequence[str], max_length: int) -> tuple[list[np.ndarray], int]:
    """Token ids of each text (no separator), cut to its first ``max_length`` tokens, and how many texts were cut."""
    if not texts:
        return [], 0
    stream = encoder.encode(list(texts)).astype(np.int64)
    ends = np.flatnonzero(stream == encoder.separator)
    if len(ends) != len(texts):  # a tokenizer that can produce the separator from text: one text at a time
        pieces = [np.asarray(encoder.encode_text(t), dtype=np.int64) for t in texts]
    else:
        starts = np.concatenate([[0], ends[:-1] + 1])
        pieces = [stream[a:b] for a, b in zip(starts, ends, strict=True)]
    cut = sum(len(p) > max_length for p in pieces)
    return [p[:max_length] for p in pieces], cut


def batches_by_length(tokens: Sequence[np.ndarray], batch_size: int, separator: int,
                      labels: Sequence[int] | None = None, world_size: int = 1, rank: int = 0) -> Iterable[Batch]:
    """Non-empty texts in batches of similar length, longest first (for evaluation and prediction); each batch's
    ``index`` says where its rows come from. With ``world_size`` > 1, the texts of process ``rank``: every
    ``world_size``-th by length, so that every process gets a batch as soon as there is a text for each."""
    order = sorted((i for i, t in enumerate(tokens) if len(t)), key=lambda i: -len(tokens[i]))[rank::world_size]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield make_batch([tokens[i] for i in rows], separator,
                         None if labels is None else [labels[i] for i in rows], rows)
