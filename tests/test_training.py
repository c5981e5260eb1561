"""Training through the real Lightning Trainer and CLI: carried state, exact TBPTT, configs, generate, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIG_DIR, run_fit, tiny_data, tiny_model, tiny_trainer

import rnnlm
from rnnlm import evaluate, generate
from rnnlm.fit import main as fit_main
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM

# The language-model configs (those of rnnlm.fit); the classifier configs, which have a label field, are
# tested with rnnlm.classify in test_classify.py.
CONFIGS = sorted(c for c in CONFIG_DIR.glob("*.yaml") if "label_field:" not in c.read_text())


def test_validation_loss_equals_one_long_pass(corpus_dir, tmp_path):
    """Validation in chunks of 9 with the state carried equals one uninterrupted pass over each stream, and the
    reported loss is the token-weighted mean (the last chunk is shorter)."""
    data = tiny_data(corpus_dir, tmp_path, eval_batch_size=3)
    torch.manual_seed(0)
    model = tiny_model(data.vocab_size)
    metrics = tiny_trainer(tmp_path).validate(model, datamodule=data, verbose=False)[0]

    rows = torch.from_numpy(data.loader("validation").rows.astype("int64"))
    assert (rows.size(1) - 1) % 9 != 0  # so the short last chunk is exercised
    with torch.no_grad():
        logits = model.model.eval()(rows[:, :-1]).logits
        expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
    assert metrics["val/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(expected.exp().item(), rel=1e-5)
    chars_per_token = data.chars_per_token("validation")
    assert metrics["val/bpc"] == pytest.approx(expected.item() / 0.6931471805599453 / chars_per_token, rel=1e-5)


def test_training_equals_a_hand_written_tbptt_loop(corpus_dir, tmp_path):
    """The Trainer's steps are exactly truncated BPTT: same weights as a plain loop that carries the detached state
    from chunk to chunk in stream order, with the same optimizer and gradient clipping."""
    data = tiny_data(corpus_dir, tmp_path, batch_size=3, bptt=7)
    torch.manual_seed(1)
    model = tiny_model(data.vocab_size)
    reference = RNNLM(RNNLMConfig(data.vocab_size, cell="lstm", num_layers=2, embedding_dim=8, hidden_size=16))
    reference.load_state_dict(model.model.state_dict())

    steps = 25
    tiny_trainer(tmp_path, max_steps=steps, gradient_clip_val=0.5, limit_val_batches=0).fit(model, datamodule=data)

    opt = torch.optim.AdamW(reference.parameters(), lr=2e-3)  # LanguageModel's fallback optimizer
    state = None
    for step, (x, y) in enumerate(data.loader("train")):
        if step == steps:
            break
        out = reference(x, state=state)
        logits, state = out.logits, tuple(s.detach() for s in out.state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
    for (name, a), b in zip(model.model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class _Probe(L.Callback):
    """Records the carried training state at the first batch of every epoch."""

    def __init__(self):
        self.first_states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.first_states.append(pl_module.carry.states.get("train"))


def test_state_resets_each_epoch_and_validation_leaves_training_state_alone(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path)
    n_batches = 60  # epochs cut short with limit_train_batches: the boundary behaves the same, at a tenth of the cost

    def run(**kwargs):
        torch.manual_seed(2)
        model = tiny_model(data.vocab_size)
        probe = _Probe()
        tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=n_batches, callbacks=[probe], **kwargs).fit(
            model, datamodule=data
        )
        return model, probe

    plain, probe = run(limit_val_batches=0)
    assert probe.first_states == [None, None]  # h_0 = zeros at the start of every epoch
    # Validating every few steps (with its own state) must not change what training computes.
    with_val, _ = run(val_check_interval=max(2, n_batches // 3), num_sanity_val_steps=2)
    for a, b in zip(plain.state_dict().values(), with_val.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def _fit(config: Path, source: Path, tmp_path: Path, *extra: str):
    return run_fit(
        tmp_path / "run", source,
        "--model.config.embedding_dim", "16",
        "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2",
        "--trainer.val_check_interval", "3",
        "--sample.max_new_tokens", "20",
        *extra,
        config=config, cache=tmp_path / "cache",
    )  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs_end_to_end(config, corpus_dir, tmp_path, capsys):
    extra = ["--data.vocab_size", "300"] if "bpe" in config.stem else []
    if config.stem.startswith("awd_lstm"):
        extra = ["--model.config.hidden_sizes", "[16, 16, 16]", "--data.text_field", "text"]
    if config.stem.startswith("nsmc_"):  # its checkpoints go to a fixed folder, for nsmc_sentiment.yaml to find
        extra = [*extra, "--data.text_field", "text", "--checkpoint.dirpath", str(tmp_path / "checkpoints")]
    if "output: adaptive" in config.read_text():  # the tiny corpus has fewer ids than the default cutoffs
        extra = [*extra, "--model.config.adaptive_cutoffs", "[100]"]
    cli = _fit(config, corpus_dir, tmp_path, *extra)
    assert cli.trainer.global_step == 3
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert ckpt.is_file()
    out = capsys.readouterr().out
    assert "--- sample after 3 steps ---" in out
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size  # linked, never repeated by the user
    if config.stem == "wikitext2_word_lstm":
        scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
        assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        assert scheduler.factor == 0.25 and scheduler.patience == 0

    # One checkpoint file is enough to generate and evaluate.
    text = generate.main(["--checkpoint", str(ckpt), "--prompt", "the", "--max_new_tokens", "5", "--seed", "3"])
    again = generate.main(["--checkpoint", str(ckpt), "--prompt", "the", "--max_new_tokens", "5", "--seed", "3"])
    assert text == again
    result = evaluate.main(["--checkpoint", str(ckpt), "--split", "validation", "--batch_size", "2"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line)["loss"] == pytest.approx(result["loss"])
    assert result["ppl"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-6)


def test_quickstart_on_the_builtin_corpus(tmp_path, capsys):
    config = next(c for c in CONFIGS if c.stem == "quickstart")
    cli = run_fit(
        tmp_path / "run", None,
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        config=config, cache=tmp_path / "cache", tiny=False,
    )  # fmt: skip
    assert cli.datamodule.stats["train"]["tokens"] > 300_000  # the real Python docs, not a toy
    assert (Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt").is_file()
    assert "--- sample after 2 steps ---" in capsys.readouterr().out


def test_evaluate_barely_depends_on_bptt(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path)
    torch.manual_seed(3)
    model = tiny_model(data.vocab_size)
    trainer = tiny_trainer(tmp_path / "t", max_steps=20, limit_val_batches=0, enable_checkpointing=True)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    short = evaluate.evaluate(str(ckpt), "test", bptt=3, accelerator="cpu")
    long = evaluate.evaluate(str(ckpt), "test", bptt=200, accelerator="cpu")
    assert short["tokens"] == long["tokens"]
    assert short["loss"] == pytest.approx(long["loss"], rel=1e-5)


def test_checkpoint_is_self_contained_and_safe_to_load(corpus_dir, tmp_path):
    data = tiny_data(corpus_dir, tmp_path)
    model = tiny_model(data.vocab_size)
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)  # tensors and plain types only
    assert raw["rnnlm"]["tokenizer"] == data.tokenizer.to_str()
    loaded = rnnlm.load(ckpt)
    assert loaded.encoder.vocab_size == data.vocab_size and loaded.config == model.config
    for a, b in zip(model.model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_cli_overrides_and_print_config(corpus_dir, tmp_path, capsys):
    config = next(c for c in CONFIGS if c.stem == "quickstart")
    with pytest.raises(SystemExit) as exit_info:
        fit_main(["--config", str(config), "--data.bptt", "17", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "bptt: 17" in printed and "source: builtin:python-docs" in printed
    cli = _fit(config, corpus_dir, tmp_path, "--data.tokenizer", "byte", "--model.config.cell", "gru")
    assert cli.datamodule.vocab_size == 257 and cli.model.config.cell == "gru"
