"""Export a checkpoint as a standard model folder, optionally pushed to the Hugging Face Hub:

    python -m rnnlm.export --checkpoint CKPT --out DIR [--push_to_hub OWNER/NAME [--private]] [--overwrite]
                           [--license ID] [--language CODES] [--name NAME] [--onnx]

The folder holds ``model.safetensors`` (tensors only: loading runs no code), ``config.json`` (the model config
with its format version, the tokenizer kind and the data settings), ``tokenizer.json`` and ``README.md``, a model
card written from what the checkpoint knows. It is written to a temporary folder and renamed into place, then
read back and checked: its logits must equal the checkpoint's bit for bit. ``rnnlm.load``, ``rnnlm.generate``
and ``rnnlm.evaluate`` read the folder, or the Hub repo it was pushed to, as they read the checkpoint.
``--checkpoint`` may also be an exported folder, to push it as it is. The card carries the Hub's metadata
(``license``, ``language``, ``datasets``, ``base_model``, ``model-index`` with the measured metrics) and no path of
this machine: local data and models appear by their base names.

``--onnx`` adds ``model.onnx`` for serving (onnxruntime and any ONNX runtime, no Python needed): the language
model's step (ids and state in, logits and state out) or the classifier (ids and lengths in, logits out), any batch
size and length, checked with onnxruntime against the PyTorch model (needs ``pip install onnx onnxruntime``).

A classifier checkpoint of ``rnnlm.classify`` exports the same way: its config.json adds the labels and the head's
settings, its card the classification results, and ``rnnlm.sharing.classifier.load`` / ``rnnlm.classify predict`` read
the folder; the check compares the classifier's logits.
"""

from __future__ import annotations

import argparse
import json

from rnnlm.commands import ArgumentParser
from rnnlm.errors import run_main
from rnnlm.sharing.export import export


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(prog="python -m rnnlm.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a .ckpt written by rnnlm.fit or rnnlm.classify (or an exported folder, to push)")
    p.add_argument("--out", default=None, help="the folder to write (must not exist, or be empty, or --overwrite)")
    p.add_argument("--push_to_hub", default=None, metavar="OWNER/NAME",
                   help="also upload the folder to this Hugging Face Hub model repo (created if needed)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    p.add_argument("--license", default=None, metavar="ID",
                   help="the model's license for the card's metadata, as the Hub names it (apache-2.0, mit, "
                        "cc-by-4.0, other, ...); without it the card says that none was given")
    p.add_argument("--language", default=None, metavar="CODES",
                   help="the language(s) of the training text, ISO 639 codes (en, or en,ko); default: what the data "
                        "says, else the card says it is unknown")
    p.add_argument("--name", default=None,
                   help="the model's name, the card's title (default: the Hub repo's name, else the W&B run's or "
                        "the config file's)")
    # An option of this command rather than a separate one: model.onnx belongs to the folder (same weights, same
    # atomic write, pushed with it), and users find it where they already export.
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx for serving (checked with onnxruntime; needs onnx and onnxruntime)")
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private needs --push_to_hub")
    result = export(args.checkpoint, args.out, args.push_to_hub, args.private, args.overwrite, license=args.license,
                    language=args.language, name=args.name, onnx=args.onnx)
    if result.get("folder"):
        print(f"rnnlm: exported to {result['folder']}")
    for name, size in result["files"].items():
        print(f"  {name:<18} {size:>12,} bytes")
    if "logits_identical" in result:
        print(f"  {result['parameters']:,} parameters; read back, its logits equal the checkpoint's bit for bit "
              f"(max |difference| {result['max_abs_logit_diff']})")
    if "onnx_max_abs_diff" in result:
        print(f"  model.onnx run by onnxruntime gives the model's outputs (max |difference| "
              f"{result['onnx_max_abs_diff']:.2g})")
    if "logits_identical" in result and not result.get("license"):
        print("rnnlm: the model card has no license (give one with --license, e.g. apache-2.0 or mit)")
    if result.get("url"):
        print(f"rnnlm: pushed to {result['url']}")
    print(json.dumps(result))
    return result


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
