"""The continuous pointer of Grave et al., "Improving Neural Language Models with a Continuous Cache" (ICLR 2017),
applied at evaluation time to a trained model. The paper calls it a continuous cache and AWD-LSTM's code
(``pointer.py``) a pointer; rnnlm says continuous pointer, so that "cache" only ever means the token cache on disk.

The pointer remembers, per stream, the last ``window`` pairs (h_i, w_{i+1}): the top layer's output at position i
and the token that followed it. At position t it puts on every word w the attention mass

    p_ptr(w | h_t) = sum_{i in window, w_{i+1} = w} softmax_i(theta * h_t . h_i)

and the model's prediction becomes the mixture (1 - lambda) p_model + lambda p_ptr: words seen recently in a
similar context get a boost. Nothing is trained; ``window``, ``theta`` and ``lambda`` are tuned on validation data.
Merity et al. (2017) report WikiText-2 test perplexity 65.8 -> 52.0 with window 3785, theta 0.662, lambda 0.1279.

Each chunk is handled at once: the queries of a chunk ``[B, T]`` attend over the memory plus the chunk's own earlier
positions through one batched matrix product and a mask, so there is no loop over time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnlm.errors import ConfigError


class ContinuousPointer:
    """Per-stream memory of (hidden state, next token) pairs and the pointer distribution it gives.

    Call :meth:`log_probs` chunk after chunk, in stream order; it returns the mixed log-probabilities of the
    targets and then appends the chunk to the memory.
    """

    def __init__(self, window: int, theta: float, lam: float) -> None:
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"pointer window must be a positive number of tokens, got {window!r}.")
        if theta < 0:
            raise ConfigError(f"pointer theta (the attention's inverse temperature) must be >= 0, got {theta!r}.")
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"pointer lambda (the pointer's share of the mixture) must be in [0, 1], got {lam!r}.")
        self.window = window
        self.theta = theta
        self.lam = lam
        self.keys: Tensor | None = None  # [B, M, D], M <= window
        self.values: Tensor | None = None  # [B, M]

    def reset(self) -> None:
        self.keys = self.values = None

    def attention(self, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention of each position of the chunk over what it may see.

        Returns the weights ``[B, T, M+T]`` over the memory followed by the chunk itself, the tokens ``[B, M+T]``
        those slots predict, and ``[T]``: whether position t sees any slot at all (only the first position of a
        stream does not). Position t sees the ``window`` slots just before it, never itself.
        """
        hidden = hidden.float()
        keys, values = hidden, targets
        if self.keys is not None:
            keys = torch.cat([self.keys, hidden], dim=1)
            values = torch.cat([self.values, targets], dim=1)
        memory, length = keys.size(1) - hidden.size(1), hidden.size(1)
        slot = torch.arange(memory + length, device=hidden.device)
        position = memory + torch.arange(length, device=hidden.device)[:, None]  # query t's own slot
        visible = (slot < position) & (slot >= position - self.window)  # [T, M+T]
        scores = self.theta * torch.bmm(hidden, keys.transpose(1, 2))  # [B, T, M+T]
        scores = scores.masked_fill(~visible, float("-inf"))
        seen = visible.any(dim=1)
        weights = torch.softmax(scores.masked_fill(~seen[:, None], 0.0), dim=-1) * visible
        return weights, values, seen

    def distribution(self, hidden: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
        """The full pointer distribution ``[B, T, V]`` for the chunk (zeros where nothing is visible); no update."""
        weights, values, _ = self.attention(hidden, targets)
        index = values[:, None, :].expand(-1, weights.size(1), -1)
        return weights.new_zeros(*weights.shape[:2], vocab_size).scatter_add_(-1, index, weights)

    def update(self, hidden: Tensor, targets: Tensor) -> None:
        """Append the chunk's (hidden, target) pairs, keeping the last ``window``."""
        keys = hidden.detach().float()
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=1)
            targets = torch.cat([self.values, targets], dim=1)
        self.keys, self.values = keys[:, -self.window :], targets[:, -self.window :]

    def log_probs(self, hidden: Tensor, targets: Tensor, model_log_probs: Tensor) -> Tensor:
        """Log of ``(1 - lambda) p_model + lambda p_ptr`` at the targets ``[B, T]``, then remember the chunk.

        ``hidden`` ``[B, T, D]`` is the top layer's output, ``model_log_probs`` ``[B, T]`` the model's log-probability
        of each target. Where the pointer sees nothing (a stream's first token) the model's probability stays.
        """
        weights, values, seen = self.attention(hidden, targets)
        pointer_p = (weights * (values[:, None, :] == targets[:, :, None])).sum(-1)  # [B, T]
        model_lp = model_log_probs.float()
        # In log space, so that a tiny model probability does not underflow and lambda = 0 gives the model exactly.
        lam = torch.tensor(self.lam, device=model_lp.device)
        mixed = torch.logaddexp(torch.log1p(-lam) + model_lp, lam.log() + pointer_p.log())
        self.update(hidden, targets)
        return torch.where(seen, mixed, model_lp)
