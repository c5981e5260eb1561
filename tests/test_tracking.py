"""Experiment tracking with real W&B runs in offline mode (never mocked), CSV logs and the curve plotter."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from conftest import FIT, ROOT, fit_args

from rnnlm.fit import main as fit_main
from rnnlm.training.tracking import choose_wandb_mode, has_wandb_credentials, read_wandb_records


def _tiny(corpus: Path, out: Path, steps: int = 6) -> list[str]:
    return fit_args(
        out, corpus,
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "3", "--trainer.limit_test_batches", "3",
        "--trainer.log_every_n_steps", "1",
        "--sample.max_new_tokens", "12",
    )  # fmt: skip


def _records(run_dir: Path) -> dict[str, list]:
    # W&B's service process writes the run file; on a loaded machine it may still be writing when finish() returns.
    path = next(run_dir.glob("run-*.wandb"))
    size, deadline = -1, time.monotonic() + 60
    while path.stat().st_size != size and time.monotonic() < deadline:
        size = path.stat().st_size
        time.sleep(1.0)
    by_kind: dict[str, list] = {}
    for record in read_wandb_records(path):
        by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)
    return by_kind


def _items(items) -> dict[str, object]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_offline_run_holds_the_config_metrics_and_samples(corpus_dir, tmp_path, offline, capsys):
    import wandb

    assert wandb.run is None  # every earlier run in this process was closed by the CLI
    loggers = json.dumps([
        {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "rnnlm-test"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}},
    ])  # fmt: skip
    cli = fit_main([*_tiny(corpus_dir, tmp_path), "--trainer.logger", loggers])
    out = capsys.readouterr().out
    assert "W&B is offline" in out and "wandb sync" in out

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = _records(runs[0])

    config = {}
    for record in records["config"]:
        config.update(_items(record.config.update))
    assert config["rnnlm_version"]
    assert config["config"]["data"]["source"] == str(corpus_dir)
    assert config["config"]["model"]["config"]["hidden_size"] == 16
    assert config["parameters"] == sum(p.numel() for p in cli.model.parameters())
    assert config["data"]["splits"]["train"]["tokens"] == cli.datamodule.stats["train"]["tokens"]
    assert config["data"]["streams"] == 2 and config["data"]["tokenizer"] == "char"

    # Per-step training metrics hold what the trainer computed (the CSV logger saw the same values).
    history = [_items(r.history.item) for r in records["history"]]
    wandb_loss = {int(h["trainer/global_step"]): h["train/loss"] for h in history if "train/loss" in h}
    csv_rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    csv_loss = {int(r["step"]): float(r["train/loss"]) for r in csv_rows if r.get("train/loss")}
    assert len(wandb_loss) == 6 and wandb_loss.keys() == csv_loss.keys()
    for step, value in csv_loss.items():
        assert wandb_loss[step] == pytest.approx(value, rel=1e-6)
    step_keys = set().union(*history)
    for key in ("train/ppl", "train/bpc", "lr", "train/grad_norm", "val/loss", "val/ppl", "val/bpc"):
        assert key in step_keys, key

    # The samples table: one row per validation pass plus the final sample, as the callback produced them.
    sampler = next(c for c in cli.trainer.callbacks if type(c).__name__ == "TextSample")
    tables = sorted(runs[0].glob("files/media/table/samples_*.table.json"), key=lambda p: p.stat().st_mtime)
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "prompt", "continuation", "temperature"]
    assert last["data"] == [list(row) for row in sampler.samples]
    assert len(last["data"]) == 3  # validations at steps 3 and 6, and the end

    # The test metrics end up in the run summary.
    summary = {}
    for record in records["summary"]:
        summary.update(_items(record.summary.update))
    assert summary["test/loss"] == pytest.approx(float(cli.trainer.callback_metrics["test/loss"]), rel=1e-6)


@pytest.mark.slow  # a training in a fresh process
def test_no_credentials_and_no_mode_goes_offline_at_once(corpus_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "home" / ".netrc"))
    proc = subprocess.run([*FIT, *_tiny(corpus_dir, tmp_path, steps=2)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B is offline" in proc.stdout
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    # Offline from the start: no online run was begun, and nothing tried to reach the W&B servers.
    assert not list((tmp_path / "wandb").glob("run-*"))  # an online run's folder (offline ones: offline-run-*)
    assert "Network error" not in proc.stdout + proc.stderr


@pytest.mark.slow  # a training in a fresh process
def test_disabled_mode_writes_no_run(corpus_dir, tmp_path):
    # A fresh process: wandb keeps the mode of its first run for the rest of a process.
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([*FIT, *_tiny(corpus_dir, tmp_path, steps=2)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Trainer.fit` stopped: `max_steps=2` reached" in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("offline-run-*")) and not list(tmp_path.rglob("*.wandb"))


def test_log_model_offline_does_not_crash(corpus_dir, tmp_path, offline):
    cli = fit_main([*_tiny(corpus_dir, tmp_path, steps=3), "--trainer.logger.init_args.log_model", "true"])
    assert Path(cli.trainer.checkpoint_callback.best_model_path).is_file()


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_job_makes_one_run(corpus_dir, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [*FIT, *_tiny(corpus_dir, tmp_path, steps=3),
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--sample.max_new_tokens", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1


def test_mode_choice(tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_wandb_credentials()
    assert choose_wandb_mode() == "offline" and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert has_wandb_credentials()
    assert choose_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_wandb_mode() == "disabled"  # the user's choice wins


def test_plot_curves_from_csv_logs(corpus_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from plot_curves import plot_curves

    fit_main([*_tiny(corpus_dir, tmp_path), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
              "--trainer.logger.save_dir", str(tmp_path / "csv")])
    metrics = next((tmp_path / "csv").rglob("metrics.csv"))
    png = tmp_path / "curves.png"
    drawn = plot_curves(metrics, png)
    assert set(drawn) == {f"{s}/{m}" for s in ("train", "val") for m in ("loss", "ppl", "bpc")}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_logger_named_alone_on_the_command_line_writes_under_the_run_folder(corpus_dir, tmp_path):
    """`--trainer.logger lightning.pytorch.loggers.CSVLogger`, as the configs' comments suggest: CSVLogger has no
    default save_dir, so the run's folder (default_root_dir) is used, as for W&B, instead of a parser error."""
    cli = fit_main([*_tiny(corpus_dir, tmp_path / "a", steps=3), "--test_after_fit", "false",
                    "--trainer.logger=lightning.pytorch.loggers.CSVLogger"])
    assert Path(cli.trainer.logger.save_dir) == tmp_path / "a"
    assert next((tmp_path / "a").rglob("metrics.csv")).stat().st_size > 0
    cli = fit_main([*_tiny(corpus_dir, tmp_path / "b", steps=1), "--test_after_fit", "false",
                    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                    str(tmp_path / "csv")])
    assert Path(cli.trainer.logger.save_dir) == tmp_path / "csv"  # one the user gives wins


def test_a_resumed_run_continues_its_wandb_run_and_checkpoint_folder(corpus_dir, tmp_path, offline):
    first = fit_main([*_tiny(corpus_dir, tmp_path, steps=3), "--test_after_fit", "false"])
    run_id = first.trainer.logger.version
    last = Path(first.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    assert run_id in str(last)  # the default checkpoint folder is named after the W&B run

    second = fit_main([*_tiny(corpus_dir, tmp_path, steps=6), "--test_after_fit", "false", "--ckpt_path", str(last)])
    assert second.trainer.logger.version == run_id
    assert second.trainer.logger.name == first.trainer.logger.name
    assert Path(second.trainer.checkpoint_callback.dirpath) == last.parent
    assert second.trainer.global_step == 6
    # Offline run folders are named offline-run-<start time to the second>-<run id>, and W&B appends -1 when the
    # second process starts within the same second as the first.
    runs = [r for r in (tmp_path / "wandb").glob("offline-run-*") if re.fullmatch(rf".*-{run_id}(-\d+)?", r.name)]
    assert len(runs) == 2, "the resumed process appends to the same W&B run id"


class StepLosses(L.Callback):
    """The loss each training step returned, by the global step after it."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss[trainer.global_step] = float(outputs["loss"])


def test_step_metrics_are_logged_on_the_steps_the_loggers_write(corpus_dir, tmp_path):
    # The training metrics are computed and logged only every log_every_n_steps (self.log is costly in Lightning):
    # every row the logger writes must still hold that very step's loss, and no step may be missing.
    cli = fit_main([
        *_tiny(corpus_dir, tmp_path, steps=12), "--trainer.log_every_n_steps", "4", "--trainer.val_check_interval", "6",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "csv"),
        f"--trainer.callbacks+={__name__}.StepLosses",
    ])  # fmt: skip
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, StepLosses))
    rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    logged = {int(r["step"]): r for r in rows if r.get("train/loss")}
    assert sorted(logged) == [3, 7, 11]  # Lightning's step index of the 4th, 8th and 12th optimizer steps
    for step, row in logged.items():
        assert float(row["train/loss"]) == pytest.approx(recorder.loss[step + 1], rel=1e-6)
        assert row["lr"] and row["train/grad_norm"] and row["train/ppl"]
    assert cli.trainer.global_step == 12


# ----------------------------------------------------------------------------------------- sweeps, artifacts
@pytest.mark.slow  # a fresh process, as the agent starts: W&B reads WANDB_RUN_ID once per process
def test_a_sweep_agents_run_is_used_as_it_is(corpus_dir, tmp_path):
    """What `wandb agent` does for each run of configs/sweeps/quickstart.yaml: it creates the run (WANDB_RUN_ID,
    WANDB_SWEEP_ID, the parameters in WANDB_SWEEP_PARAM_PATH) and starts the sweep's command with the parameters
    as --name=value flags (built here by wandb's own function). rnnlm must log into that run, under the name W&B
    gave it, and start no other."""
    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    from wandb.sdk.lib import config_util

    sweep = yaml.safe_load((ROOT / "configs" / "sweeps" / "quickstart.yaml").read_text())
    assert sweep["metric"] == {"name": "val/loss", "goal": "minimize"}
    params = {name: {"value": spec["values"][0] if "values" in spec else spec.get("value", spec.get("min"))}
              for name, spec in sweep["parameters"].items()}
    params["model.config.tie_weights"] = {"value": True}  # passed as "True"
    run_id, sweep_id = "agentrun1", "sweep42"
    param_path = tmp_path / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    config_util.save_config_file_from_dict(str(param_path), params)
    flags = create_sweep_command_args({"args": params})["args"]
    assert "--model.config.hidden_size=128" in flags and "--model.config.tie_weights=True" in flags
    # The sweep's command as the agent expands it, the test's own settings (data, folders, a short run) inserted
    # before the agent's flags, which win.
    own = fit_args(tmp_path, corpus_dir, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
                   "--trainer.limit_test_batches", "2", "--data.batch_size", "2", "--trainer.accelerator", "cpu",
                   tiny=False)[2:]  # without its --config: the sweep's command has one
    # ${interpreter} is a bare `python` found on PATH (wandb_agent.py): the venv must be active, as the sweep says.
    expand = {"${env}": ["/usr/bin/env"], "${interpreter}": ["python"], "${args}": [*own, *flags]}
    cmd = [part for piece in sweep["command"] for part in expand.get(piece, [piece])]
    cmd = [str(ROOT / part) if part.endswith(".yaml") else part for part in cmd]
    active = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # venv active
    env = {**os.environ, **active, "WANDB_MODE": "offline", "WANDB_SWEEP_ID": sweep_id, "WANDB_RUN_ID": run_id,
           "WANDB_SWEEP_PARAM_PATH": str(param_path), "WANDB_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert [r.name.endswith(f"-{run_id}") for r in runs] == [True]  # one run: the agent's
    records = _records(runs[0])
    run = records["run"][0].run
    assert run.run_id == run_id and run.sweep_id == sweep_id
    assert run.display_name == ""  # not renamed: W&B names a sweep's runs itself
    config = {}
    for record in records["config"]:
        config.update(_items(record.config.update))
    resolved = config["config"]
    model = resolved["model"]["config"]
    assert (model["hidden_size"], model["num_layers"], model["tie_weights"]) == (128, 1, True)
    assert resolved["data"]["bptt"] == 64 and resolved["optimizer"]["init_args"]["lr"] == pytest.approx(0.0003)
    assert f"checkpoints in {tmp_path / 'rnnlm' / run_id / 'checkpoints'}" in proc.stdout


def test_a_run_the_caller_started_is_used_and_left_open(corpus_dir, tmp_path, offline):
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="mine", name="my-own-run")
    try:
        cli = fit_main(_tiny(corpus_dir, tmp_path, steps=2))
        assert cli.trainer.logger.version == run.id and cli.trainer.logger.experiment is run
        assert wandb.run is run and run.name == "my-own-run"  # not renamed, not finished: the caller's
    finally:
        run.finish()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1


def test_the_equals_form_of_flags_is_accepted_and_old_paths_are_named():
    from rnnlm.errors import ConfigError
    from rnnlm.training.cli import _refuse_moved_settings

    _refuse_moved_settings(["--model.config.hidden_size=16", "--model.init_from=someone/model"])
    with pytest.raises(ConfigError, match=r"--model.hidden_size \(now --model.config.hidden_size\)"):
        _refuse_moved_settings(["--model.hidden_size=16"])


def test_log_model_logs_the_exported_folder_as_a_model_artifact(corpus_dir, tmp_path, offline):
    import torch

    import rnnlm
    from rnnlm.sharing.export import logits_difference
    from rnnlm.sharing.folders import FILES

    cli = fit_main([*_tiny(corpus_dir, tmp_path, steps=6), "--trainer.logger.init_args.log_model", "true"])
    run_id = cli.trainer.logger.version
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    folder = best.parent.parent / "model"
    identical, _ = logits_difference(rnnlm.load(best), rnnlm.load(folder))
    assert identical and sorted(p.name for p in folder.iterdir()) == sorted(FILES)

    records = _records(next((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")))
    ours = [r.artifact for r in records.get("artifact", []) if r.artifact.name == f"rnnlm-{run_id}"]
    assert len(ours) == 1 and ours[0].type == "model"
    assert {entry.path for entry in ours[0].manifest.contents} == set(FILES)
    metadata = json.loads(ours[0].metadata)
    saved = torch.load(best, weights_only=True)["rnnlm"]["metrics"]
    assert metadata["val/loss"] == saved["val"]["loss"] and metadata["test/loss"] == saved["test"]["loss"]

    # The model card: what the checkpoint knows, nothing unknown.
    card = (folder / "README.md").read_text()
    run_name = cli.trainer.logger.experiment.name
    assert run_name.startswith("quickstart-") and f"Run `{run_name}` (id `{run_id}`" in card
    tested = f"| test (`{Path(best).name}`, step {saved['test']['step']:,}) | {saved['test']['loss']:.4f} |"
    assert f"| validation | {saved['val']['loss']:.4f} |" in card and tested in card
    assert f"{cli.datamodule.stats['train']['tokens']:,} tokens" in card
    assert "configs/quickstart.yaml" in card and "library_name: rnnlm" in card
    for unknown in ("None", "null", "TODO", "More Information Needed", "[", "?"):
        assert unknown not in card.split("```yaml")[0], unknown


def test_the_classifier_and_the_lm_record_the_same_run_facts(corpus_dir, tmp_path, offline):
    """One writer of checkpoint["rnnlm"]: a classifier run records its W&B run (project and run name) exactly as a
    language-model run of the same logger settings does."""
    from rnnlm.classify import train as classify_train
    from rnnlm.files import load_safely

    logger = ["--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.WandbLogger",
                                              "init_args": {"project": "rnnlm-test", "name": "one-run"}})]
    lm = fit_main([*_tiny(corpus_dir, tmp_path / "lm", steps=3), "--test_after_fit", "false", *logger])
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("text\tlabel\n" + "".join(f"{'ab' * (i % 5 + 1)}\t{i % 2}\n" for i in range(40)))
    clf = classify_train([
        "--config", str(ROOT / "configs" / "nsmc_sentiment_scratch.yaml"), "--data.source", str(labelled),
        "--data.revision", "null", "--data.text_field", "text", "--data.label_field", "label",
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "clf"),
        "--checkpoint.dirpath", str(tmp_path / "clf" / "checkpoints"), "--trainer.enable_progress_bar", "false",
        "--model.config.hidden_size", "8", "--model.config.embedding_dim", "4", "--model.head_hidden", "4",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--data.batch_size", "8", *logger,
    ])  # fmt: skip
    facts = []
    for cli in (lm, clf):
        saved = load_safely(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")["rnnlm"]
        facts.append(saved["wandb_run"])
    assert facts[0]["project"] == facts[1]["project"] == "rnnlm-test"
    assert facts[0]["name"] == facts[1]["name"] == "one-run"
    assert facts[0]["id"] != facts[1]["id"]  # two runs, recorded the same way
