"""CPU latency per text of the serving paths: eager PyTorch, a torch.export program and ONNX run by onnxruntime.

    taskset -c 0 python scripts/serving_speed.py [--cell lstm --layers 2 --hidden 256 --embedding 256 --vocab 2000]

Two tasks, one text at a time (batch 1), on one thread:

- continue: read a 16-token prompt, then 64 tokens one by one, the state carried from each call to the next
  (greedy: the next token is the argmax of the last logits), as a decoding loop does. Eager and ONNX read the
  prompt in one call; the torch.export program is the one-token step (its length is fixed), so it reads the
  prompt token by token.
- classify: one 100-token text (plus the separator) through the classifier on the same encoder. The torch.export
  program is made for that length.

The weights are random (latency does not depend on them). Each path runs ``--warmup`` untimed texts, then
``--repeats`` timed ones; the median is printed, with the range. All in one process, the paths interleaved
(eager, export, onnx, eager, ...) so that other load on the machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import onnxruntime
import torch

from rnnlm.network.classifier import Classifier
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.network.serving import ClassifierStep, LMStep
from rnnlm.sharing import serving

PROMPT, NEW_TOKENS, TEXT = 16, 64, 100


def continue_eager(model: RNNLM, prompt: torch.Tensor) -> list[int]:
    out = model(prompt)
    new = [int(out.logits[0, -1].argmax())]
    state = out.state
    for _ in range(NEW_TOKENS - 1):
        out = model(torch.tensor([[new[-1]]]), state=state)
        new.append(int(out.logits[0, -1].argmax()))
        state = out.state
    return new


def continue_program(program, step: LMStep, prompt: torch.Tensor) -> list[int]:
    state = step.zero_state(1)
    for t in range(prompt.size(1)):
        logits, *state = program(prompt[:, t:t + 1], *state)
    new = [int(logits[0, -1].argmax())]
    for _ in range(NEW_TOKENS - 1):
        logits, *state = program(torch.tensor([[new[-1]]]), *state)
        new.append(int(logits[0, -1].argmax()))
    return new


def continue_onnx(session, step: LMStep, prompt: torch.Tensor) -> list[int]:
    names = serving.input_names(step)
    state = [t.numpy() for t in step.zero_state(1)]
    outputs = session.run(None, dict(zip(names, [prompt.numpy(), *state], strict=True)))
    new = [int(outputs[0][0, -1].argmax())]
    for _ in range(NEW_TOKENS - 1):
        ids = torch.tensor([[new[-1]]]).numpy()
        outputs = session.run(None, dict(zip(names, [ids, *outputs[1:]], strict=True)))
        new.append(int(outputs[0][0, -1].argmax()))
    return new


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", default="lstm")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--embedding", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="/tmp/serving_speed", help="folder for the ONNX files")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    config = RNNLMConfig(args.vocab, cell=args.cell, num_layers=args.layers, embedding_dim=args.embedding,
                         hidden_size=args.hidden)
    model = RNNLM(config).eval()
    classifier = Classifier(config, num_classes=2).eval()
    step, clf_step = LMStep(model), ClassifierStep(classifier)
    step_program = serving.export_program(step, steps=1).module()
    clf_program = serving.export_program(clf_step, steps=TEXT + 1).module()
    step_session = serving.onnx_session(serving.write_onnx(step, folder / "step.onnx"), threads=1)
    clf_session = serving.onnx_session(serving.write_onnx(clf_step, folder / "classifier.onnx"), threads=1)

    prompt = torch.randint(args.vocab, (1, PROMPT))
    text, lengths = torch.randint(args.vocab, (1, TEXT + 1)), torch.tensor([TEXT + 1])
    with torch.inference_mode():
        # The three paths must agree before their speed means anything.
        greedy = continue_eager(model, prompt)
        assert continue_program(step_program, step, prompt) == greedy
        assert continue_onnx(step_session, step, prompt) == greedy
        tasks = {
            "continue": {
                "eager": lambda: continue_eager(model, prompt),
                "torch.export": lambda: continue_program(step_program, step, prompt),
                "onnxruntime": lambda: continue_onnx(step_session, step, prompt),
            },
            "classify": {
                "eager": lambda: classifier(text, lengths),
                "torch.export": lambda: clf_program(text, lengths),
                "onnxruntime": lambda: clf_session.run(None, {"ids": text.numpy(), "lengths": lengths.numpy()}),
            },
        }
        results = {}
        for task, paths in tasks.items():
            times: dict[str, list[float]] = {name: [] for name in paths}
            for fn in paths.values():
                timed(fn, args.warmup, 0)
            for _ in range(args.repeats):  # interleaved: one text of each path per round
                for name, fn in paths.items():
                    times[name] += timed(fn, 0, 1)
            results[task] = {name: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t),
                                    "max_ms": 1000 * max(t)} for name, t in times.items()}
    print(f"{args.layers} x {args.hidden} {args.cell}, embedding {args.embedding}, vocabulary {args.vocab}; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {platform.processor() or 'cpu'}, "
          f"1 thread, {args.repeats} texts per path")
    for task, paths in results.items():
        what = (f"{PROMPT}-token prompt + {NEW_TOKENS} tokens, state carried" if task == "continue"
                else f"one {TEXT}-token text")
        print(f"{task} ({what}):")
        for name, r in paths.items():
            print(f"  {name:<13} median {r['median_ms']:8.2f} ms  (range {r['min_ms']:.2f}-{r['max_ms']:.2f})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
