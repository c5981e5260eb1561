"""Models that leave the trainer: export to a folder, load from a folder or the Hub cache, fine-tune from them.

Real files throughout and no network: the Hub path goes through ``huggingface_hub`` with a pre-populated cache and
``HF_HUB_OFFLINE=1`` (set by conftest); only the upload itself is replaced, by a recorder.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, make_text, run_fit

import rnnlm
from rnnlm.errors import ConfigError, UserError
from rnnlm.export import main as export_main
from rnnlm.files import CheckpointError
from rnnlm.network.config import FORMAT_VERSION, RNNLMConfig
from rnnlm.network.lm import DIRECTIONS, RNNLM
from rnnlm.sharing.export import export, logits_difference
from rnnlm.sharing.folders import FILES, PretrainedError, write_folder
from rnnlm.sharing.lm import TrainedModel
from rnnlm.sharing.transfer import convert_layout, transfer, vocabulary_map
from rnnlm.text.tokenization import Encoder, char_tokenizer, same_tokenizer, word_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog\n"

# Every kind of model: each cell, bidirectional (shared and separate input/output layers), tied (with and without a
# projection), adaptive softmax, the AWD-LSTM options (layer-by-layer stack), one-hot inputs.
KINDS = {
    "rnn_tanh": dict(cell="rnn_tanh"),
    "rnn_relu": dict(cell="rnn_relu", num_layers=1),
    "lstm": dict(cell="lstm"),
    "gru": dict(cell="gru", num_layers=3),
    "bidirectional": dict(bidirectional=True),
    "bidirectional_separate_tied": dict(bidirectional=True, share_directions=False, tie_weights=True),
    "tied_projection": dict(tie_weights=True, embedding_dim=8),
    "tied_same_size": dict(tie_weights=True, embedding_dim=12),
    "adaptive": dict(output="adaptive", adaptive_cutoffs=[6, 14], adaptive_div_value=2.0),
    "awd": dict(hidden_sizes=[16, 8], embedding_dim=8, tie_weights=True, weight_drop=0.3, locked_dropout=True,
                dropout_words=0.1, dropout_embedding=0.2, dropout_between=0.2, dropout_output=0.3),
    "one_hot": dict(input_mode="one_hot", cell="rnn_tanh", num_layers=1),
    "one_hot_bidirectional_awd": dict(input_mode="one_hot", bidirectional=True, weight_drop=0.2),
}


def _tokenizer():
    tokenizer = char_tokenizer(TEXT)
    Encoder(tokenizer)
    return tokenizer


def _config(vocab_size: int, **settings) -> RNNLMConfig:
    base = {"num_layers": 2, "embedding_dim": 10, "hidden_size": 12}
    return RNNLMConfig(vocab_size, **{**base, **settings})


def _trained(seed: int = 0, **settings) -> TrainedModel:
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    model = RNNLM(_config(tokenizer.get_vocab_size(with_added_tokens=True), **settings)).eval()
    data = {"source": "builtin:python-docs", "tokenizer": "char", "cache_dir": "/somewhere/local"}
    return TrainedModel(model, tokenizer, data, {"train": 1.0, "val": 1.0, "test": 1.0})


def _checkpoint_file(trained: TrainedModel, path: Path) -> Path:
    """An rnnlm checkpoint as rnnlm.fit writes it (the parts that loading reads), for a model made here."""
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in trained.model.state_dict().items()},
        "hyper_parameters": {"config": trained.config.to_dict()},
        "datamodule_hyper_parameters": dict(trained.data),
        "rnnlm": {"version": rnnlm.__version__, "tokenizer": trained.tokenizer.to_str(),
                  "chars_per_token": dict(trained.chars_per_token)},
        "global_step": 0,
        "epoch": 0,
    }
    torch.save(checkpoint, path)
    return path


def _equal_logits(a: TrainedModel, b: TrainedModel) -> bool:
    identical, worst = logits_difference(a, b)
    return identical and worst == 0.0


# ----------------------------------------------------------------------------------------- export, load
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_model_kind_exports_with_bit_identical_logits(kind, tmp_path):
    ckpt = _checkpoint_file(_trained(**KINDS[kind]), tmp_path / "model.ckpt")
    result = export(str(ckpt), str(tmp_path / "out"))
    assert result["logits_identical"] and result["max_abs_logit_diff"] == 0.0
    assert sorted(result["files"]) == sorted(FILES)

    from_ckpt, from_folder = rnnlm.load(ckpt), rnnlm.load(tmp_path / "out")
    assert from_folder.config == from_ckpt.config
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(from_ckpt.config.vocab_size, (3, 40), generator=generator)
    with torch.no_grad():
        for direction in DIRECTIONS[: 2 if from_ckpt.config.bidirectional else 1]:
            a = from_ckpt.model(ids, direction=direction)
            b = from_folder.model(ids, direction=direction)
            assert torch.equal(a.logits, b.logits), direction
            leaves = torch.utils._pytree.tree_leaves
            for x, y in zip(leaves(a.state), leaves(b.state), strict=True):
                assert torch.equal(x, y)
    # Shared tensors are stored once and stay shared after loading.
    if from_ckpt.config.tie_weights:
        assert from_folder.model.decoder.weight is from_folder.model.embedding.weight
    # The exported tokenizer marks its special tokens for transformers and reads every text as before.
    assert same_tokenizer(from_folder.tokenizer, from_ckpt.tokenizer)
    texts = [TEXT, "<unk> <eos>"]
    assert from_folder.encoder.encode(texts).tolist() == from_ckpt.encoder.encode(texts).tolist()
    assert from_folder.data == {k: v for k, v in from_ckpt.data.items() if k != "cache_dir"}
    assert from_folder.sample("the ", max_new_tokens=20, seed=3) == from_ckpt.sample("the ", max_new_tokens=20, seed=3)


def test_tied_weights_are_stored_once(tmp_path):
    from safetensors import safe_open

    write_folder(_trained(tie_weights=True, embedding_dim=12), tmp_path / "tied")
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert ("embedding.weight" in names) != ("decoder.weight" in names)  # one of the two names, one copy


def test_exported_config_is_the_model_config_plus_what_a_loader_needs(tmp_path):
    trained = _trained(cell="gru")
    write_folder(trained, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "rnnlm" and config["format_version"] == FORMAT_VERSION
    assert config["tokenizer_kind"] == "char" and config["rnnlm_version"] == rnnlm.__version__
    assert {k: v for k, v in config.items() if k in RNNLMConfig.__dataclass_fields__} == trained.config.to_dict()
    assert "cache_dir" not in config["data"]  # one machine's setting, not the data's
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"


# ----------------------------------------------------------------------------------------- bad folders
@pytest.fixture
def exported(tmp_path) -> Path:
    write_folder(_trained(), tmp_path / "good")
    return tmp_path / "good"


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors"),
        (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: _edit_config(f, hidden_size=20),
         r"wrong shape: decoder.weight \[\d+, 12\] \(the config needs \[\d+, 20\]\)"),
        (lambda f: _edit_config(f, num_layers=3), "missing tensors: rnn.bias_hh_l2"),
        (lambda f: _edit_config(f, num_layers=1), "tensors the config has no place for: rnn.bias_hh_l1"),
        (lambda f: _edit_config(f, hiden_size=12), "unknown setting.*hiden_size"),
        (lambda f: _edit_config(f, format_version=FORMAT_VERSION + 1), "newer than this rnnlm reads.*upgrade"),
        (lambda f: _edit_config(f, model_type="gpt2"), "type 'gpt2', not an rnnlm one"),
        (lambda f: _edit_config(f, cell="lstn"), "Unknown cell"),
        (lambda f: _edit_config(f, vocab_size=40), r"has \d+ tokens but config.json says vocab_size 40"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 3), "only 3 bytes long"),
        (lambda f: _truncate(f / "model.safetensors"), "cannot be read: it is truncated or corrupt"),
    ],
)
def test_a_folder_that_disagrees_with_itself_is_refused_by_name(exported, damage, message):
    damage(exported)
    with pytest.raises(UserError, match=message):
        rnnlm.load(exported)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_safetensors_header_that_looks_like_a_pickle_opcode_is_not_refused(tmp_path):
    from rnnlm.network.pretrained import sniff_tensor_file

    path = tmp_path / "model.safetensors"  # a header of 384 = 0x180 bytes: the file begins with 0x80 0x01
    path.write_bytes(struct.pack("<Q", 384) + b"{" + b" " * 383)
    sniff_tensor_file(path)


def test_a_missing_tensor_is_named(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(exported / "model.safetensors")
    del weights["decoder.bias"]
    save_file(weights, exported / "model.safetensors")
    with pytest.raises(PretrainedError, match="missing tensors: decoder.bias"):
        rnnlm.load(exported)


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_where_the_tensor_file_should_be_is_refused_without_running_it(exported, tmp_path, writer):
    marker = tmp_path / "marker"
    payload = {"decoder.bias": _Payload(marker)}
    with open(exported / "model.safetensors", "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f)
    with pytest.raises(PretrainedError, match="safetensors files, which hold tensors") as info:
        rnnlm.load(exported)
    assert ("torch.save" in str(info.value)) == (writer == "torch.save")
    assert not marker.exists()


def test_a_pytorch_model_bin_is_not_read(exported):
    (exported / "model.safetensors").rename(exported / "pytorch_model.bin")
    with pytest.raises(PretrainedError, match=r"no model.safetensors.*pytorch_model.bin is not read: pickle"):
        rnnlm.load(exported)


def test_a_checkpoint_that_is_not_rnnlms_is_refused(tmp_path):
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "epoch": 3}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="is not an rnnlm checkpoint"):
        rnnlm.load(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="is not an rnnlm checkpoint"):
        export(str(tmp_path / "other.ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_path_that_does_not_exist_says_what_is_accepted(tmp_path):
    with pytest.raises(PretrainedError, match=r"does not exist: give a checkpoint \(.ckpt\).*Hub model id"):
        rnnlm.load(tmp_path / "nothing.ckpt")


# ----------------------------------------------------------------------------------------- writing safely
def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    ckpt = _checkpoint_file(_trained(), tmp_path / "model.ckpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(PretrainedError, match="exists and is not empty.*--overwrite"):
        export(str(ckpt), str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]

    # A failure while writing (here: after the weights, before config.json) leaves neither the folder nor a
    # temporary one behind; an old export that was to be replaced stays as it was.
    export(str(ckpt), str(tmp_path / "old"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("rnnlm.sharing.folders.folder_config", broken)
    for target, overwrite in (("new", False), ("old", True)):
        with pytest.raises(OSError, match="disk full"):
            export(str(ckpt), str(tmp_path / target), overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "old", "taken"]  # no temporary folders


# ----------------------------------------------------------------------------------------- the Hub
def _populate_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """The layout huggingface_hub's cache has after a download: refs/main names the commit, whose snapshot
    holds the files (links to blobs in a real cache; plain copies read the same)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        shutil.copy(path, snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_id_loads_from_the_hub_cache_through_huggingface_hub(tmp_path, hub_cache, capsys):
    trained = _trained(tie_weights=True, embedding_dim=12)
    write_folder(trained, tmp_path / "export")
    _populate_hub_cache(hub_cache, "someone/tiny-rnnlm", tmp_path / "export")
    assert os.environ["HF_HUB_OFFLINE"] == "1"

    loaded = rnnlm.load("someone/tiny-rnnlm")
    assert _equal_logits(trained, loaded)
    # Every command takes the id where it takes a checkpoint.
    from rnnlm.generate import main as generate_main

    (generated,) = generate_main(["--checkpoint", "someone/tiny-rnnlm", "--prompt", "the ", "--max_new_tokens", "12",
                                  "--seed", "0", "--device", "cpu"])
    assert generated.text == trained.sample("the ", max_new_tokens=12, seed=0)
    assert capsys.readouterr().out == "the " + generated.text + "\n"  # nothing else on stdout


def test_a_hub_id_without_network_says_so_and_how_to_use_a_folder(hub_cache, monkeypatch):
    import socket

    attempts = []  # HF_HUB_OFFLINE honoured: the lookup fails at once, without trying (and timing out on) the network

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("the test forbids the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(PretrainedError) as info:
        rnnlm.load("someone/not-downloaded")
    assert attempts == []
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and "not in the Hugging Face cache" in message
    assert "hf download someone/not-downloaded --local-dir not-downloaded" in message
    assert "--checkpoint not-downloaded" in message


@pytest.mark.slow  # a fresh process, so that huggingface_hub reads HF_HUB_CACHE from the environment itself
def test_the_generate_command_reads_a_hub_id_from_the_cache(tmp_path):
    trained = _trained()
    write_folder(trained, tmp_path / "export")
    _populate_hub_cache(tmp_path / "hf-hub", "someone/tiny-rnnlm", tmp_path / "export")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rnnlm.generate", "--checkpoint", "someone/tiny-rnnlm", "--prompt", "the ",
           "--max_new_tokens", "15", "--seed", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "the " + trained.sample("the ", max_new_tokens=15, seed=1) + "\n"


def test_push_to_hub_uploads_the_checked_folder(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls.append(("upload_folder", repo_id, sorted(p.name for p in folder.iterdir())))
        calls.append(("loads", _equal_logits(trained, rnnlm.load(folder))))
        calls.append(("card", (folder / "README.md").read_text()))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    trained = _trained()
    ckpt = _checkpoint_file(trained, tmp_path / "model.ckpt")
    result = export_main(["--checkpoint", str(ckpt), "--push_to_hub", "someone/tiny", "--private"])
    assert calls[0] == ("create_repo", "someone/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1] == ("upload_folder", "someone/tiny", sorted(FILES)) and calls[2] == ("loads", True)
    assert "rnnlm.load('someone/tiny')" in calls[3][1] and "--model.init_from someone/tiny" in calls[3][1]
    assert result["url"] == "https://huggingface.co/someone/tiny" and result["folder"] is None
    assert "pushed to https://huggingface.co/someone/tiny" in capsys.readouterr().out


def test_push_without_network_is_a_clear_error_and_keeps_the_folder(tmp_path):
    ckpt = _checkpoint_file(_trained(), tmp_path / "model.ckpt")
    with pytest.raises(PretrainedError, match=r"Could not push .*HF_HUB_OFFLINE is set. The exported folder .* is "
                                              r"complete; push it later"):
        export(str(ckpt), str(tmp_path / "out"), push_to_hub="someone/tiny")
    assert rnnlm.load(tmp_path / "out").config == rnnlm.load(ckpt).config


# ----------------------------------------------------------------------------------------- weights into a model
def test_transfer_converts_between_a_fused_and_a_layer_by_layer_stack():
    source = RNNLM(_config(20, bidirectional=True)).eval()
    target = RNNLM(_config(20, bidirectional=True, weight_drop=0.5, locked_dropout=True, dropout_between=0.3)).eval()
    assert not source.config.per_layer and target.config.per_layer
    assert "rnn.layers.1.weight_hh_l0" in convert_layout(source.state_dict(), per_layer=True)
    transfer(source, target)
    ids = torch.randint(20, (2, 30))
    with torch.no_grad():
        for direction in DIRECTIONS:
            assert torch.equal(source(ids, direction=direction).logits, target(ids, direction=direction).logits)
    back = RNNLM(_config(20, bidirectional=True)).eval()
    transfer(target, back)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), source.state_dict().values(), strict=True))


def test_transfer_refuses_another_architecture_by_name():
    with pytest.raises(ConfigError, match=r"hidden_size: pretrained 12, this run 14; .*tie_weights: pretrained False"):
        transfer(RNNLM(_config(20)), RNNLM(_config(20, hidden_size=14, tie_weights=True, embedding_dim=14)))


@pytest.mark.parametrize("settings", [
    {}, {"tie_weights": True, "embedding_dim": 12}, {"bidirectional": True},
    {"bidirectional": True, "share_directions": False}, {"input_mode": "one_hot"},
    {"input_mode": "one_hot", "weight_drop": 0.2, "bidirectional": True},
])
def test_matching_vocabularies_copies_shared_rows_and_starts_new_ones_at_the_mean(settings):
    old_tok = word_tokenizer(["the cat sat on the mat", "a dog ran"])
    new_tok = word_tokenizer(["the dog sat on a zebra", "quantum cat"])
    old_vocab, new_vocab = old_tok.get_vocab(), new_tok.get_vocab()
    mapping = vocabulary_map(old_tok, new_tok)
    shared = set(old_vocab) & set(new_vocab)
    assert sum(i >= 0 for i in mapping) == len(shared) and {"<unk>", "<eos>", "the", "dog"} <= shared
    source = RNNLM(_config(len(old_vocab), **settings))
    target = RNNLM(_config(len(new_vocab), **settings))
    report = transfer(source, target, mapping)
    assert report == {"tokens": len(new_vocab), "matched": len(shared), "new": len(new_vocab) - len(shared)}

    src, tgt = source.state_dict(), target.state_dict()
    vocab_tensors = {k: (0 if "weight_ih" not in k else 1) for k in tgt
                     if k.split(".")[0].startswith(("embedding", "decoder")) or
                     (settings.get("input_mode") == "one_hot" and "weight_ih_l0" in k and
                      (".layers.0." in k or k.endswith("rnn.weight_ih_l0") or k.endswith("backward.weight_ih_l0")))}
    assert vocab_tensors
    for name, dim in vocab_tensors.items():
        old, new = src[name].movedim(dim, 0), tgt[name].movedim(dim, 0)
        for token, i in new_vocab.items():
            expected = old[old_vocab[token]] if token in old_vocab else old.mean(0)
            assert torch.equal(new[i], expected), (name, token)
    for name in set(tgt) - set(vocab_tensors):  # the recurrent layers: copied as they are
        assert torch.equal(tgt[name], src[name]), name


# ----------------------------------------------------------------------------------------- fine-tuning (CLI)
class SanityLoss(L.Callback):
    """The validation loss of the sanity check run before training (with num_sanity_val_steps=-1, the whole split):
    the loss of the weights as init_from left them."""

    def __init__(self) -> None:
        self.loss: float | None = None

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.loss = float(trainer.callback_metrics["val/loss"])


def _val_loss_before_training(*args) -> tuple[float, object]:
    cli = run_fit(*args, "--trainer.num_sanity_val_steps", "-1", f"--trainer.callbacks+={__name__}.SanityLoss")
    return next(c for c in cli.trainer.callbacks if isinstance(c, SanityLoss)).loss, cli


TINY_RUN = ("--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "1.0", "--trainer.limit_test_batches", "2",
            "--trainer.logger", "false", "--test_after_fit", "false")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_lm_checkpoint, tiny_lm_corpus) -> dict:
    """The shared tiny trained LM (conftest), the corpus it was trained on, its export and its validation loss."""
    ckpt = str(tiny_lm_checkpoint)
    folder = tmp_path_factory.mktemp("pretrained") / "export"
    export(ckpt, str(folder))
    from rnnlm.evaluate import evaluate

    val = evaluate(ckpt, split="validation", batch_size=4, accelerator="cpu")
    lm = rnnlm.load(ckpt)
    return {"corpus": tiny_lm_corpus, "ckpt": ckpt, "folder": folder, "val_loss": val["loss"],
            "vocab": lm.config.vocab_size, "weights": lm.model.state_dict()}


