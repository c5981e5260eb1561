"""The serving path: the LM's step and the classifier exported with torch.export and as ONNX (run by onnxruntime)
give the eager model's outputs, for every cell and both stacks; what is not supported is refused by name."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rnnlm.errors import ConfigError, UserError
from rnnlm.export import main
from rnnlm.network.classifier import Classifier
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.network.serving import ClassifierStep, LMStep
from rnnlm.sharing import serving
from rnnlm.sharing.folders import ONNX_FILE

pytest.importorskip("onnxruntime")

TOLERANCE = 1e-5
V = 30
# Every cell on both stacks: the fused multi-layer module, and the layer-by-layer one (weight drop asks for it,
# with sizes per layer). The GRU ones are bidirectional: their step serves the forward direction.
CASES = [(cell, per_layer) for cell in ("lstm", "gru", "rnn_tanh") for per_layer in (False, True)]


def config(cell: str, per_layer: bool, **settings) -> RNNLMConfig:
    stack = {"weight_drop": 0.2, "hidden_sizes": [16, 12]} if per_layer else {"dropout_between": 0.2}
    return RNNLMConfig(V, cell=cell, num_layers=2, embedding_dim=8, hidden_size=16, dropout_output=0.3,
                       bidirectional=cell == "gru", **stack, **settings)


def eager_continuation(model: RNNLM, first: torch.Tensor, second: torch.Tensor) -> list[torch.Tensor]:
    """The model's own two calls, the state of the first fed to the second: logits of both, then the final state."""
    out1 = model(first)
    out2 = model(second, state=out1.state)
    return [out1.logits, out2.logits, *LMStep(model)._from_model_state(out2.state)]


def continuation(run, step: LMStep, first: torch.Tensor, second: torch.Tensor) -> list[torch.Tensor]:
    """The same two calls through ``run(ids, *state) -> (logits, *state)``, starting from zeros."""
    logits1, *state = run(first, *step.zero_state(first.size(0)))
    logits2, *state = run(second, *state)
    return [logits1, logits2, *state]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(("cell", "per_layer"), CASES)
@torch.no_grad()
def test_lm_step_exported_and_onnx_continue_text_as_the_model_does(cell, per_layer, tmp_path):
    torch.manual_seed(0)
    model = RNNLM(config(cell, per_layer)).eval()
    assert model.config.per_layer == per_layer
    step = LMStep(model)
    names = ["h_0", "c_0", "h_1", "c_1"] if cell == "lstm" else ["h_0", "h_1"]
    assert step.state_names == names

    # torch.export: the one-token step, for two batch sizes.
    program = serving.export_program(step, steps=1).module()
    for batch in (1, 3):
        first, second = torch.randint(V, (batch, 1)), torch.randint(V, (batch, 1))
        assert_close(continuation(program, step, first, second), eager_continuation(model, first, second))

    # ONNX: any batch size and length; a prompt of several tokens, then one more token.
    path = serving.write_onnx(step, tmp_path / "step.onnx")
    session = serving.onnx_session(path, threads=1)
    assert [i.name for i in session.get_inputs()] == ["ids", *names]
    assert [o.name for o in session.get_outputs()] == ["logits", *[f"{n}_out" for n in names]]
    for batch, steps in ((1, 6), (4, 3)):
        first, second = torch.randint(V, (batch, steps)), torch.randint(V, (batch, 1))
        got = continuation(lambda *inputs: serving.run_onnx(session, step, inputs), step, first, second)
        assert_close(got, eager_continuation(model, first, second))
    assert model.training is False  # exporting left the model in eval mode (no dropout switched on)


@pytest.mark.parametrize(("cell", "per_layer"), [("lstm", False), ("gru", True)])
@torch.no_grad()
def test_classifier_exported_and_onnx_give_its_logits_on_a_padded_batch(cell, per_layer, tmp_path):
    torch.manual_seed(0)
    model = Classifier(config(cell, per_layer), num_classes=3).eval()
    step = ClassifierStep(model)

    def padded_batch(batch: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(2, steps + 1, (batch,))
        lengths[0] = steps  # the longest text fills the batch; the others are padded after their text
        ids = torch.randint(V, (batch, steps)).masked_fill(torch.arange(steps) >= lengths[:, None], 0)
        return ids, lengths

    # torch.export fixes the length: one program for the padded length serves every text up to it.
    program = serving.export_program(step, steps=6).module()
    for batch in (1, 5):
        ids, lengths = padded_batch(batch, 6)
        assert_close([program(ids, lengths)], [model(ids, lengths)])

    path = serving.write_onnx(step, tmp_path / "classifier.onnx")
    session = serving.onnx_session(path, threads=1)
    for batch, steps in ((1, 4), (5, 17)):
        ids, lengths = padded_batch(batch, steps)
        assert_close(serving.run_onnx(session, step, (ids, lengths)), [model(ids, lengths)])
        # A padded text gets the logits it gets alone, through ONNX too.
        alone = serving.run_onnx(session, step, (ids[-1:, : lengths[-1]], lengths[-1:]))[0]
        assert (alone - model(ids, lengths)[-1:]).abs().max().item() <= TOLERANCE


def test_what_serving_does_not_support_is_refused_by_name():
    adaptive = RNNLM(RNNLMConfig(V, embedding_dim=8, hidden_size=16, output="adaptive", adaptive_cutoffs=[10]))
    with pytest.raises(ConfigError, match="adaptive softmax"):
        LMStep(adaptive.eval())
    with pytest.raises(ConfigError, match="training mode: call .eval"):
        LMStep(RNNLM(config("lstm", False)))
    with pytest.raises(ConfigError, match="training mode: call .eval"):
        ClassifierStep(Classifier(config("lstm", False), num_classes=2))
    step = LMStep(RNNLM(config("lstm", False)).eval())
    with pytest.raises(ConfigError, match="eval mode"):
        step.train()


def test_missing_onnx_packages_are_named_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    step = LMStep(RNNLM(config("lstm", False)).eval())
    with pytest.raises(UserError, match="onnxruntime is not installed.*pip install onnx onnxruntime"):
        serving.write_onnx(step, tmp_path / "step.onnx")
    assert not (tmp_path / "step.onnx").exists()


def test_export_command_writes_a_checked_onnx_model_into_the_folder(tiny_lm_checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    result = main(["--checkpoint", str(tiny_lm_checkpoint), "--out", str(out), "--onnx"])
    assert ONNX_FILE in result["files"] and (out / ONNX_FILE).is_file()
    assert result["onnx_max_abs_diff"] <= TOLERANCE
    assert "model.onnx run by onnxruntime" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "rnnlm"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
