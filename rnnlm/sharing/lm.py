"""Using a trained model without Lightning: load it, encode text, sample.

    import rnnlm
    lm = rnnlm.load("runs/.../checkpoints/last.ckpt")   # or an exported folder, or a Hub id OWNER/NAME
    print(lm.sample("The with statement", max_new_tokens=200, temperature=0.7, seed=0))
    for s in lm.samples("The with statement", num_samples=4, top_p=0.9, seed=0, stop_at_separator=True):
        print(s.text)
    out = lm.model(ids, targets)          # a plain torch module: RNNLM

A checkpoint is read with ``weights_only=True`` and an exported folder's weights are a safetensors file: both hold
tensors and plain types only, so loading runs no code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from rnnlm.files import load_safely
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import RNNLM
from rnnlm.network.pretrained import load_weights
from rnnlm.sharing.checkpoints import checked_config, data_settings, load_module_weights
from rnnlm.sharing.folders import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    PretrainedError,
    read_config,
    read_tokenizer,
    read_values,
)
from rnnlm.sharing.hub import locate
from rnnlm.text.tokenization import Encoder


@dataclass
class TrainedModel:
    """A trained model with what it needs to read and write text.

    ``data`` holds the data settings it was trained with (source, tokenizer level, ...), ``chars_per_token`` the
    characters per token of its training data per stage (``train``, ``val``, ``test``).
    """

    model: RNNLM
    tokenizer: Tokenizer
    data: dict = field(default_factory=dict)
    chars_per_token: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.encoder = Encoder(self.tokenizer)

    @property
    def config(self) -> RNNLMConfig:
        return self.model.config

    def sample(self, prompt: str = "", **settings) -> str:
        """Text generated after ``prompt``, with the keyword settings of :func:`samples`."""
        return sample(self.model, self.encoder, prompt, **settings)

    def samples(self, prompt: str = "", **settings) -> list[Sample]:
        """Texts generated after ``prompt`` as one batch, with the keyword settings of :func:`samples`."""
        return samples(self.model, self.encoder, prompt, **settings)


@dataclass(frozen=True)
class Sample:
    """One generated text.

    ``text`` is the continuation of ``prompt`` (without the prompt, and without the separator it stopped at);
    ``tokens`` is how many tokens were sampled (the separator included); ``stopped_at_separator`` says whether it
    ended at the document separator rather than after ``max_new_tokens``.
    """

    prompt: str
    text: str
    tokens: int
    stopped_at_separator: bool


def samples(
    model: RNNLM,
    encoder: Encoder,
    prompt: str = "",
    *,
    num_samples: int = 1,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_separator: bool = False,
) -> list[Sample]:
    """Generate ``num_samples`` texts after ``prompt`` with ``model`` as one batch.

    The hidden state starts from a document boundary (the separator), the prompt primes it once, and the
    ``num_samples`` streams then sample together (:meth:`RNNLM.generate`: temperature, then top-k, then nucleus
    ``top_p``). A ``seed`` makes the result reproducible for the same settings and ``num_samples``. With
    ``stop_at_separator`` each text ends where the model ends the document.
    """
    device = next(model.parameters()).device
    prompt_ids = encoder.encode_text(prompt)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        start = torch.tensor([encoder.separator, *prompt_ids], device=device)
        stop = encoder.separator if stop_at_separator else None
        new = model.generate(start[None], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=generator, num_samples=num_samples, stop_token=stop)
    finally:
        model.train(was_training)
    # Decode prompt and continuation together so that word-level spacing comes out right.
    head = encoder.decode(prompt_ids)
    results = []
    for ids in new.tolist():
        stopped = stop_at_separator and encoder.separator in ids
        if stopped:
            ids = ids[: ids.index(encoder.separator) + 1]
        full = encoder.decode(prompt_ids + (ids[:-1] if stopped else ids))
        text = full[len(head) :] if full.startswith(head) else full
        results.append(Sample(prompt, text, len(ids), stopped))
    return results


def sample(model: RNNLM, encoder: Encoder, prompt: str = "", **settings) -> str:
    """Generate text after ``prompt`` with ``model``, with the keyword settings of :func:`samples` (one sample, its
    text only)."""
    return samples(model, encoder, prompt, **settings)[0].text


def load(
    path_or_repo: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    revision: str | None = None,
) -> TrainedModel:
    """Load a trained model, its tokenizer and what it knows of its data.

    ``path_or_repo`` is an rnnlm checkpoint (``.ckpt``), a folder written by ``python -m rnnlm.export``
    (``model.safetensors``, ``config.json``, ``tokenizer.json``), or a Hugging Face Hub model id ``OWNER/NAME``
    (downloaded and cached by ``huggingface_hub``; ``revision`` picks a branch, tag or commit). Neither kind of file
    can run code when loaded.
    """
    kind, where = locate(path_or_repo, revision)
    if kind == "folder":
        return from_folder(where, map_location)
    return from_checkpoint(load_safely(where, map_location), str(where), map_location)


def from_checkpoint(checkpoint: dict, path: str, map_location: str | torch.device = "cpu") -> TrainedModel:
    """The trained model in a checkpoint already read with :func:`rnnlm.files.load_safely`."""
    model = RNNLM(checked_config(checkpoint, path))
    load_module_weights(model, checkpoint, path)
    extra = checkpoint["rnnlm"]
    return TrainedModel(
        model=model.to(map_location).eval(),
        tokenizer=Tokenizer.from_str(extra["tokenizer"]),
        data=data_settings(checkpoint),
        chars_per_token=dict(extra.get("chars_per_token", {})),
    )


def from_folder(folder: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """The :class:`~rnnlm.sharing.lm.TrainedModel` of an exported folder, every file checked against config.json."""
    folder = Path(folder)
    values = read_values(folder)
    config = read_config(folder)
    tokenizer = read_tokenizer(folder)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != config.vocab_size:
        raise PretrainedError(
            f"{folder / TOKENIZER_FILE} has {size:,} tokens but {CONFIG_FILE} says vocab_size {config.vocab_size:,}: "
            "the files come from different models."
        )
    model = RNNLM(config)
    load_weights(model, folder / MODEL_FILE)
    data, chars = values.get("data") or {}, values.get("chars_per_token") or {}
    if not isinstance(data, dict) or not isinstance(chars, dict):
        raise PretrainedError(f"{folder / CONFIG_FILE}: 'data' and 'chars_per_token' must be JSON objects.")
    return TrainedModel(model=model.to(map_location).eval(), tokenizer=tokenizer, data=dict(data),
                        chars_per_token=dict(chars))
