"""rnnlm.training.callbacks: what each callback does to a training step, through the real Trainer or with the few
trainer attributes a hook reads. Clocks are fakes: no test depends on how fast this machine is."""

from __future__ import annotations

import types
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_data, tiny_model, tiny_trainer

import rnnlm
import rnnlm.training.callbacks
from rnnlm.text.streams import ChunkLoader
from rnnlm.training.callbacks import ChunkLengthLR, NonFiniteGuard, TextSample, TokensPerSecond


def _guard(trainer: L.Trainer) -> NonFiniteGuard:
    return next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))


# ----------------------------------------------------------------------------------------- NonFiniteGuard
class GradNorms(L.Callback):
    """The total gradient norm of each step, as the optimizer is about to see it (before clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


class NanGradientAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(pl_module.parameters()).grad.view(-1)[0] = float("nan")


def test_the_guard_logs_the_gradient_norm_before_clipping_on_the_steps_the_loggers_write(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path)
    torch.manual_seed(0)
    norms = GradNorms()
    trainer = tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0, log_every_n_steps=2, gradient_clip_val=1e-3,
                           callbacks=[norms])
    trainer.fit(tiny_model(data.vocab_size), datamodule=data)
    assert len(norms.norms) == 3 and min(norms.norms) > 1e-3  # clipping had work to do
    # Written on the second step only (step index 1); the third's norm was not logged.
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(norms.norms[1], rel=1e-5)
    assert norms.norms[2] != pytest.approx(norms.norms[1], rel=1e-5)


def test_ignore_does_not_check(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path)
    torch.manual_seed(0)
    model = tiny_model(data.vocab_size, on_nonfinite="ignore")
    trainer = tiny_trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[NanGradientAt(2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 5 and _guard(trainer).skipped_steps == 0
    assert not [w for w in caught if "step skipped" in str(w.message)]
    assert not torch.isfinite(next(model.parameters())).all()  # the NaN step reached the weights


def test_the_count_of_skipped_steps_survives_a_resume(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path)
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[NanGradientAt(2)])
    with pytest.warns(UserWarning, match="step skipped"):
        trainer.fit(tiny_model(data.vocab_size, on_nonfinite="skip"), datamodule=data)
    assert _guard(trainer).skipped_steps == 1
    trainer.save_checkpoint(tmp_path / "skipped.ckpt")
    resumed = tiny_trainer(tmp_path, max_steps=6, limit_val_batches=0)
    resumed.fit(tiny_model(data.vocab_size, on_nonfinite="skip"), datamodule=data,
                ckpt_path=str(tmp_path / "skipped.ckpt"), weights_only=False)
    assert resumed.global_step == 6 and _guard(resumed).skipped_steps == 1


# ----------------------------------------------------------------------------------------- ChunkLengthLR
def _optimizer(lrs=(0.1, 0.01)) -> tuple[torch.optim.Optimizer, list[list[float]]]:
    """An SGD optimizer with a parameter group per rate, and the rates each of its steps ran with."""
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr} for lr in lrs]
    optimizer = torch.optim.SGD(groups)
    seen: list[list[float]] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    return optimizer, seen


def _chunk_trainer(optimizer, variable_length: bool) -> types.SimpleNamespace:
    loader = ChunkLoader(np.arange(200).reshape(2, 100), bptt=12, variable_length=variable_length)
    return types.SimpleNamespace(train_dataloader=loader, optimizers=[optimizer])


def _step(callback: ChunkLengthLR, trainer, length: int, run_optimizer: bool = True) -> None:
    """One training step on a chunk of ``length`` tokens, as Lightning calls the hooks."""
    optimizer = trainer.optimizers[0]
    batch = (torch.zeros(2, length, dtype=torch.long), torch.zeros(2, length, dtype=torch.long))
    callback.on_train_batch_start(trainer, None, batch, 0)
    callback.on_before_optimizer_step(trainer, None, optimizer)
    if run_optimizer:
        optimizer.step()
    callback.on_train_batch_end(trainer, None, None, batch, 0)


def test_a_variable_length_chunk_scales_the_rate_of_its_step_only():
    optimizer, seen = _optimizer()
    trainer, callback = _chunk_trainer(optimizer, variable_length=True), ChunkLengthLR()
    callback.on_train_start(trainer, None)
    _step(callback, trainer, 6)  # half of bptt=12
    _step(callback, trainer, 18)
    assert seen == [pytest.approx([0.05, 0.005]), pytest.approx([0.15, 0.015])]
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]  # the configured rates, between steps
    # A step the GradScaler skips (no optimizer.step) gets its rates back at the end of the batch all the same.
    _step(callback, trainer, 3, run_optimizer=False)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]


def test_fixed_length_chunks_keep_the_configured_rate():
    optimizer, seen = _optimizer()
    trainer, callback = _chunk_trainer(optimizer, variable_length=False), ChunkLengthLR()
    callback.on_train_start(trainer, None)
    _step(callback, trainer, 6)
    assert seen == [[0.1, 0.01]]


# ----------------------------------------------------------------------------------------- TokensPerSecond
class Clock:
    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def perf_counter(self) -> float:
        return self.now


def _log_recorder() -> tuple[types.SimpleNamespace, list]:
    logged: list = []
    module = types.SimpleNamespace(log=lambda name, value, **kw: logged.append((name, float(value), kw)))
    return module, logged


def test_tokens_per_second_over_each_logging_window(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(rnnlm.training.callbacks, "time", clock)
    module, logged = _log_recorder()
    trainer = types.SimpleNamespace(world_size=2, log_every_n_steps=2, global_step=0)
    batch = (torch.zeros(4, 5), torch.zeros(4, 5))  # 20 targets on each of 2 processes
    callback = TokensPerSecond()
    callback.on_train_epoch_start(trainer, module)
    for step, now in enumerate([10.0, 11.0, 13.0, 15.0], start=1):  # the clock when each batch ends
        clock.now, trainer.global_step = now, step
        callback.on_train_batch_end(trainer, module, None, batch, step - 1)
    # The first batch only starts the clock; then 40 tokens in 1 s, and 80 tokens in the 4 s of steps 3 and 4.
    assert [(name, rate) for name, rate, _ in logged] == [("train/tokens_per_s", 40.0), ("train/tokens_per_s", 20.0)]
    assert all(kw["prog_bar"] and kw["on_step"] and not kw["on_epoch"] for _, _, kw in logged)
    # A new epoch starts a new window: its first batch (start-up work) is not timed.
    callback.on_train_epoch_start(trainer, module)
    clock.now, trainer.global_step = 100.0, 6
    callback.on_train_batch_end(trainer, module, None, batch, 0)
    assert len(logged) == 2


def test_tokens_per_second_counts_what_it_is_told_and_never_divides_by_zero(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(rnnlm.training.callbacks, "time", clock)
    module, logged = _log_recorder()
    trainer = types.SimpleNamespace(world_size=1, log_every_n_steps=1, global_step=1)
    callback = TokensPerSecond(count=lambda batch: batch["tokens"])  # as the classifier counts its texts' tokens
    callback.on_train_batch_end(trainer, module, None, {"tokens": 7}, 0)
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, module, None, {"tokens": 7}, 1)  # no time has passed: nothing logged
    clock.now, trainer.global_step = 52.0, 3
    callback.on_train_batch_end(trainer, module, None, {"tokens": 7}, 2)
    assert [rate for _, rate, _ in logged] == [7.0]  # both batches' 14 tokens over the 2 s


# ----------------------------------------------------------------------------------------- TextSample
class TableLogger:
    def __init__(self) -> None:
        self.tables: list[tuple] = []

    def log_table(self, key, columns, data, step):
        self.tables.append((key, columns, data, step))


def _sampling(checkpoint, **settings) -> tuple[TextSample, types.SimpleNamespace, types.SimpleNamespace, str]:
    lm = rnnlm.load(checkpoint)
    module = types.SimpleNamespace(model=lm.model, tokenizer_json=lm.tokenizer.to_str())
    trainer = types.SimpleNamespace(global_step=4, loggers=[TableLogger()], sanity_checking=False)
    args = {"prompt": "the ", "max_new_tokens": 12, "temperature": 0.5, "top_k": 5, "seed": 3, **settings}
    expected = lm.sample(args["prompt"], max_new_tokens=args["max_new_tokens"], temperature=args["temperature"],
                         top_k=args["top_k"], seed=args["seed"])
    return TextSample(**args), trainer, module, expected


def test_text_sample_samples_as_the_trained_model_does_and_keeps_a_growing_table(tiny_lm_checkpoint, capsys):
    sampler, trainer, module, expected = _sampling(tiny_lm_checkpoint)
    sampler.on_validation_end(trainer, module)
    assert sampler.samples == [[4, "the ", expected, 0.5]]
    assert capsys.readouterr().out == ""  # validation samples are not printed unless asked
    trainer.global_step = 9
    sampler.on_train_end(trainer, module)
    assert f"--- sample after 9 steps ---\nthe {expected}\n---" in capsys.readouterr().out
    assert sampler.samples[1] == [9, "the ", expected, 0.5]  # the same seed: the same text
    tables = trainer.loggers[0].tables
    assert [(key, columns, step) for key, columns, _, step in tables] == [("samples", TextSample.COLUMNS, 4),
                                                                        ("samples", TextSample.COLUMNS, 9)]
    assert tables[0][2] == sampler.samples[:1] and tables[1][2] == sampler.samples


def test_text_sample_prints_validation_samples_when_asked_and_skips_the_sanity_check(tiny_lm_checkpoint, capsys):
    sampler, trainer, module, expected = _sampling(tiny_lm_checkpoint, print_every_validation=True)
    trainer.sanity_checking = True
    sampler.on_validation_end(trainer, module)
    assert sampler.samples == []
    trainer.sanity_checking = False
    sampler.on_validation_end(trainer, module)
    assert f"--- sample at step 4 ---\nthe {expected}\n---" in capsys.readouterr().out


@pytest.mark.parametrize(
    "settings, tokenizer, samples_at_the_end",
    [({"every_validation": False}, True, 1), ({"max_new_tokens": 0}, True, 0), ({}, False, 0)],
    ids=["only-at-the-end", "off", "no-tokenizer"],
)
def test_text_sample_when_not_to_sample(tiny_lm_checkpoint, settings, tokenizer, samples_at_the_end, capsys):
    sampler, trainer, module, _ = _sampling(tiny_lm_checkpoint, **settings)
    if not tokenizer:  # a model trained on plain loaders
        module.tokenizer_json = None
    sampler.on_validation_end(trainer, module)
    assert sampler.samples == []
    sampler.on_train_end(trainer, module)
    assert len(sampler.samples) == samples_at_the_end
    assert ("--- sample after" in capsys.readouterr().out) == bool(samples_at_the_end)
