"""The softmax output layer fused with its loss: ``F.cross_entropy(F.linear(x, W, b), y)`` computed block by block.

At word level the output layer is most of a training step and its logits ``[N, V]`` most of its memory (N = B * T
positions, V the vocabulary). The gradient of cross-entropy with respect to the logits is known as soon as they
are: softmax minus one-hot, over N. So :func:`linear_cross_entropy` forms the logits of a block of rows, turns them
into that block's loss and, when gradients are needed, straight into the block's gradients for the inputs, the
weight and the bias, then drops them. The full ``[N, V]`` matrix never exists; the backward pass only scales the
stored gradients by the incoming one. The mathematics is exactly that of the plain head (the tests compare the
loss and every gradient with ``F.cross_entropy(F.linear(...))`` to float32 rounding, and against float64 both
heads are equally close); what changes is the order of the work:

- The plain head writes the ``[N, V]`` logits, reads them for the log-softmax, writes its output, writes an
  ``[N, V]`` one-hot gradient, reads both for the log-softmax gradient and writes that: six passes over a matrix
  that no cache holds (93 MB for the WikiText-2 recipe). Here a block is formed, normalised by one softmax (a row
  at a time, in cache) and read by the two gradient products.
- On a CPU each block's logits are formed ``FORWARD_TILE`` classes at a time, so that the product's output stays
  in cache: with MKL on the development CPU this product ran 1.3-1.5x faster than one ``x @ W.T`` over the whole
  vocabulary, which is most of the gain.
- The bias is one more column of the weight against a column of ones in the inputs: adding it costs no pass over
  a block, and its gradient comes out of the weight-gradient product as one more column.

Under autocast (``precision="bf16-mixed"``) the three matrix products run in the autocast dtype, as ``F.linear``
would; the softmax, the loss and the sums of the weight and bias gradients over the blocks are float32, as the
plain head's ``logits.float()`` cross-entropy is (the plain head rounds the whole weight gradient to bf16 once;
here each block's share is rounded, then summed in float32).

Targets equal to ``-100`` are ignored, as by ``F.cross_entropy``: the loss is the mean over the other positions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index

# The rule for the default (scripts/head_speed.py; docs/performance.md has the measurements, on the 2-core
# development CPU with one torch thread). Output layer alone, 700 rows, plain time / fused time: 0.71 at 105
# classes, 0.98 at 1,024, 1.01 at 2,048, 0.9-1.08 at 4,096 and 8,192 (within the noise, at a fraction of the
# memory), 1.25 at 16,384, 1.44 at 33,278: the gain grows with the vocabulary.
CPU_MIN_VOCAB = 4096
# Logits per block on a CPU (float32: 32 MiB; 252 rows for WikiText-2, where 128-256 rows were fastest), and the
# fewest rows a block may have: below it the weight-gradient product, which reads and writes the whole [V, D]
# gradient once per block, costs more than the small blocks save.
CPU_BLOCK_ELEMENTS = 1 << 23
MIN_BLOCK_ROWS = 64
# Classes per forward product on a CPU (1,024 was as fast as 512 and 2,048 or faster).
FORWARD_TILE = 1024
# On a GPU the fused head is used when the full logits would exceed this many elements (1 GiB in float32): there
# it saves memory that matters; below it the plain head's kernels are kept (not measured on a GPU yet:
# scripts/gpu_check.sh measures both).
GPU_MIN_LOGITS = 1 << 28
GPU_BLOCK_ELEMENTS = 1 << 26


def auto_block_rows(vocab_size: int, rows: int, device: torch.device) -> int:
    """Rows per block that the model uses by default for ``rows`` positions over ``vocab_size`` classes on
    ``device``; 0 means the plain head (``F.linear`` + ``F.cross_entropy``).

    On a CPU: the fused head from 4,096 classes up, in blocks of about 8 M logits (at least 64 rows); on a GPU:
    blocks of 64 M logits, only when the full logits would exceed 256 M elements.
    """
    if device.type == "cpu":
        return max(MIN_BLOCK_ROWS, CPU_BLOCK_ELEMENTS // vocab_size) if vocab_size >= CPU_MIN_VOCAB else 0
    if rows * vocab_size <= GPU_MIN_LOGITS:
        return 0
    return max(MIN_BLOCK_ROWS, GPU_BLOCK_ELEMENTS // vocab_size)


def linear_cross_entropy(
    features: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, block_rows: int
) -> Tensor:
    """``F.cross_entropy(F.linear(features, weight, bias).float(), targets)`` (mean over the targets that are not
    -100) computed ``block_rows`` rows at a time, without ever holding the full logits.

    ``features`` is ``[..., D]``, ``weight`` ``[V, D]``, ``bias`` ``[V]`` or None, ``targets`` ids of the shape of
    ``features`` without its last dimension. With gradients enabled the gradients of ``features``, ``weight`` and
    ``bias`` are computed in the forward pass, block by block, and stored until backward; under ``torch.no_grad``
    (evaluation) only the loss is.
    """
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    x, y = features.reshape(-1, features.size(-1)), targets.reshape(-1)
    if x.size(0) != y.size(0):
        raise ValueError(f"features give {x.size(0)} positions but targets {y.size(0)}")
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
    inputs = (x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _LinearCrossEntropy.apply(x, weight, bias, y, block_rows, dtype)
    return _blocks(x, weight, bias, y, block_rows, dtype, (False, False, False))[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss in forward; every gradient computed there too, so that backward only scales them."""

    @staticmethod
    def forward(ctx, x, weight, bias, y, block_rows, dtype):  # noqa: ANN001 - autograd's signature
        loss, grads = _blocks(x, weight, bias, y, block_rows, dtype, ctx.needs_input_grad[:3])
        ctx.grads = grads  # not inputs or outputs: plain attributes, freed with the graph
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):  # noqa: ANN001
        # Out of place: a graph kept with retain_graph=True can be differentiated again.
        grads = tuple(None if g is None else (g * grad_loss).to(g.dtype) for g in ctx.grads)
        return (*grads, None, None, None)


