"""Train, evaluate and use a text classifier on a recurrent language model (ULMFiT).

    python -m rnnlm.classify --config configs/nsmc_sentiment.yaml [--section.key value ...]    # train
    python -m rnnlm.classify predict --checkpoint CKPT --input FILE [--output OUT]            # JSON lines
    python -m rnnlm.classify evaluate --checkpoint CKPT [--split validation] [--source S ...]

Training is a LightningCLI without subcommands, like ``rnnlm.fit``: ``--data.*`` (the labelled texts),
``--model.*`` (``init_from`` a pretrained LM, or ``config`` to train from scratch; the head; ULMFiT's gradual
unfreezing and discriminative learning rates; ``optimizer`` and ``lr_scheduler``), ``--trainer.*``,
``--checkpoint.*`` (the best by validation accuracy, and ``last.ckpt``), ``--resumable.*`` and ``--ckpt_path``.

``predict`` writes one JSON object per input line: ``{"label": ..., "probabilities": {label: p, ...}}`` (label and
probabilities null for an empty line). ``evaluate`` reports loss, accuracy, macro-F1 and the confusion matrix of a
split: by default the validation split of the data the classifier was trained on, or any split of ``--source``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix, multiclass_f1_score

from rnnlm.commands import ArgumentParser, add_device_option, progress, read_lines, resolve_device
from rnnlm.data.classifier import ClassificationDataModule
from rnnlm.errors import ConfigError, UserError, run_main
from rnnlm.files import atomic_open, check_output
from rnnlm.sharing.classifier import load
from rnnlm.text.batching import batches_by_length
from rnnlm.text.tokenization import batched
from rnnlm.training.classifier import TextClassifier
from rnnlm.training.cli import ClassifierCLI
from rnnlm.training.cli import train as run_cli

COMMANDS = ("predict", "evaluate")  # without one of these words: training
warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden.*")


# ------------------------------------------------------------------------------------------------ training
def train(args: list[str] | None = None):
    """``python -m rnnlm.classify --config ...``: train a classifier; returns the CLI object."""

    # auto_configure_optimizers=False: the model builds its own optimizer, one parameter group per layer group.
    return run_cli(ClassifierCLI, TextClassifier, ClassificationDataModule, "rnnlm.classify", __doc__, args,
                   auto_configure_optimizers=False)


# ------------------------------------------------------------------------------------------------ use
def predict(checkpoint: str, input: str, output: str | None = None, batch_size: int = 64,
            device: str = "auto") -> int:
    """Write a JSON line per input line (see the module docstring); returns the number of lines."""

    # Every input and the output location are checked before the model is loaded or anything is written; the
    # output is written beside its final name and renamed into place only when every line is done.
    texts = read_lines(input)
    target = check_output(output, "--output", inputs=(input, checkpoint)) if output else None
    clf = load(checkpoint, map_location=resolve_device(device))
    keys = [str(label) for label in clf.labels]
    count = empty = 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(atomic_open(target, "w", encoding="utf-8")) if target else sys.stdout
        for block in batched(progress(texts, input, "lines"), 4096):
            for row in clf.probabilities(block, batch_size):
                if np.isnan(row).any():
                    record = {"label": None, "probabilities": None}
                    empty += 1
                else:
                    record = {"label": clf.labels[int(row.argmax())],
                              "probabilities": {k: round(float(p), 6) for k, p in zip(keys, row, strict=True)}}
                out.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
                count += 1
        if count == 0:
            raise UserError(f"The input {input} holds no line to classify: give a text file with one text per line.")
        if empty == count:
            raise UserError(f"Every line of {input} is empty: there is no text to classify.")
    print(f"rnnlm: {count:,} line{'' if count == 1 else 's'} classified"
          + (f" ({empty:,} empty: label null)" if empty else "") + (f" -> {output}" if output else ""), file=sys.stderr)
    return count


def evaluate(checkpoint: str, split: str | None = None, source: str | None = None, config_name: str | None = None,
             revision: str | None = None, text_field: str | None = None, label_field: str | None = None,
             delimiter: str | None = None, batch_size: int = 128, device: str = "auto") -> dict:
    """Loss, accuracy, macro-F1 and the confusion matrix of a classifier checkpoint on a split."""

    clf = load(checkpoint, map_location=resolve_device(device))
    settings = dict(clf.data)
    if source is None and "source" not in settings:
        raise UserError(f"{checkpoint!r} does not say which data it was trained on (it was not trained with "
                        "ClassificationDataModule): give the data to evaluate with --source.")
    settings["vocab_size"] = settings.pop("target_vocab_size", None)
    overrides = {"config_name": config_name, "revision": revision, "text_field": text_field,
                 "label_field": label_field, "delimiter": delimiter}
    if source is not None:
        # Other data: its own splits, nothing carved, read with the trained model's settings.
        settings.update(source=source, config_name=None, revision=None, val_fraction=0.0)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.update(init_from=None, tokenizer=None, label_order=clf.labels, max_length=clf.max_length)
    data = ClassificationDataModule(**settings)
    data.use_tokenizer(clf.tokenizer)
    splits = data.splits
    if split is None:
        split = "validation" if source is None else next(s for s in ("test", "validation", "train") if s in splits)
    if split not in splits:
        raise UserError(f"{data.hparams.source!r} has no {split!r} split; it has {splits}. Choose one with --split.")
    tokens, targets = data.tokens[split], data.targets[split]
    model = clf.model
    dev = next(model.parameters()).device
    logits = torch.empty(len(tokens), len(clf.labels), dtype=torch.float64)
    with torch.no_grad():
        for batch in batches_by_length(tokens, batch_size, data.encoder.separator):
            logits[batch.index] = model(batch.ids.to(dev), batch.lengths.to(dev)).double().cpu()
    target = torch.as_tensor(targets)
    n = len(clf.labels)
    confusion = multiclass_confusion_matrix(logits, target, n)
    result = {
        "checkpoint": checkpoint, "source": data.hparams.source, "split": split, "texts": len(tokens),
        "loss": F.cross_entropy(logits, target).item(),
        "accuracy": multiclass_accuracy(logits, target, n, average="micro").item(),
        "f1_macro": multiclass_f1_score(logits, target, n, average="macro").item(),
        "labels": clf.labels,
        "confusion_matrix": confusion.tolist(),
        "skipped": {k: v for k, v in data.stats[split].items() if k.startswith("skipped")},
    }
    return result


def _print_evaluation(result: dict) -> None:
    print(f"{result['source']} [{result['split']}]: {result['texts']:,} texts")
    print(f"  loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  macro-F1 {result['f1_macro']:.4f}")
    names = [str(label) for label in result["labels"]]
    width = max(8, *(len(n) + 1 for n in names))
    print("  confusion matrix (rows: true, columns: predicted)")
    print("  " + " " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, result["confusion_matrix"], strict=True):
        print("  " + f"{name:>{width}}" + "".join(f"{c:>{width},}" for c in row))
    print(json.dumps(result, ensure_ascii=False))


# ------------------------------------------------------------------------------------------------ entry point
def parser(command: str) -> argparse.ArgumentParser:
    """The command line of ``python -m rnnlm.classify predict`` or ``... evaluate``."""
    parser = ArgumentParser(prog=f"python -m rnnlm.classify {command}")
    parser.add_argument("--checkpoint", required=True, help="A classifier checkpoint written by rnnlm.classify.")
    parser.add_argument("--batch_size", type=int, default=64 if command == "predict" else 128)
    add_device_option(parser)
    if command == "predict":
        parser.add_argument("--input", required=True, help="A text file, one text per line ('-': stdin).")
        parser.add_argument("--output", default=None, help="Where the JSON lines go (default: stdout).")
    else:
        parser.add_argument("--split", default=None,
                            help="The split to evaluate (default: validation; with --source: test, else validation, "
                                 "else train, which is what a single file is).")
        parser.add_argument("--source", default=None, help="Other labelled data (default: the training data).")
        for name in ("config_name", "revision", "text_field", "label_field", "delimiter"):
            parser.add_argument(f"--{name}", default=None, help="As data.{name} of training (default: the same).")
    return parser


def main(args: list[str] | None = None):
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] not in COMMANDS:
        return train(args)  # None from the command line: LightningCLI reads sys.argv itself
    command, argv = argv[0], argv[1:]
    options = vars(parser(command).parse_args(argv))
    if options["batch_size"] < 1:
        raise ConfigError(f"--batch_size must be a positive integer, got {options['batch_size']}.")
    if command == "predict":
        return predict(**options)
    start = time.perf_counter()
    result = evaluate(**options)
    result["seconds"] = round(time.perf_counter() - start, 2)
    _print_evaluation(result)
    return result


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
