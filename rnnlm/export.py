"""Export a checkpoint as a standard model folder, optionally pushed to the Hugging Face Hub:

    python -m rnnlm.export --checkpoint CKPT --out DIR [--push_to_hub OWNER/NAME [--private]] [--overwrite]

The folder holds ``model.safetensors`` (tensors only: loading runs no code), ``config.json`` (the model config
with its format version, the tokenizer kind and the data settings), ``tokenizer.json`` and ``README.md``, a model
card written from what the checkpoint knows. It is written to a temporary folder and renamed into place, then
read back and checked: its logits must equal the checkpoint's bit for bit. ``rnnlm.load``, ``rnnlm.generate``
and ``rnnlm.evaluate`` read the folder, or the Hub repo it was pushed to, as they read the checkpoint.
``--checkpoint`` may also be an exported folder, to push it as it is.

A classifier checkpoint of ``rnnlm.classify`` exports the same way: its config.json adds the labels and the head's
settings, its card the classification results, and ``rnnlm.classifier.load`` / ``rnnlm.classify predict`` read
the folder; the check compares the classifier's logits.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from rnnlm import __version__
from rnnlm.classifier import from_checkpoint as classifier_from_checkpoint
from rnnlm.classifier import is_classifier_checkpoint
from rnnlm.errors import run_main
from rnnlm.files import load_safely
from rnnlm.inference import TrainedModel, data_settings, from_checkpoint
from rnnlm.model import DIRECTIONS
from rnnlm.pretrained import (
    CLASSIFIER,
    FILES,
    PretrainedError,
    folder_task,
    locate,
    looks_like_repo_id,
    read_classifier_folder,
    read_folder,
    tokenizer_kind,
    write_folder,
)

KIND_WORDS = {
    "char": "character-level",
    "byte": "byte-level",
    "word": "word-level",
    "bpe": "byte-level BPE",
    "unigram": "unigram subword",
    "wordpiece": "WordPiece subword",
}
CELL_WORDS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "Elman RNN (tanh)", "rnn_relu": "ReLU RNN"}
BUILTIN_WORDS = {"builtin:python-docs": "the reference topics of the Python documentation that ship with CPython"}
# The Trainer settings worth repeating in a model card (the rest are defaults or describe one machine).
TRAINER_KEYS = ("max_epochs", "max_steps", "precision", "gradient_clip_val", "gradient_clip_algorithm",
                "accumulate_grad_batches", "devices", "num_nodes", "strategy", "val_check_interval",
                "check_val_every_n_epoch", "reload_dataloaders_every_n_epochs")
DATA_SKIP = ("cache_dir", "encode_workers", "init_from")
METRIC_COLUMNS = (("loss", "loss (nats/token)", 4), ("ppl", "perplexity", 2), ("bits_per_token", "bits/token", 4),
                  ("bpc", "bits/character", 4))
CLASSIFIER_COLUMNS = (("accuracy", "accuracy", 4), ("f1_macro", "macro-F1", 4), ("loss", "loss (nats)", 4))


# --------------------------------------------------------------------------------------------- the model card
def _count(n: int) -> str:
    return f"{n:,}"


def describe_model(trained: TrainedModel, kind: str) -> str:
    """One sentence: what kind of language model this is."""
    c = trained.config
    sizes = c.layer_sizes
    layers = (f"{c.num_layers} layer{'s' if c.num_layers > 1 else ''} of {sizes[0]:,} units"
              if len(set(sizes)) == 1 else f"{c.num_layers} layers of {', '.join(f'{s:,}' for s in sizes)} units")
    inputs = "one-hot inputs" if c.input_mode == "one_hot" else f"{c.embedding_dim}-dimensional embeddings"
    parts = [layers, inputs]
    if c.tie_weights:
        parts.append("input and output embeddings tied")
    if c.output == "adaptive":
        parts.append(f"adaptive softmax (cutoffs {', '.join(map(str, c.cutoffs))})")
    direction = ("bidirectional (a forward and a backward language model" +
                 (", sharing embedding and decoder) " if c.share_directions else ") ")) if c.bidirectional else ""
    params = sum(p.numel() for p in trained.model.parameters())
    return (f"A {KIND_WORDS.get(kind, kind)} {direction}{CELL_WORDS[c.cell]} language model: {'; '.join(parts)}; "
            f"{_count(params)} parameters, a vocabulary of {_count(c.vocab_size)} tokens.")


def _metrics_table(metrics: dict, columns: tuple = METRIC_COLUMNS) -> list[str]:
    """A Markdown table of the validation and test metrics measured on these weights (per direction too)."""

    def row(label: str, m: dict, prefix: str = "") -> str:
        cells = [f"{m[prefix + key]:.{digits}f}" if prefix + key in m else "" for key, _, digits in columns]
        return f"| {label} | " + " | ".join(cells) + " |"

    rows = []
    for stage, label in (("val", "validation"), ("test", "test")):
        m = metrics.get(stage)
        if m:
            rows.append(row(label, m))
            rows += [row(f"{label}, {d}", m, f"{d}/") for d in DIRECTIONS if f"{d}/loss" in m]
    if not rows:
        return []
    header = "| split | " + " | ".join(title for _, title, _ in columns) + " |"
    return [header, "|" + " --- |" * (len(columns) + 1), *rows]


def _training_config(checkpoint: dict) -> dict:
    """The settings the model was trained with, from the resolved run configuration when it was saved."""
    extra = checkpoint.get("rnnlm", {})
    run = extra.get("run_config") or {}
    hparams = checkpoint.get("hyper_parameters", {})
    data = {k: v for k, v in data_settings(checkpoint).items() if k not in DATA_SKIP}
    out: dict = {}
    if "seed_everything" in run:
        out["seed_everything"] = run["seed_everything"]
    trainer = run.get("trainer") or {}
    kept = {k: trainer[k] for k in TRAINER_KEYS if trainer.get(k) not in (None, "auto") and k in trainer}
    if kept:
        out["trainer"] = kept
    out["data"] = data
    out["model"] = {k: v for k, v in hparams.items()
                    if not k.startswith("_") and (k not in ("init_from", "init_vocab") or v not in (None, "same"))}
    for key in ("optimizer", "lr_scheduler"):
        if run.get(key):
            out[key] = run[key]
    return out


def model_card(checkpoint: dict, trained: TrainedModel, load_as: str, title: str | None = None) -> str:
    """The README.md of an exported model, from what ``checkpoint`` knows; ``load_as`` is how users load it (the
    Hub id or the folder). Leaves out what is not known."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    extra = checkpoint.get("rnnlm", {})
    hp = checkpoint.get("hyper_parameters", {})
    data = trained.data
    kind = tokenizer_kind(trained.tokenizer, data.get("tokenizer"))
    wandb_run = extra.get("wandb_run") or {}
    source = data.get("source")
    hub_dataset = isinstance(source, str) and looks_like_repo_id(source) and not os.path.exists(source)
    base = hp.get("init_from")
    card_data = ModelCardData(
        library_name="rnnlm",
        tags=["rnnlm", "language-model", "recurrent-neural-network", trained.config.cell, f"{kind}-level"],
        datasets=[source] if hub_dataset else None,
        base_model=base if isinstance(base, str) and looks_like_repo_id(base) and not os.path.exists(base) else None,
        pipeline_tag="text-generation",
    )
    name = title or load_as.rstrip("/").split("/")[-1]
    lines = [f"# {name}", "", describe_model(trained, kind), ""]
    if base:
        how = "the rows of shared tokens copied" if hp.get("init_vocab") == "match" else "its tokenizer"
        lines += [f"Fine-tuned from `{base}` ({how}).", ""]

    lines += ["## Data", ""]
    facts = extra.get("data") or {}
    if source:
        where = f" ({BUILTIN_WORDS[source]})" if source in BUILTIN_WORDS else ""
        config_name = f", configuration `{data['config_name']}`" if data.get("config_name") else ""
        unit = {"line": "each line is a document", "paragraph": "each paragraph is a document"}.get(
            data.get("sample_by"), "each record (file, row) is a document")
        lines.append(f"- Source: `{source}`{config_name}{where}, text field `{data.get('text_field', 'text')}`; "
                     f"{unit}.")
    splits = facts.get("splits") or {}
    for split in ("train", "validation", "test"):
        if split in splits:
            s = splits[split]
            lines.append(f"- {split}: {_count(s['tokens'])} tokens, {_count(s['characters'])} characters.")
    fractions = [f"{name} {data[key]}" for name, key in (("validation", "val_fraction"), ("test", "test_fraction"))
                 if data.get(key)]
    if fractions:
        lines.append(f"- Splits the source lacks are carved from the end of the training text ({', '.join(fractions)} "
                     "of its characters).")
    level = data.get("tokenizer")
    made = (f"built by rnnlm at the `{level}` level from the training split" if level == kind else
            f"`{level}`" if level else "")
    lines.append(f"- Tokenizer: {KIND_WORDS.get(kind, kind)}, {_count(trained.config.vocab_size)} tokens"
                 + (f", {made}" if made else "") + " (`tokenizer.json`); each document ends with a separator token.")
    lines.append("")

    measured = extra.get("metrics") or {}
    table = _metrics_table(measured)
    if table:
        steps = sorted({m["step"] for m in measured.values() if "step" in m})
        when = f", after {_count(steps[0])} optimizer steps" if len(steps) == 1 else ""
        lines += ["## Results", "", f"Measured on these weights{when}, over the whole split, the hidden state carried "
                  "from chunk to chunk. Loss in nats per token; bits per character divide the total bits by the "
                  "characters of the text (the separator counts as one), which makes models with different "
                  "tokenizers comparable.", "", *table, ""]

    lines += ["## Training", ""]
    steps, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
    if steps is not None:
        trained_for = f"{_count(steps)} optimizer steps"
        if epoch is not None:
            trained_for += f" (epoch {epoch + 1})"
        layout = (f"; {facts['streams']} streams of {facts['bptt']} tokens per batch over {facts.get('world_size', 1)}"
                  " process(es) (truncated BPTT, the state carried across batches)" if "streams" in facts else "")
        lines += [f"{trained_for} with rnnlm {extra.get('version', __version__)}{layout}.", ""]
    config_files = (extra.get("run_config") or {}).get("config")
    if config_files:
        lines += [f"Config file: {', '.join(f'`{c}`' for c in config_files)}; the resolved settings:", ""]
    lines += ["```yaml", yaml.safe_dump(_training_config(checkpoint), sort_keys=False).rstrip(), "```", ""]

    if wandb_run.get("id"):
        lines += ["## Weights & Biases", ""]
        where = ", ".join(f"{k} `{wandb_run[k]}`" for k in ("entity", "project") if wandb_run.get(k))
        url = f": {wandb_run['url']}" if wandb_run.get("url") else ""
        lines += [f"Run `{wandb_run.get('name') or wandb_run['id']}` (id `{wandb_run['id']}`"
                  + (f", {where}" if where else "") + f"){url}.", ""]

    lines += [
        "## How to use", "",
        "```python",
        "import rnnlm",
        "",
        f"lm = rnnlm.load({load_as!r})   # lm.model: a torch.nn.Module, lm.tokenizer: a tokenizers.Tokenizer",
        'print(lm.sample("The ", max_new_tokens=200, temperature=0.7, seed=0))',
        "```", "",
        "```bash",
        f"python -m rnnlm.generate --checkpoint {load_as} --prompt \"The \" --max_new_tokens 200",
    ]
    if source and (hub_dataset or source in BUILTIN_WORDS):
        lines.append(f"python -m rnnlm.evaluate --checkpoint {load_as} --split test")
    example = f"--config {config_files[0]} " if config_files else ""
    lines += [
        "# fine-tune on other text: the pretrained tokenizer and architecture are kept",
        f"python -m rnnlm.fit {example}--model.init_from {load_as} --data.source other_text.txt",
        "```", "",
        f"Loading needs the `rnnlm` Python package (this folder was written by version {__version__}). "
        "`model.safetensors` holds tensors only (loading it runs no code); `config.json` holds the model settings "
        "with their format version, `tokenizer.json` the Hugging Face tokenizer.",
    ]
    return str(ModelCard("---\n" + card_data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"))


def classifier_card(checkpoint: dict, trained, load_as: str, title: str | None = None) -> str:
    """The README.md of an exported classifier (a :class:`~rnnlm.classifier.TrainedClassifier`), from what its
    checkpoint knows."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    extra = checkpoint.get("rnnlm", {})
    hp = checkpoint.get("hyper_parameters", {})
    data, c, head = trained.data, trained.config, trained.model.head_settings
    kind = tokenizer_kind(trained.tokenizer, data.get("tokenizer"))
    source, base = data.get("source"), hp.get("init_from")
    hub_dataset = isinstance(source, str) and looks_like_repo_id(source) and not os.path.exists(source)
    card_data = ModelCardData(
        library_name="rnnlm",
        tags=["rnnlm", "text-classification", "ulmfit", "recurrent-neural-network", c.cell, f"{kind}-level"],
        datasets=[source] if hub_dataset else None,
        base_model=base if isinstance(base, str) and looks_like_repo_id(base) and not os.path.exists(base) else None,
        pipeline_tag="text-classification",
    )
    params = sum(p.numel() for p in trained.model.parameters())
    directions = "forward and backward states concatenated" if c.bidirectional else "forward states"
    hidden = f"a hidden layer of {head['head_hidden']}" if head["head_hidden"] else "one linear layer"
    labels = ", ".join(f"`{label}`" for label in trained.labels)
    lines = [
        f"# {title or load_as.rstrip('/').split('/')[-1]}", "",
        f"A text classifier ({len(trained.labels)} classes: {labels}) on the encoder of a "
        f"{KIND_WORDS.get(kind, kind)} {CELL_WORDS[c.cell]} language model ({c.num_layers} x "
        f"{', '.join(f'{s:,}' for s in sorted(set(c.layer_sizes)))} units, {c.embedding_dim}-dimensional "
        f"embeddings, {_count(c.vocab_size)} tokens): concat pooling of the top layer (last state, max, mean; "
        f"{directions}), then a head with {hidden} (ULMFiT); {_count(params)} parameters. Texts are read up to "
        f"{_count(trained.max_length)} tokens.", "",
    ]
    if base:
        lines += [f"Fine-tuned from the language model `{base}`.", ""]
    lines += ["## Data", ""]
    if source:
        lines.append(f"- Source: `{source}`, text field `{data.get('text_field', 'text')}`, label field "
                     f"`{data.get('label_field', 'label')}`.")
    splits = (extra.get("data") or {}).get("splits") or {}
    for split in ("train", "validation", "test"):
        if split in splits:
            s = splits[split]
            counts = ", ".join(f"{k}: {_count(n)}" for k, n in (s.get("class_counts") or {}).items())
            lines.append(f"- {split}: {_count(s['rows'])} texts" + (f", {_count(s['tokens'])} tokens" if "tokens" in s
                         else "") + (f" ({counts})" if counts else "") + ".")
    lines += [f"- Tokenizer: {KIND_WORDS.get(kind, kind)}, {_count(trained.tokenizer.get_vocab_size())} tokens "
              "(`tokenizer.json`).", ""]
    table = _metrics_table(extra.get("metrics") or {}, CLASSIFIER_COLUMNS)
    if table:
        lines += ["## Results", "", "Measured on these weights over the whole split.", "", *table, ""]
    lines += ["## Training", ""]
    if checkpoint.get("global_step") is not None:
        lines += [f"{_count(checkpoint['global_step'])} optimizer steps (epoch {checkpoint.get('epoch', 0) + 1}) with "
                  f"rnnlm {extra.get('version', __version__)}.", ""]
    lines += ["```yaml", yaml.safe_dump(_training_config(checkpoint), sort_keys=False).rstrip(), "```", ""]
    wandb_run = extra.get("wandb_run") or {}
    if wandb_run.get("id"):
        lines += ["## Weights & Biases", "", f"Run `{wandb_run.get('name') or wandb_run['id']}` (id "
                  f"`{wandb_run['id']}`).", ""]
    lines += [
        "## How to use", "",
        "```python",
        "import rnnlm.classifier",
        "",
        f"clf = rnnlm.classifier.load({load_as!r})",
        'print(clf.predict(["a text to classify"]))   # [Prediction(label=..., probabilities={...})]',
        "```", "",
        "```bash",
        f"python -m rnnlm.classify predict --checkpoint {load_as} --input texts.txt   # one JSON line per text",
        "```", "",
        f"Loading needs the `rnnlm` Python package (this folder was written by version {__version__}). "
        "`model.safetensors` holds tensors only (loading it runs no code); `config.json` holds the encoder's "
        "settings, the labels and the head's settings, `tokenizer.json` the Hugging Face tokenizer.",
    ]
    return str(ModelCard("---\n" + card_data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"))


# --------------------------------------------------------------------------------------------- export
@torch.no_grad()
def logits_difference(a: TrainedModel, b: TrainedModel, length: int = 64, seed: int = 0) -> tuple[bool, float]:
    """Whether two models give bit-identical logits (every direction) on a fixed random id sequence, and the
    largest absolute difference."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(a.config.vocab_size, (2, length), generator=generator)
    equal, worst = True, 0.0
    for direction in DIRECTIONS[: 2 if a.config.bidirectional else 1]:
        x = a.model(ids.to(next(a.model.parameters()).device), direction=direction).logits.cpu()
        y = b.model(ids.to(next(b.model.parameters()).device), direction=direction).logits.cpu()
        equal = equal and torch.equal(x, y)
        worst = max(worst, (x - y).abs().max().item())
    return equal, worst


@torch.no_grad()
def classifier_logits_difference(a, b, length: int = 40, seed: int = 0) -> tuple[bool, float]:
    """The same check for two classifiers, on texts of three lengths in one padded batch."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(a.config.vocab_size, (3, length), generator=generator)
    lengths = torch.tensor([length, length // 2, 3])
    x = a.model(ids.to(next(a.model.parameters()).device), lengths).cpu()
    y = b.model(ids.to(next(b.model.parameters()).device), lengths).cpu()
    return torch.equal(x, y), (x - y).abs().max().item()


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, kept: bool = True) -> str:
    """Upload an exported folder to the Hub model repo ``repo_id`` (created if needed); return its URL. ``kept``:
    whether the folder stays after a failed push (an error then says how to push it later)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    api = HfApi(library_name="rnnlm", library_version=__version__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          allow_patterns=list(FILES), commit_message=f"Upload rnnlm model (rnnlm {__version__})")
    except OfflineModeIsEnabled:
        why = "HF_HUB_OFFLINE is set"
    except LocalTokenNotFoundError:
        why = "you are not logged in (run `hf auth login` or set HF_TOKEN)"
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        why = ("the Hub refused the token (log in with a token that can write: `hf auth login`)"
               if status in (401, 403) else f"the Hub answered: {err}")
    except (HTTPError, OSError) as err:
        why = f"the Hub could not be reached ({type(err).__name__}: {err})"
    else:
        return str(url)
    later = (f"The exported folder {folder} is complete; push it later with `python -m rnnlm.export --checkpoint "
             f"{folder} --push_to_hub {repo_id}`." if kept else
             "Nothing was kept: give --out DIR as well to keep the exported folder and push it later.")
    raise PretrainedError(f"Could not push to the Hub model {repo_id!r}: {why}. {later}")


def export(
    checkpoint: str,
    out: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write the exported folder of ``checkpoint`` to ``out`` (checked against the checkpoint's logits), and push
    it to ``push_to_hub`` when given. Returns what was done: the folder, its files and sizes, the logits check and
    the repo URL."""
    kind, path = locate(checkpoint)
    if kind == "folder":  # already exported: check it loads, and push it as it is
        if out is not None:
            raise PretrainedError(f"{checkpoint} is an exported folder already: give a .ckpt to export, or only "
                                  "--push_to_hub to upload the folder as it is.")
        (read_classifier_folder if folder_task(path) == CLASSIFIER else read_folder)(path)
        result = {"folder": str(path), "files": {p.name: p.stat().st_size for p in sorted(path.iterdir())
                                                 if p.name in FILES}}
        if push_to_hub:
            result["url"] = push(path, push_to_hub, private)
        return result
    if out is None and push_to_hub is None:
        raise PretrainedError("Say where the exported model goes: --out DIR, --push_to_hub OWNER/NAME, or both.")
    saved = load_safely(path)
    if is_classifier_checkpoint(saved):
        trained = classifier_from_checkpoint(saved, str(path))
        card_of, read_back, difference = classifier_card, read_classifier_folder, classifier_logits_difference
    else:
        trained = from_checkpoint(saved, str(path))
        card_of, read_back, difference = model_card, read_folder, logits_difference
    with tempfile.TemporaryDirectory(prefix="rnnlm-export-") as scratch:
        folder = Path(out) if out is not None else Path(scratch) / push_to_hub.split("/")[-1]
        card = card_of(saved, trained, load_as=push_to_hub or str(out))
        files = write_folder(trained, folder, card, overwrite=overwrite)
        again = read_back(folder)
        identical, worst = difference(trained, again)
        if not identical:  # a bug, never a user's mistake: say so loudly
            raise RuntimeError(f"The exported folder {folder} gives other logits than {path} (max |diff| {worst}).")
        result = {"checkpoint": str(path), "folder": str(folder) if out is not None else None, "files": files,
                  "parameters": sum(p.numel() for p in trained.model.parameters()),
                  "logits_identical": identical, "max_abs_logit_diff": worst}
        if push_to_hub:
            result["url"] = push(folder, push_to_hub, private, kept=out is not None)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rnnlm.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a .ckpt written by rnnlm.fit or rnnlm.classify (or an exported folder, to push)")
    p.add_argument("--out", default=None, help="the folder to write (must not exist, or be empty, or --overwrite)")
    p.add_argument("--push_to_hub", default=None, metavar="OWNER/NAME",
                   help="also upload the folder to this Hugging Face Hub model repo (created if needed)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private needs --push_to_hub")
    result = export(args.checkpoint, args.out, args.push_to_hub, args.private, args.overwrite)
    if result.get("folder"):
        print(f"rnnlm: exported to {result['folder']}")
    for name, size in result["files"].items():
        print(f"  {name:<18} {size:>12,} bytes")
    if "logits_identical" in result:
        print(f"  {result['parameters']:,} parameters; read back, its logits equal the checkpoint's bit for bit "
              f"(max |difference| {result['max_abs_logit_diff']})")
    if result.get("url"):
        print(f"rnnlm: pushed to {result['url']}")
    print(json.dumps(result))
    return result


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