@pytest.mark.parametrize("source", ["folder", "ckpt"])
def test_fine_tuning_starts_at_the_pretrained_loss_and_trains_on(pretrained, tmp_path, source, caplog):
    caplog.set_level("INFO")
    loss, cli = _val_loss_before_training(
        tmp_path, pretrained["corpus"], *TINY_RUN, "--data.eval_batch_size", "4", "--trainer.max_steps", "5",
        "--model.init_from", str(pretrained[source]),
    )
    assert loss == pytest.approx(pretrained["val_loss"], rel=1e-5, abs=1e-6)
    assert loss < math.log(pretrained["vocab"]) - 0.3  # far from an untrained model's ln V
    # The run then trains: a fresh step count and optimizer, weights moving away from the pretrained ones.
    assert cli.trainer.global_step == 5
    moved = [k for k, v in cli.model.model.state_dict().items() if not torch.equal(v, pretrained["weights"][k])]
    assert moved
    assert f"initialised from {pretrained[source]}" in caplog.text
    assert f"the tokenizer of the pretrained model {pretrained[source]}" in caplog.text
    assert cli.model.config.hidden_size == 16 and cli.datamodule.vocab_size == pretrained["vocab"]
    # An export of the fine-tuned model says where it came from.
    export(str(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"), str(tmp_path / "tuned"))
    card = (tmp_path / "tuned" / "README.md").read_text()
    # A local path, not a Hub model: named by its base name only, and no base_model in the metadata.
    assert f"Fine-tuned from the local model `{Path(pretrained[source]).name}` (its tokenizer)." in card
    assert "base_model" not in card and str(pretrained[source]) not in card


def test_evaluate_reads_an_exported_folder_as_it_reads_the_checkpoint(pretrained):
    from rnnlm.evaluate import evaluate

    # The folder names its local training data by base name only (no path of this machine): the data is given.
    by_folder = evaluate(str(pretrained["folder"]), split="validation", source=str(pretrained["corpus"]),
                         batch_size=4, accelerator="cpu")
    by_ckpt = evaluate(pretrained["ckpt"], split="validation", batch_size=4, accelerator="cpu")
    assert by_folder["loss"] == by_ckpt["loss"] == pretrained["val_loss"]
    assert by_folder["bpc"] == by_ckpt["bpc"] and by_folder["tokens"] == by_ckpt["tokens"]


def test_fine_tuning_keeps_the_architecture_and_refuses_contradicting_settings(pretrained, tmp_path):
    common = (tmp_path, pretrained["corpus"], *TINY_RUN, "--trainer.max_steps", "1",
              "--model.init_from", str(pretrained["folder"]))
    with pytest.raises(ConfigError, match=r"contradict it: cell: this run 'gru', pretrained 'lstm'; hidden_size: "
                                          r"this run 32, pretrained 16\. Remove them"):
        run_fit(*common, "--model.config.hidden_size=32", "--model.config.cell", "gru")
    with pytest.raises(ConfigError, match="data.tokenizer=word but the pretrained model .* reads char tokens"):
        run_fit(*common, "--data.tokenizer", "word")
    with pytest.raises(ConfigError, match="init_vocab=match maps tokens between vocabularies of the same level"):
        run_fit(*common, "--model.init_vocab", "match", "--data.tokenizer", "word")
    # Settings the run does not set come from the pretrained model; regularisers it sets may differ (and change
    # the stack's layout here: weight drop runs layer by layer).
    loss, cli = _val_loss_before_training(
        tmp_path / "reg", pretrained["corpus"], *TINY_RUN, "--data.eval_batch_size", "4", "--trainer.max_steps", "2",
        "--model.init_from", str(pretrained["ckpt"]), "--model.config.weight_drop", "0.3",
        "--model.config.dropout_output=0.2",
    )
    assert cli.model.config.per_layer and cli.model.config.weight_drop == 0.3
    assert loss == pytest.approx(pretrained["val_loss"], rel=1e-5, abs=1e-6)  # evaluation drops nothing
    assert cli.model.start.report["regularisation"] == ["dropout_output 0.0 -> 0.2", "weight_drop 0.0 -> 0.3"]


def test_python_use_refuses_data_read_with_another_tokenizer(pretrained, tmp_path, text_file):
    from conftest import tiny_data, tiny_trainer

    from rnnlm.training.lm import LanguageModel

    # A char tokenizer of another text, as many tokens as the pretrained one: same size, other ids.
    other = tmp_path / "other.txt"
    other.write_text(make_text(800, seed=4).upper().replace(" ", "0123456789"))
    data = tiny_data(other, tmp_path, max_vocab_size=pretrained["vocab"])
    assert data.vocab_size == pretrained["vocab"]
    model = LanguageModel(rnnlm.load(pretrained["folder"]).config, init_from=str(pretrained["folder"]))
    with pytest.raises(ConfigError, match=r"The data's tokenizer \(char, 25 tokens\) is not the one of the "
                                          r"pretrained model .* so the ids would read the wrong rows"):
        tiny_trainer(tmp_path, max_steps=1).fit(model, datamodule=data)
    # With the data module given the pretrained model too, the ids match and training runs.
    data = tiny_data(text_file, tmp_path, init_from=str(pretrained["folder"]))
    tiny_trainer(tmp_path, max_steps=2).fit(model, datamodule=data)


def test_word_level_fine_tuning_matches_the_shared_vocabulary(tmp_path, caplog):
    caplog.set_level("INFO")
    old = tmp_path / "old"
    old.mkdir()
    (old / "train.txt").write_text(make_text(300, seed=1))
    (old / "valid.txt").write_text(make_text(40, seed=2))
    (old / "test.txt").write_text(make_text(40, seed=3))
    words = ("the", "cat", "zebra", "quantum", "violin", "sat", "on")
    new = tmp_path / "new"
    new.mkdir()
    for name, n in (("train.txt", 300), ("valid.txt", 40), ("test.txt", 40)):
        (new / name).write_text("\n".join(" ".join(words[(i * 3 + j) % 7] for j in range(8)) for i in range(n)))
    first = run_fit(tmp_path / "a", old, *TINY_RUN, "--data.tokenizer", "word", "--trainer.max_steps", "4",
                    "--model.config.tie_weights", "true")  # with a projection: 16 hidden units, 8-wide embedding
    ckpt = str(Path(first.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    second = run_fit(tmp_path / "b", new, *TINY_RUN, "--trainer.max_steps", "3", "--model.init_from", ckpt,
                     "--model.init_vocab", "match", "--data.tokenizer", "word")
    report = second.model.start.report
    old_vocab = first.datamodule.tokenizer.get_vocab()
    new_vocab = second.datamodule.tokenizer.get_vocab()
    assert set(old_vocab) & set(new_vocab) == {"<unk>", "<eos>", "the", "cat", "sat", "on"}
    assert report == {**report, "tokens": 9, "matched": 6, "new": 3}  # zebra, quantum, violin are new
    assert f"{report['matched']} of the {len(new_vocab)} tokens" in caplog.text
    assert second.trainer.global_step == 3 and second.model.config.tie_weights


def test_push_without_out_and_without_network_says_nothing_was_kept(tmp_path):
    ckpt = _checkpoint_file(_trained(), tmp_path / "model.ckpt")
    with pytest.raises(PretrainedError, match="HF_HUB_OFFLINE is set. Nothing was kept: give --out DIR"):
        export_main(["--checkpoint", str(ckpt), "--push_to_hub", "someone/tiny"])


def test_an_exported_folder_can_be_pushed_as_it_is(exported, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploaded.append(kw["folder_path"]))
    result = export(str(exported), push_to_hub="someone/tiny")
    assert uploaded == [str(exported)] and result["url"].endswith("someone/tiny")
    with pytest.raises(PretrainedError, match="is an exported folder already"):
        export(str(exported), out=str(exported.parent / "again"))
