"""Process-level settings that make CPU training fast; applied by the command-line entry points only."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the OS after every step.

    A training step allocates and frees the same large buffers (logits and their gradients: 93 MB each for the
    WikiText-2 recipe). By default glibc serves them with mmap and unmaps them on free, so every step page-faults
    them in again: a third of the CPU time went to the kernel, and keeping them makes the WikiText-2 recipe about
    1.4x faster on this project's 2-core machine. Returns whether the setting took effect (glibc Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 34)
    ok &= libc.mallopt(_M_TOP_PAD, 1 << 28)
    return bool(ok)


def flush_denormals() -> bool:
    """Treat subnormal floats as zero (x86 FTZ/DAZ) in this process.

    Saturated gates and vanishing gradients make values below 1e-38, which x86 CPUs handle in microcode at up to
    100x the cost of a normal multiply; flushing them changes results by less than float32 can represent. Call it
    before torch starts its thread pool, which inherits the setting. Returns whether the CPU supports it.
    """
    import torch  # deferred: importing this module must not load torch (keep_freed_memory runs first)

    return bool(torch.set_flush_denormal(True))


@functools.cache
def _onednn_runs_bf16_rnns() -> bool:
    """Whether oneDNN runs a recurrent layer in bf16 on this CPU (CPUs without bf16 instructions fail with "could
    not create a primitive descriptor"). Asked once, of a one-step LSTM."""
    import torch  # deferred: importing this module must not load torch (keep_freed_memory runs first)

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(2, 2)(torch.zeros(1, 1, 2))
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def rnn_kernels_for_autocast():
    """Under CPU autocast in bf16 (``precision="bf16-mixed"``) torch hands recurrent layers to oneDNN, which fails on
    CPUs without bf16 instructions. There the recurrent layers run on torch's own kernels, in float32; the decoder
    and softmax, where large vocabularies spend the time, stay bf16."""
    import torch  # deferred: importing this module must not load torch (keep_freed_memory runs first)

    low_precision = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32
    if not low_precision or _onednn_runs_bf16_rnns():
        yield
        return
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled
