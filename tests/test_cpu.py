"""rnnlm.cpu: the process settings the commands apply for CPU speed, and the recurrent kernels under bf16 autocast.

The settings change the whole process, so they are applied for real only in a fresh one; here their calls are
checked against a stand-in C library."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from rnnlm import cpu

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls: dict[int, int] = {}
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls[param] = value
        return self.result


def _libc(monkeypatch, libc) -> None:
    monkeypatch.setattr(cpu.sys, "platform", "linux")

    def load(name):
        assert name == "libc.so.6"
        if isinstance(libc, Exception):
            raise libc
        return libc

    monkeypatch.setattr(cpu.ctypes, "CDLL", load)


def test_keep_freed_memory_keeps_large_blocks_mapped_and_untrimmed(monkeypatch):
    libc = FakeLibc()
    _libc(monkeypatch, libc)
    assert cpu.keep_freed_memory() is True
    assert set(libc.calls) == {M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD}
    step_buffer = 93 * 2**20  # logits of the WikiText-2 recipe: served from the heap, not mmap, and kept
    assert libc.calls[M_MMAP_THRESHOLD] > step_buffer and libc.calls[M_TRIM_THRESHOLD] > step_buffer


@pytest.mark.parametrize("libc", [FakeLibc(result=0), OSError("no glibc")], ids=["refused", "no-libc"])
def test_keep_freed_memory_says_when_it_did_not_take_effect(monkeypatch, libc):
    _libc(monkeypatch, libc)
    assert cpu.keep_freed_memory() is False


def test_keep_freed_memory_leaves_other_systems_alone(monkeypatch):
    _libc(monkeypatch, AssertionError("a C library was loaded on macOS"))
    monkeypatch.setattr(cpu.sys, "platform", "darwin")
    assert cpu.keep_freed_memory() is False


def test_in_a_fresh_process_denormals_flush_to_zero_and_freed_memory_is_kept():
    script = (
        "import torch; from rnnlm import cpu\n"
        "x = torch.tensor([1e-39])  # subnormal in float32\n"
        "before = (x * 1.0).item()\n"
        "flushed = cpu.flush_denormals()\n"
        "print(before != 0.0, flushed, (x * 1.0).item() == 0.0 if flushed else None, cpu.keep_freed_memory())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    subnormal_before, flushed, zero_after, kept = done.stdout.split()
    assert subnormal_before == "True"
    if flushed == "True":  # x86 with FTZ/DAZ
        assert zero_after == "True"
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert kept == "True"


# ----------------------------------------------------------------------------------------- bf16 recurrent kernels
@pytest.fixture
def mkldnn_enabled():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = True
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.mark.parametrize("onednn_bf16", [True, False])
def test_outside_bf16_autocast_the_kernels_stay(monkeypatch, mkldnn_enabled, onednn_bf16):
    monkeypatch.setattr(cpu, "_onednn_runs_bf16_rnns", lambda: onednn_bf16)
    with cpu.rnn_kernels_for_autocast():
        assert torch.backends.mkldnn.enabled


def test_under_bf16_autocast_onednn_runs_the_rnns_where_it_can(monkeypatch, mkldnn_enabled):
    monkeypatch.setattr(cpu, "_onednn_runs_bf16_rnns", lambda: True)
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu.rnn_kernels_for_autocast():
        assert torch.backends.mkldnn.enabled


def test_under_bf16_autocast_without_onednn_bf16_torch_kernels_run_and_onednn_comes_back(monkeypatch, mkldnn_enabled):
    monkeypatch.setattr(cpu, "_onednn_runs_bf16_rnns", lambda: False)
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu.rnn_kernels_for_autocast():
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled
    with pytest.raises(ValueError), torch.autocast("cpu", dtype=torch.bfloat16), cpu.rnn_kernels_for_autocast():
        raise ValueError("a failing step")
    assert torch.backends.mkldnn.enabled  # back after an error too


def test_an_lstm_runs_under_bf16_autocast_on_this_cpu(mkldnn_enabled):
    torch.manual_seed(0)
    lstm, x = torch.nn.LSTM(4, 6), torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu.rnn_kernels_for_autocast():
        out, _ = lstm(x)
    assert out.shape == (5, 2, 6) and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), lstm(x)[0], atol=0.05, rtol=0.05)  # bf16 or fp32 kernels: same result
