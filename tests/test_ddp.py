"""DDP on CPU (gloo): N processes x B streams must train exactly like 1 process x N*B streams.

Runs the real entry point in subprocesses: Lightning's own DDP launcher for one machine, and torchrun for two
"nodes" on loopback, the way a cluster job starts.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIT, fit_args, make_text, sigterm_once_training

STEPS = 6

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def _args(corpus: Path, out: Path, batch_size: int) -> list[str]:
    return fit_args(
        out, corpus,
        "--data.batch_size", str(batch_size),
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(STEPS),
        "--trainer.val_check_interval", str(STEPS),
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(out),
        "--checkpoint.dirpath", str(out / "ckpt"),
        "--test_after_fit", "false",
    )  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _result(out: Path) -> tuple[dict, float]:
    weights = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    rows = list(csv.DictReader(open(next(out.glob("lightning_logs/version_*/metrics.csv")))))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 1
    return weights, val[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict, float]:
    """The reference: one process with 4 streams."""
    root = tmp_path_factory.mktemp("single")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(make_text(600, seed=1))
    (corpus / "valid.txt").write_text(make_text(80, seed=2))
    (corpus / "test.txt").write_text(make_text(80, seed=3))
    out = root / "run"
    _run([*FIT, *_args(corpus, out, 4), "--trainer.devices", "1"], root)
    return (corpus, *_result(out))


def _assert_same(result: tuple[dict, float], reference: tuple[dict, float]) -> None:
    weights, val = result
    ref_weights, ref_val = reference
    assert weights.keys() == ref_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert val == pytest.approx(ref_val, rel=1e-5)


def test_two_processes_train_like_one_with_twice_the_streams(single, tmp_path):
    corpus, ref_weights, ref_val = single
    out = tmp_path / "ddp"
    log = _run(
        [*FIT, *_args(corpus, out, 2), "--trainer.devices", "2",
         "--trainer.strategy", "ddp"],
        tmp_path,
    )  # fmt: skip
    _assert_same(_result(out), (ref_weights, ref_val))
    # Data preparation happened once for the whole job, not once per rank.
    assert log.count("trained char tokenizer") == 1
    assert log.count("rnnlm: encoded train") == 1
    assert "world_size=2" in log


def test_two_nodes_with_torchrun_train_like_one_process(single, tmp_path):
    corpus, ref_weights, ref_val = single
    out = tmp_path / "nodes"
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for node_rank in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "rnnlm.fit", *_args(corpus, out, 2),
            "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    _assert_same(_result(out), (ref_weights, ref_val))
    both = "".join(logs)
    assert both.count("trained char tokenizer") == 1
    assert both.count("rnnlm: encoded train") == 1


def test_two_processes_stopped_by_sigterm_resume_exactly(single, tmp_path):
    """SIGTERM to the launching process of a 2-process job: both ranks save together (each rank's carried state
    goes into the one checkpoint) and the resumed job ends with the weights of a job that was never stopped."""
    corpus = single[0]
    longer = ["--trainer.max_steps", "60", "--trainer.val_check_interval", "20", "--resumable.every_n_train_steps",
              "2", "--trainer.devices", "2", "--trainer.strategy", "ddp"]  # fmt: skip
    fit = FIT
    ref = tmp_path / "ref"
    _run([*fit, *_args(corpus, ref, 2), *longer], tmp_path)

    out = tmp_path / "cut"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    last = out / "ckpt" / "last.ckpt"
    code, log = sigterm_once_training([*fit, *_args(corpus, out, 2), *longer], last, cwd=tmp_path, env=env)
    assert code == 128 + signal.SIGTERM, log[-4000:]
    saved = torch.load(last, weights_only=True)
    assert 0 < saved["global_step"] < 60
    carried = saved["rnnlm"]["resume"]["carried"]["train"]
    assert carried[0].shape[0] == 2, "one carried state per rank"
    assert not torch.equal(carried[0][0], carried[0][1]), "the ranks read different streams"

    _run([*fit, *_args(corpus, out, 2), *longer, "--ckpt_path", "last"], tmp_path)
    a = torch.load(ref / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 60
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