def _blocks(
    x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, block_rows: int, dtype: torch.dtype,
    needs: tuple[bool, ...],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """The loop over blocks of rows: the mean loss, and the gradients of (x, weight, bias) asked for by ``needs``
    (for a loss of weight 1)."""
    n, device = x.size(0), x.device
    vocab, dim = weight.shape
    need_x, need_w, need_b = needs[0], needs[1], bool(needs[2]) and bias is not None
    # autocast would recast the float32 products below; the dtypes are chosen here instead.
    with torch.autocast(device.type, enabled=False):
        # The bias rides in the products as one more column of the weight, against a column of ones in the inputs:
        # adding it costs no pass over a block, and its gradient comes out of the weight-gradient product as one
        # more column. (``k`` columns: the weight's, then the bias.)
        w = (weight if bias is None else torch.cat([weight, bias[:, None]], 1)).to(dtype)
        k = w.size(1)
        keep = y != IGNORE_INDEX
        count = keep.sum()  # a tensor: no host synchronisation on a GPU
        safe_y = torch.where(keep, y, 0)
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_x = torch.empty_like(x) if need_x else None
        # The weight and bias gradients (or the bias's alone), summed over the blocks in float32.
        wanted = slice(0, k) if need_w else slice(dim, k) if need_b else None
        grad_wb = None
        if wanted is not None:
            # Rows padded to a multiple of 16 floats: with an odd row length MKL's product writes it at half speed.
            width = wanted.stop - wanted.start
            grad_wb = torch.zeros(vocab, -(-width // 16) * 16, device=device)[:, :width]
        rows = min(block_rows, n)
        columns = torch.arange(rows, device=device)
        ones = torch.ones(rows, 1, dtype=torch.float32, device=device)
        # One buffer for every block's logits (the last block may be shorter: a contiguous view of its start).
        buffer = torch.empty(rows * vocab, dtype=dtype, device=device)
        tile = FORWARD_TILE if device.type == "cpu" else vocab
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            r = stop - start
            xb = x[start:stop].float()
            yb, kb, cols = safe_y[start:stop], keep[start:stop], columns[:r]
            xa = (xb if bias is None else torch.cat([xb, ones[:r]], 1)).to(dtype)
            z = buffer[: r * vocab].view(r, vocab)
            for t0 in range(0, vocab, tile):
                torch.mm(xa, w[t0 : t0 + tile].t(), out=z[:, t0 : t0 + tile])
            z = z.float()
            target_logit = z[cols, yb]
            top = z.amax(1)
            p = torch.softmax(z, 1)
            # log-sum-exp = max + log(sum of exp(z - max)), and the largest probability is exactly 1 / that sum.
            row_loss = top - p.amax(1).log() - target_logit
            total += torch.where(kb, row_loss, 0.0).sum()
            if not (need_x or grad_wb is not None):
                continue
            p[cols, yb] -= 1.0  # softmax - one-hot: the gradient of the block's loss with respect to its logits
            scale = (kb / count)[:, None]  # the mean over the kept targets, applied to the small operands
            pc = p.to(dtype)
            if need_x:
                grad_x[start:stop] = (torch.mm(pc, w[:, :dim]).float() * scale).to(x.dtype)
            if grad_wb is not None:
                scaled = (torch.cat([xb, ones[:r]], 1) if bias is not None else xb)[:, wanted] * scale
                if dtype == torch.float32:
                    grad_wb.addmm_(pc.t(), scaled)
                else:
                    grad_wb += torch.mm(pc.t(), scaled.to(dtype))
        loss = total / count
    grad_w = grad_wb[:, :dim].to(weight.dtype) if need_w else None
    grad_b = grad_wb[:, -1].to(bias.dtype) if need_b else None
    return loss, (grad_x, grad_w, grad_b)
