"""The model card (the folder's README.md) of an exported language model or classifier, written from what its
checkpoint knows: the Hub's metadata block, what the model is, how it was trained, its results and how to use it."""

from __future__ import annotations

import os

from rnnlm.network.config import CELL_NAMES
from rnnlm.network.lm import DIRECTIONS
from rnnlm.sharing.checkpoints import data_settings
from rnnlm.sharing.folders import LOCAL_DATA_SETTINGS
from rnnlm.sharing.hub import looks_like_repo_id
from rnnlm.sharing.lm import TrainedModel
from rnnlm.text.tokenization import LEVEL_NAMES, tokenizer_kind
from rnnlm.version import __version__

BUILTIN_WORDS = {"builtin:python-docs": "the reference topics of the Python documentation that ship with CPython"}
# The Trainer settings worth repeating in a model card (the rest are defaults or describe one machine).
TRAINER_KEYS = ("max_epochs", "max_steps", "precision", "gradient_clip_val", "gradient_clip_algorithm",
                "accumulate_grad_batches", "devices", "num_nodes", "strategy", "val_check_interval",
                "check_val_every_n_epoch", "reload_dataloaders_every_n_epochs")
DATA_SKIP = (*LOCAL_DATA_SETTINGS, "init_from")
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
    return (f"A {LEVEL_NAMES.get(kind, kind)} {direction}{CELL_NAMES[c.cell]} language model: {'; '.join(parts)}; "
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
    lines.append(f"- Tokenizer: {LEVEL_NAMES.get(kind, kind)}, {_count(trained.config.vocab_size)} tokens"
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
    """The README.md of an exported classifier (a :class:`~rnnlm.sharing.classifier.TrainedClassifier`), from what its
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
        f"{LEVEL_NAMES.get(kind, kind)} {CELL_NAMES[c.cell]} language model ({c.num_layers} x "
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
    lines += [f"- Tokenizer: {LEVEL_NAMES.get(kind, kind)}, {_count(trained.tokenizer.get_vocab_size())} tokens "
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
        "import rnnlm.sharing.classifier",
        "",
        f"clf = rnnlm.sharing.classifier.load({load_as!r})",
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
