"""What the command faces share (rnnlm.commands): one --device option, resolved one way, and reading input lines."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from rnnlm import classify, embed, evaluate, generate, score
from rnnlm.commands import add_device_option, open_input, read_lines, resolve_device
from rnnlm.errors import ConfigError, UserError
from rnnlm.text.sources import DataError
from rnnlm.text.tokenization import batched


# ------------------------------------------------------------------------------------------------ --device
def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu(name):
    assert resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "banana", "cuda:x", "meta", ""])
def test_a_bad_name_is_refused_with_one_line(name):
    with pytest.raises(ConfigError) as info:
        resolve_device(name)
    message = str(info.value)
    assert "\n" not in message
    assert f"--device {name!r}" in message and "auto, cpu, cuda, cuda:N" in message


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "gpu"):
        with pytest.raises(ConfigError, match="asks for a GPU, but torch sees none"):
            resolve_device(name)


def test_cuda_n_and_gpu_with_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("gpu") == torch.device("cuda")  # Lightning's word, the old --accelerator gpu
    with pytest.raises(ConfigError, match=r"there is no GPU 2; torch sees 2 \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_mps_only_where_torch_has_it(monkeypatch):
    monkeypatch.setattr("rnnlm.commands._mps_available", lambda: False)
    with pytest.raises(ConfigError, match="no MPS device"):
        resolve_device("mps")
    monkeypatch.setattr("rnnlm.commands._mps_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


def test_add_device_option_with_a_hidden_alias():
    import argparse

    p = argparse.ArgumentParser()
    add_device_option(p, "--accelerator")
    assert p.parse_args([]).device == "auto"
    assert p.parse_args(["--accelerator", "cpu"]).device == "cpu"
    assert p.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    assert "--device" in p.format_help() and "--accelerator" not in p.format_help()


# ---------------------------------------------------------------------------- every command's --device
PARSERS = {
    "generate": (generate.parser, ["--checkpoint", "x"]),
    "evaluate": (evaluate.parser, ["--checkpoint", "x"]),
    "score": (score.parser, ["--checkpoint", "x", "--input", "-"]),
    "embed": (embed.parser, ["--checkpoint", "x", "--input", "-", "--out", "f.npz"]),
    "classify predict": (lambda: classify.parser("predict"), ["--checkpoint", "x", "--input", "-"]),
    "classify evaluate": (lambda: classify.parser("evaluate"), ["--checkpoint", "x"]),
}


@pytest.mark.parametrize("command", PARSERS)
def test_every_command_has_device_auto(command):
    build, required = PARSERS[command]
    p = build()
    assert p.parse_args(required).device == "auto"
    assert p.parse_args([*required, "--device", "cpu"]).device == "cpu"
    assert "--device" in p.format_help()


def test_evaluate_still_accepts_accelerator():
    p = evaluate.parser()
    assert p.parse_args(["--checkpoint", "x", "--accelerator", "cpu"]).device == "cpu"
    assert p.parse_args(["--checkpoint", "x", "--accelerator", "gpu"]).device == "gpu"
    assert "--accelerator" not in p.format_help()


def test_evaluate_resolves_the_device_before_loading(tmp_path):
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="Unknown --device 'tpu'"):
        evaluate.evaluate(missing, device="tpu")
    with pytest.raises(ConfigError, match="Unknown --device 'tpu'"):
        evaluate.evaluate(missing, accelerator="tpu")  # the old keyword


# ------------------------------------------------------------------------------------------------ input lines
def test_read_lines_of_a_file(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("one\r\ntwo\n\nthré\n".encode())
    assert list(read_lines(str(path))) == ["one", "two", "", "thré"]
    path.write_text("no newline at the end", encoding="utf-8")
    assert list(read_lines(str(path))) == ["no newline at the end"]


def test_read_lines_of_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb\n"))
    assert list(read_lines("-")) == ["a", "b"]
    stdin = io.TextIOWrapper(io.BytesIO("ü\r\nv\n".encode()), encoding="latin-1")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert list(read_lines("-")) == ["ü", "v"]  # read as UTF-8, whatever the locale
    assert not stdin.buffer.closed  # standard input is not closed


def test_a_missing_file_or_a_folder_is_refused_at_once(tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(UserError, match=r"Input file '.*missing.txt' does not exist; give a text file, or -"):
        read_lines(missing)  # before any line is taken
    with pytest.raises(UserError, match=r"is a folder; give a text file, or - to read standard input"):
        read_lines(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        open_input(missing, DataError)


def test_text_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        list(read_lines(str(path)))


def test_batched():
    assert list(batched(iter("abcde"), 2)) == [["a", "b"], ["c", "d"], ["e"]]
    assert list(batched(iter("abcd"), 2)) == [["a", "b"], ["c", "d"]]
    assert list(batched(iter(""), 3)) == []
