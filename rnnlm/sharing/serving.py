"""Serving a trained model without eager PyTorch: a ``torch.export`` program or an ONNX file of the networks'
plain-tensor faces (:mod:`rnnlm.network.serving`), each checked against the eager model.

    from rnnlm.network.serving import LMStep
    from rnnlm.sharing.serving import export_program, write_onnx, onnx_difference
    step = LMStep(rnnlm.load("exported/quickstart").model)
    program = export_program(step, steps=1)         # torch.export: a one-token step, any batch size
    write_onnx(step, "model.onnx")                  # ONNX: any batch size and any number of steps

What each exporter does with a recurrent layer (torch 2.13, found by trying both on every cell and stack):

- ``torch.export`` keeps ``aten.lstm`` / ``gru`` / ``rnn_*`` as single ops, but its shape inference unrolls them
  over time, so the number of steps is fixed when the program is made; the batch stays dynamic. A program is
  therefore made for one length: the LM's one-token step (what a decoding loop calls), or a classifier's padded
  length (padding after a text never changes its logits, so one program of ``max_length + 1`` steps serves all).
- ``torch.onnx.export``'s TorchScript-based exporter (``dynamo=False``) writes ONNX's own LSTM / GRU / RNN
  operators, which take any number of steps: batch and length are both dynamic. The dynamo-based exporter goes
  through ``torch.export`` and inherits its fixed length, so it is not used.

onnx and onnxruntime are optional: rnnlm needs neither to train or load a model, so they are imported only here,
when an ONNX file is written or run, and their absence is reported with the command that installs them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from rnnlm.errors import UserError
from rnnlm.files import atomic_path
from rnnlm.network.serving import ClassifierStep, LMStep

# Opset 17 has every operator the exported graphs use and is run by every onnxruntime of the last years.
ONNX_OPSET = 17
INSTALL_ONNX = "pip install onnx onnxruntime"


def _onnx_modules():
    # Deferred: optional dependencies of serving only (see the module docstring).
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise UserError(f"Exporting or running ONNX needs the onnx and onnxruntime packages ({err.name} is not "
                        f"installed): {INSTALL_ONNX}") from None
    return onnx, onnxruntime


def example_inputs(step: LMStep | ClassifierStep, batch: int = 2, steps: int = 5, seed: int = 0) -> tuple:
    """Random inputs of ``step``: ids ``[batch, steps]`` and a random state (an LM), or ids and lengths from
    ``steps`` down to 2 (a classifier: the longest text fills the batch, the others are padded)."""
    generator = torch.Generator().manual_seed(seed)
    like = next(step.parameters())
    ids = torch.randint(step.model.config.vocab_size, (batch, steps), generator=generator).to(like.device)
    if isinstance(step, ClassifierStep):
        if steps < 2:
            raise ValueError("A classifier reads at least 2 positions: the separator and one token.")
        lengths = torch.linspace(steps, 2, batch).round().long() if batch > 1 else torch.tensor([steps])
        return ids, lengths.to(like.device)
    state = [torch.randn(t.shape, generator=generator).to(like) for t in step.zero_state(batch)]
    return (ids, *state)


def input_names(step: LMStep | ClassifierStep) -> list[str]:
    return ["ids", "lengths"] if isinstance(step, ClassifierStep) else ["ids", *step.state_names]


def output_names(step: LMStep | ClassifierStep) -> list[str]:
    """``logits``, then for an LM each state tensor after the last step (``h_0_out``, ...)."""
    return ["logits"] if isinstance(step, ClassifierStep) else ["logits", *[f"{n}_out" for n in step.state_names]]


def export_program(step: LMStep | ClassifierStep, steps: int = 1) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of ``step`` for inputs of ``steps`` positions and any batch size (see the module
    docstring for why the length is fixed); run it with ``program.module()(*inputs)``."""
    batch = torch.export.Dim("batch", min=1)
    example = example_inputs(step, batch=2, steps=steps)
    if isinstance(step, ClassifierStep):
        dynamic = {"ids": {0: batch}, "lengths": {0: batch}}
    else:
        dynamic = {"ids": {0: batch}, "state": tuple({0: batch} for _ in step.state_names)}
    with warnings.catch_warnings():
        # torch.export notes that nn.RNNBase re-assigns its flat weight list while traced: harmless, the weights
        # are the module's parameters either way.
        warnings.filterwarnings("ignore", message="The tensor attributes .*_flat_weights")
        return torch.export.export(step, example, dynamic_shapes=dynamic)


def write_onnx(step: LMStep | ClassifierStep, path: str | os.PathLike) -> Path:
    """Write ``step`` as an ONNX file (batch and length dynamic), atomically; return its path. Run it with
    onnxruntime: inputs :func:`input_names`, outputs :func:`output_names`."""
    onnx, _ = _onnx_modules()
    path = Path(path)
    inputs, outputs = input_names(step), output_names(step)
    axes = {"ids": {0: "batch", 1: "steps"}}
    if isinstance(step, ClassifierStep):
        axes.update(lengths={0: "batch"}, logits={0: "batch"})
    else:
        axes["logits"] = {0: "batch", 1: "steps"}
        axes.update({name: {0: "batch"} for name in [*inputs[1:], *outputs[1:]]})
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter's notes (tracer warnings on shapes read as Python ints, its deprecation in
        # favour of dynamo, which cannot keep the length dynamic here) are not the user's to act on.
        warnings.simplefilter("ignore")
        torch.onnx.export(step, example_inputs(step), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes)
        onnx.checker.check_model(str(tmp))
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session of an ONNX file written by :func:`write_onnx` (``threads``: intra-op threads)."""
    _, ort = _onnx_modules()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, step: LMStep | ClassifierStep, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The outputs of an onnxruntime ``session`` of ``step`` on torch ``inputs``, as torch tensors."""
    feed = {name: t.detach().cpu().numpy() for name, t in zip(input_names(step), inputs, strict=True)}
    return [torch.from_numpy(a) for a in session.run(None, feed)]


@torch.no_grad()
def onnx_difference(step: LMStep | ClassifierStep, path: str | os.PathLike,
                    shapes: tuple[tuple[int, int], ...] = ((1, 1), (3, 7))) -> float:
    """Largest absolute difference between the ONNX file (run by onnxruntime) and ``step`` in eager PyTorch over
    every output, on random inputs of each ``(batch, steps)`` in ``shapes``."""
    session = onnx_session(path)
    worst = 0.0
    for batch, steps in shapes:
        steps = max(steps, 2) if isinstance(step, ClassifierStep) else steps
        inputs = example_inputs(step, batch, steps, seed=batch * 1000 + steps)
        eager = step(*inputs)
        eager = [eager] if isinstance(eager, Tensor) else list(eager)
        got = run_onnx(session, step, inputs)
        worst = max(worst, *((g - e.cpu()).abs().max().item() for g, e in zip(got, eager, strict=True)))
    return worst
