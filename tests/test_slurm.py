"""The README's SLURM recipe, run as SLURM would run it: time limits and pre-emption cost nothing but the restart.

``scripts/rnnlm.sbatch`` (the script the README shows) is run by bash with the variables sbatch sets, a stand-in
``srun`` that starts one process per task with that task's variables, and a stand-in ``scontrol`` that records its
arguments. The tests play SLURM's part: the warning signal (SIGUSR1) before the time limit, then the SIGTERM with
which SLURM takes a requeued job off its nodes, then the same script again, as the requeued job. The job that was
stopped and requeued must end with the weights of a job that was never stopped, bit for bit, having trained no step
twice, and ``scontrol`` must have been asked exactly once to requeue it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, fit_args

RECIPE = ROOT / "scripts" / "rnnlm.sbatch"
JOB_ID = "4242"

SRUN = '''#!{python}
"""Stand-in srun: SLURM_NNODES x SLURM_NTASKS_PER_NODE copies of the command, each with its task's variables."""
import os, subprocess, sys
nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
tasks = []
for rank in range(nodes * per_node):
    env = {{**os.environ, "SLURM_NTASKS": str(nodes * per_node), "SLURM_PROCID": str(rank),
           "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node)}}
    tasks.append(subprocess.Popen(sys.argv[1:], env=env))
with open(os.environ["SRUN_PIDS"] + ".tmp", "w") as f:
    f.write(" ".join(str(task.pid) for task in tasks))
os.replace(os.environ["SRUN_PIDS"] + ".tmp", os.environ["SRUN_PIDS"])
codes = [task.wait() for task in tasks]
sys.exit(next((code if code > 0 else 128 - code for code in codes if code), 0))
'''


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """A folder with the stand-in srun and scontrol, and a ``python`` that is this interpreter."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, text in {
        "srun": SRUN.format(python=sys.executable),
        "scontrol": '#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n',
        "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
    }.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One run of the recipe: ``bash scripts/rnnlm.sbatch CONFIG ARGS`` as sbatch would start it."""

    def __init__(self, stand_ins: Path, work: Path, nodes: int, tasks_per_node: int, args: list[str]) -> None:
        self.scontrol_log, self.pids = work / "scontrol.log", work / f"srun-pids-{time.monotonic_ns()}"
        env = {
            **os.environ,
            "PATH": f"{stand_ins}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "rnnlm", "SLURM_NODELIST": "localhost",
            "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
            "SLURM_NTASKS": str(nodes * tasks_per_node),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "SCONTROL_LOG": str(self.scontrol_log), "SRUN_PIDS": str(self.pids),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        config, rest = args[1], args[2:]  # the script takes the config file first
        self.proc = subprocess.Popen(["bash", str(RECIPE), config, *rest], cwd=work, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def tasks(self) -> list[int]:
        _wait_for(lambda: self.pids.exists(), self)
        return [int(pid) for pid in self.pids.read_text().split()]

    def signal(self, signum: int, ranks: list[int] | None = None) -> None:
        pids = self.tasks()
        for rank in range(len(pids)) if ranks is None else ranks:
            try:
                os.kill(pids[rank], signum)
            except ProcessLookupError:
                pass  # that task has ended already

    def finish(self) -> tuple[int, str]:
        try:
            output = self.proc.communicate(timeout=300)[0]
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        return self.proc.returncode, output

    def requeues(self) -> list[str]:
        return self.scontrol_log.read_text().splitlines() if self.scontrol_log.exists() else []


def _wait_for(condition, job: Job, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job.proc.poll() is not None and not condition():
            raise AssertionError(f"the job ended first (exit status {job.proc.returncode}):\n"
                                 f"{job.proc.communicate()[0][-4000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            os.killpg(job.proc.pid, signal.SIGKILL)
            raise AssertionError("timed out")
        time.sleep(0.005)


def _run(job: Job) -> str:
    code, output = job.finish()
    assert code == 0, output[-4000:]
    return output


def _preempt(job: Job, last_glob: str, work: Path, warned: list[int] | None = None) -> str:
    """What SLURM does before a time limit with --signal=USR1@N --requeue: the warning, once training is under way
    (to the tasks ``warned``, all by default); then, once the job has asked to be requeued, SIGTERM to every task."""
    _wait_for(lambda: any(work.glob(last_glob)), job)
    job.signal(signal.SIGUSR1, warned)
    _wait_for(lambda: job.requeues(), job)
    job.signal(signal.SIGTERM)
    code, output = job.finish()
    assert code == 128 + signal.SIGUSR1, output[-4000:]
    return output


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def test_the_readme_shows_the_recipe_the_tests_run():
    script = RECIPE.read_text()
    assert f"```bash\n{script}```" in (ROOT / "README.md").read_text()
    for part in ("#SBATCH --signal=USR1@", "#SBATCH --requeue", "--ckpt_path last", "srun python -m rnnlm.fit"):
        assert part in script, part


def _args(root: Path, corpus: Path, *extra: str) -> list[str]:
    return fit_args(
        root, corpus,
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "120",
        "--trainer.val_check_interval", "50",
        "--trainer.limit_val_batches", "2",
        "--resumable.every_n_train_steps", "2",
        "--test_after_fit", "false",
        *extra,
        cache=root.parent / "cache",
    )  # fmt: skip


@pytest.mark.slow
def test_one_task_job_warned_and_requeued_continues_exactly(corpus_dir, tmp_path, stand_ins):
    """A one-task job with the config's W&B logger (offline): warned, requeued, restarted with the same script."""
    ref = tmp_path / "ref"
    _run(Job(stand_ins, tmp_path, 1, 1, _args(ref, corpus_dir)))
    reference = _weights(next(ref.glob("rnnlm/*/checkpoints/last.ckpt")))
    assert reference["global_step"] == 120

    out = tmp_path / "job"
    job = Job(stand_ins, tmp_path, 1, 1, _args(out, corpus_dir))
    log = _preempt(job, "job/rnnlm/*/checkpoints/last.ckpt", tmp_path)
    assert f"rnnlm: --ckpt_path last: no checkpoint of this run in {out} yet: starting it from scratch" in log
    stopped = re.search(r"rnnlm: stopped by SIGUSR1 after step (\d+); resumable checkpoint: (\S+) \(written", log)
    assert stopped, log[-3000:]
    step, path = int(stopped[1]), stopped[2]
    assert 0 < step < 120
    assert f"SLURM job {JOB_ID} requeued" in log
    assert job.requeues() == [f"requeue {JOB_ID}"]

    again = _run(Job(stand_ins, tmp_path, 1, 1, _args(out, corpus_dir)))  # the requeued job: the same script
    assert f"rnnlm: --ckpt_path last: continuing from {path} (step {step})" in again, "no step is trained twice"
    assert len(list(out.glob("rnnlm/*"))) == 1, "one W&B run, one checkpoint folder"
    _assert_same(_weights(Path(path)), reference)
    assert job.requeues() == [f"requeue {JOB_ID}"], "requeued once"


@pytest.mark.slow
@pytest.mark.ddp
def test_two_task_job_warned_and_requeued_on_other_nodes_continues_exactly(corpus_dir, tmp_path, stand_ins):
    """Two tasks on one node; SLURM's warning reaches one of them only (signals arrive when they arrive): both save
    together, once, and task 0 requeues the job. It restarts as two nodes with one task each (other machines, the
    same two processes) and ends like the job that was never stopped; with one task it is refused, saying why."""
    args = ["--data.batch_size", "2", "--trainer.logger", "false"]
    ref = tmp_path / "ref"
    _run(Job(stand_ins, tmp_path, 1, 2, _args(ref, corpus_dir, *args)))

    out = tmp_path / "job"
    job = Job(stand_ins, tmp_path, 1, 2, _args(out, corpus_dir, *args))
    log = _preempt(job, "job/checkpoints/last.ckpt", tmp_path, warned=[1])
    step = int(re.search(r"rnnlm: stopped by SIGUSR1 after step (\d+)", log)[1])
    assert log.count("rnnlm: stopped by SIGUSR1") == 1, "task 0 reports for both"
    assert job.requeues() == [f"requeue {JOB_ID}"]
    saved = _weights(out / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == step and saved["rnnlm"]["resume"]["world_size"] == 2

    again = _run(Job(stand_ins, tmp_path, 2, 1, _args(out, corpus_dir, *args)))
    assert f"continuing from {out / 'checkpoints' / 'last.ckpt'} (step {step})" in again
    _assert_same(_weights(out / "checkpoints" / "last.ckpt"), _weights(ref / "checkpoints" / "last.ckpt"))

    code, refused = Job(stand_ins, tmp_path, 1, 1, _args(out, corpus_dir, *args)).finish()
    assert code == 1 and "Cannot resume mid-epoch" in refused and "number of processes" in refused, refused[-3000:]
    assert "Traceback" not in refused
    assert job.requeues() == [f"requeue {JOB_ID}"]
