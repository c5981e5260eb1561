"""The model card (the folder's README.md) of an exported language model or classifier, written from what its
checkpoint knows: the Hub's metadata block, what the model is, how it was trained, its results and how to use it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rnnlm.network.config import CELL_NAMES
from rnnlm.network.lm import DIRECTIONS
from rnnlm.sharing.checkpoints import data_settings
from rnnlm.sharing.folders import LOCAL_DATA_SETTINGS, PretrainedError, shareable
from rnnlm.sharing.hub import looks_like_repo_id
from rnnlm.sharing.lm import TrainedModel
from rnnlm.text.sources import BUILTIN_PREFIX
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
# What the data itself says of its language, where rnnlm knows it (a Hub dataset's own card is not read offline).
BUILTIN_LANGUAGES = {"builtin:python-docs": ["en"]}
# model-index entries: (metric key, Hub metric type, its name, metric config) per kind of model.
LM_RESULTS = (("ppl", "perplexity", "Perplexity", None), ("bpc", "bpc", "Bits per character", None))
CLASSIFIER_RESULTS = (("accuracy", "accuracy", "Accuracy", None), ("f1_macro", "f1", "Macro F1", "macro"))
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


# --------------------------------------------------------------------------------------------- what may be shown
def hub_dataset(source) -> bool:
    """Whether the data source is a Hub dataset id (not a local file or folder, not a built-in corpus)."""
    return (isinstance(source, str) and bool(_HUB_DATASET.match(source)) and not source.startswith(BUILTIN_PREFIX)
            and not os.path.exists(os.path.expanduser(source)))


def hub_model(base) -> str | None:
    """``base`` (a model's ``init_from``) when it is a Hub model id, else None: a local path is never published."""
    if isinstance(base, str) and looks_like_repo_id(base) and not os.path.exists(os.path.expanduser(base)):
        return base
    return None


def shown_path(path: str) -> str:
    """A file the run read (its config file), as the card may show it: relative to the current folder when it is
    inside it (``configs/quickstart.yaml``), else its base name; never the machine's absolute path."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        return str(path)
    try:
        return p.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return p.name


def describe_source(source: str) -> str:
    """The data source as the card shows it: a Hub id or built-in corpus as it is, a local one by its base name."""
    if source.startswith(BUILTIN_PREFIX) or hub_dataset(source):
        return f"`{source}`"
    return f"a local file or folder, `{shareable(source) if os.path.isabs(os.path.expanduser(source)) else source}`"


def describe_base(base: str, noun: str = "model") -> str:
    """The pretrained model a run started from: its Hub id, or a local one by its base name."""
    return f"the {noun} `{base}`" if hub_model(base) else f"the local {noun} `{shareable(os.path.expanduser(base))}`"


def languages(data: dict, language: str | list[str] | None) -> list[str] | None:
    """The card's ``language``: the export's ``--language`` (codes such as ``en`` or ``en,ko``), else what the data
    says, else None (unknown)."""
    if language:
        codes = [c.strip() for c in (language.split(",") if isinstance(language, str) else language) if c.strip()]
        bad = [c for c in codes if not _LANGUAGE.match(c)]
        if bad:
            raise PretrainedError(f"--language takes ISO 639 codes such as en, ko or en,ko, not {', '.join(bad)}.")
        return codes
    return BUILTIN_LANGUAGES.get(data.get("source"))


def default_title(checkpoint: dict, what: str) -> str:
    """The model's name when the export gives none: the W&B run's name, else the config file's, else what it is."""
    extra = checkpoint.get("rnnlm", {})
    run = (extra.get("wandb_run") or {}).get("name")
    files = (extra.get("run_config") or {}).get("config") or []
    return run or (Path(str(files[0])).stem if files else what)


def measured_results(checkpoint: dict) -> tuple[dict, dict]:
    """The checkpoint's measured metrics split in two: those measured on these weights (the same optimizer step)
    and those of the run measured on another checkpoint (the test result of the best one, in last.ckpt)."""
    step = checkpoint.get("global_step")
    own, other = {}, {}
    for stage, m in ((checkpoint.get("rnnlm") or {}).get("metrics") or {}).items():
        (own if step is None or m.get("step") in (None, step) else other)[stage] = m
    return own, other


def eval_results(own: dict, data: dict, entries: tuple, task_type: str, task_name: str) -> list:
    """The model-index results (huggingface_hub's EvalResult) of the metrics measured on these weights, each with
    its split and dataset."""
    from huggingface_hub import EvalResult

    source = data.get("source")
    if not isinstance(source, str):
        return []
    dataset = source if source.startswith(BUILTIN_PREFIX) or hub_dataset(source) else shareable(source)
    splits = {"val": data.get("val_split") or "validation", "test": data.get("test_split") or "test"}
    results = []
    for stage in ("val", "test"):
        for key, metric_type, metric_name, metric_config in entries:
            if key in own.get(stage, {}):
                results.append(EvalResult(
                    task_type=task_type, task_name=task_name, dataset_type=dataset, dataset_name=dataset,
                    dataset_config=data.get("config_name") if hub_dataset(source) else None,
                    dataset_split=splits[stage], metric_type=metric_type, metric_name=metric_name,
                    metric_config=metric_config, metric_value=round(float(own[stage][key]), 6)))
    return results


def unknown_metadata_lines(license: str | None, language: list[str] | None) -> list[str]:
    """What the card says of its license and language when the metadata cannot (they were not given)."""
    lines = []
    if not license:
        lines.append("- License: none was given when this model was exported (`python -m rnnlm.export --license`); "
                     "ask its author before reusing it.")
    if not language:
        lines.append("- Language: not recorded (the data does not say; `python -m rnnlm.export --language` sets it).")
    return [*lines, ""] if lines else []


def transformers_lines(load_as: str, auto_class: str) -> list[str]:
    """How to load the folder with transformers alone (its own modelling code, hence ``trust_remote_code``)."""
    if auto_class == "AutoModelForCausalLM":
        use = ["tokenizer = AutoTokenizer.from_pretrained(" + repr(load_as) + ")",
               'ids = tokenizer("The ", return_tensors="pt").input_ids',
               "print(tokenizer.decode(model.generate(ids, max_new_tokens=100)[0]))"]
        first = "from transformers import AutoModelForCausalLM, AutoTokenizer"
    else:
        use = ["classify = pipeline(\"text-classification\", model=model, tokenizer=" + repr(load_as) + ")",
               'print(classify("a text to classify"))']
        first = f"from transformers import {auto_class}, pipeline"
    return [
        "With transformers alone (no rnnlm installed): the folder carries its modelling code, which "
        "`trust_remote_code=True` runs, so read it first.", "",
        "```python", first, "",
        f"model = {auto_class}.from_pretrained({load_as!r}, trust_remote_code=True)", *use, "```", "",
    ]


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


STAGES = (("val", "validation"), ("test", "test"))


def _labelled(*measured: dict) -> list[tuple[str, dict]]:
    """The rows of the results table in order (validation, then test), each stage labelled with the checkpoint it
    was measured on when the record says (the run's test result names the checkpoint it tested)."""
    rows = []
    for stage, label in STAGES:
        for m in measured:
            if m.get(stage):
                where = m[stage].get("checkpoint")
                step = m[stage].get("step")
                on = f" (`{where}`" + (f", step {_count(step)}" if step is not None else "") + ")" if where else ""
                rows.append((label + on, m[stage]))
    return rows


def _metrics_table(rows: list[tuple[str, dict]], columns: tuple = METRIC_COLUMNS) -> list[str]:
    """A Markdown table of the metrics measured on these weights (per direction too), one labelled row each."""

    def row(label: str, m: dict, prefix: str = "") -> str:
        cells = [f"{m[prefix + key]:.{digits}f}" if prefix + key in m else "" for key, _, digits in columns]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = []
    for label, m in rows:
        lines.append(row(label, m))
        lines += [row(f"{label}, {d}", m, f"{d}/") for d in DIRECTIONS if f"{d}/loss" in m]
    if not lines:
        return []
    header = "| split | " + " | ".join(title for _, title, _ in columns) + " |"
    return [header, "|" + " --- |" * (len(columns) + 1), *lines]


def _other_checkpoint_note(other: dict, checkpoint: dict) -> list[str]:
    """Says which rows were measured on another checkpoint of the run than the one exported."""
    notes = []
    for stage, label in STAGES:
        if stage in other:
            m = other[stage]
            where = f"`{m['checkpoint']}`" if m.get("checkpoint") else "another checkpoint"
            notes.append(f"The {label} row is the run's result on its checkpoint {where} (step {_count(m['step'])}), "
                         f"not on these weights (step {_count(checkpoint.get('global_step') or 0)}); the metadata's "
                         "model-index lists only what was measured on these weights.")
    return [" ".join(notes), ""] if notes else []


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
    return shareable(out)  # init_from, the source, a tokenizer file: by base name, never the machine's path


def model_card(checkpoint: dict, trained: TrainedModel, load_as: str, title: str | None = None,
               license: str | None = None, language: str | list[str] | None = None) -> str:
    """The README.md of an exported model, from what ``checkpoint`` knows; ``load_as`` is how users load it (the
    Hub id or the folder's name), ``title`` the model's name, ``license`` and ``language`` the Hub's metadata.
    Leaves out what is not known, says so where the Hub expects it, and shows no local path of this machine."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    extra = checkpoint.get("rnnlm", {})
    hp = checkpoint.get("hyper_parameters", {})
    data = trained.data
    kind = tokenizer_kind(trained.tokenizer, data.get("tokenizer"))
    wandb_run = extra.get("wandb_run") or {}
    source = data.get("source")
    base = hp.get("init_from")
    name = title or default_title(checkpoint, f"rnnlm {kind}-level {trained.config.cell} language model")
    language = languages(data, language)
    own, other = measured_results(checkpoint)
    card_data = ModelCardData(
        language=language,
        license=license or None,
        library_name="rnnlm",
        tags=["rnnlm", "language-model", "recurrent-neural-network", trained.config.cell, f"{kind}-level"],
        datasets=[source] if hub_dataset(source) else None,
        base_model=hub_model(base),
        pipeline_tag="text-generation",
        model_name=name,
        eval_results=eval_results(own, data, LM_RESULTS, "text-generation", "Language modelling") or None,
    )
    lines = [f"# {name}", "", describe_model(trained, kind), ""]
    if base:
        how = "the rows of shared tokens copied" if hp.get("init_vocab") == "match" else "its tokenizer"
        lines += [f"Fine-tuned from {describe_base(base)} ({how}).", ""]
    lines += unknown_metadata_lines(license, language)

    lines += ["## Data", ""]
    facts = extra.get("data") or {}
    if source:
        where = f" ({BUILTIN_WORDS[source]})" if source in BUILTIN_WORDS else ""
        config_name = f", configuration `{data['config_name']}`" if data.get("config_name") else ""
        unit = {"line": "each line is a document", "paragraph": "each paragraph is a document"}.get(
            data.get("sample_by"), "each record (file, row) is a document")
        lines.append(f"- Source: {describe_source(source)}{config_name}{where}, text field "
                     f"`{data.get('text_field', 'text')}`; {unit}.")
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
            f"`{shareable(level)}`" if level else "")
    lines.append(f"- Tokenizer: {LEVEL_NAMES.get(kind, kind)}, {_count(trained.config.vocab_size)} tokens"
                 + (f", {made}" if made else "") + " (`tokenizer.json`); each document ends with a separator token.")
    lines.append("")

    table = _metrics_table(_labelled(own, other))
    if table:
        steps = sorted({m["step"] for m in own.values() if "step" in m})
        when = f", after {_count(steps[0])} optimizer steps" if len(steps) == 1 else ""
        lines += ["## Results", "", f"Measured on these weights{when}, over the whole split, the hidden state carried "
                  "from chunk to chunk. Loss in nats per token; bits per character divide the total bits by the "
                  "characters of the text (the separator counts as one), which makes models with different "
                  "tokenizers comparable.", "", *table, "", *_other_checkpoint_note(other, checkpoint)]

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
        config_files = [shown_path(str(c)) for c in config_files]
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
    if source and (hub_dataset(source) or source in BUILTIN_WORDS):
        lines.append(f"python -m rnnlm.evaluate --checkpoint {load_as} --split test")
    example = f"--config {config_files[0]} " if config_files else ""
    lines += [
        "# fine-tune on other text: the pretrained tokenizer and architecture are kept",
        f"python -m rnnlm.fit {example}--model.init_from {load_as} --data.source other_text.txt",
        "```", "",
        *transformers_lines(load_as, "AutoModelForCausalLM"),
        f"Loading needs the `rnnlm` Python package (this folder was written by version {__version__}). "
        "`model.safetensors` holds tensors only (loading it runs no code); `config.json` holds the model settings "
        "with their format version, `tokenizer.json` the Hugging Face tokenizer.",
    ]
    return str(ModelCard("---\n" + card_data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"))


def classifier_card(checkpoint: dict, trained, load_as: str, title: str | None = None, license: str | None = None,
                    language: str | list[str] | None = None) -> str:
    """The README.md of an exported classifier (a :class:`~rnnlm.sharing.classifier.TrainedClassifier`), from what its
    checkpoint knows; the arguments are :func:`model_card`'s."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    extra = checkpoint.get("rnnlm", {})
    hp = checkpoint.get("hyper_parameters", {})
    data, c, head = trained.data, trained.config, trained.model.head_settings
    kind = tokenizer_kind(trained.tokenizer, data.get("tokenizer"))
    # A control run that took only the pretrained model's architecture (pretrained_weights false) has no base model.
    source, base = data.get("source"), hp.get("init_from") if hp.get("pretrained_weights", True) else None
    name = title or default_title(checkpoint, f"rnnlm {kind}-level {c.cell} text classifier")
    language = languages(data, language)
    own, other = measured_results(checkpoint)
    card_data = ModelCardData(
        language=language,
        license=license or None,
        library_name="rnnlm",
        tags=["rnnlm", "text-classification", "ulmfit", "recurrent-neural-network", c.cell, f"{kind}-level"],
        datasets=[source] if hub_dataset(source) else None,
        base_model=hub_model(base),
        pipeline_tag="text-classification",
        model_name=name,
        eval_results=eval_results(own, data, CLASSIFIER_RESULTS, "text-classification", "Text classification")
        or None,
    )
    params = sum(p.numel() for p in trained.model.parameters())
    directions = "forward and backward states concatenated" if c.bidirectional else "forward states"
    hidden = f"a hidden layer of {head['head_hidden']}" if head["head_hidden"] else "one linear layer"
    labels = ", ".join(f"`{label}`" for label in trained.labels)
    lines = [
        f"# {name}", "",
        f"A text classifier ({len(trained.labels)} classes: {labels}) on the encoder of a "
        f"{LEVEL_NAMES.get(kind, kind)} {CELL_NAMES[c.cell]} language model ({c.num_layers} x "
        f"{', '.join(f'{s:,}' for s in sorted(set(c.layer_sizes)))} units, {c.embedding_dim}-dimensional "
        f"embeddings, {_count(c.vocab_size)} tokens): concat pooling of the top layer (last state, max, mean; "
        f"{directions}), then a head with {hidden} (ULMFiT); {_count(params)} parameters. Texts are read up to "
        f"{_count(trained.max_length)} tokens.", "",
    ]
    if base:
        lines += [f"Fine-tuned from {describe_base(base, 'language model')}.", ""]
    lines += unknown_metadata_lines(license, language)
    lines += ["## Data", ""]
    if source:
        lines.append(f"- Source: {describe_source(source)}, text field `{data.get('text_field', 'text')}`, label field "
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
    table = _metrics_table(_labelled(own, other), CLASSIFIER_COLUMNS)
    if table:
        lines += ["## Results", "", "Measured on these weights over the whole split.", "", *table, "",
                  *_other_checkpoint_note(other, checkpoint)]
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
        *transformers_lines(load_as, "AutoModelForSequenceClassification"),
        f"Loading needs the `rnnlm` Python package (this folder was written by version {__version__}). "
        "`model.safetensors` holds tensors only (loading it runs no code); `config.json` holds the encoder's "
        "settings, the labels and the head's settings, `tokenizer.json` the Hugging Face tokenizer.",
    ]
    return str(ModelCard("---\n" + card_data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"))
