"""``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` on the networks (RNNLM, Classifier): the same folder
``rnnlm.export`` writes, loaded strictly, nothing printed, offline from the Hub cache.

Real files and no network: the Hub id is read from a pre-populated cache with ``HF_HUB_OFFLINE=1`` (set by
conftest); only the upload is replaced, by a recorder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from test_sharing import KINDS, _config, _populate_hub_cache, _tokenizer

import rnnlm
from rnnlm.errors import PretrainedError
from rnnlm.export import main as export_main
from rnnlm.network.classifier import Classifier
from rnnlm.network.config import RNNLMConfig
from rnnlm.network.lm import DIRECTIONS, RNNLM
from rnnlm.sharing import classifier as sharing_classifier
from rnnlm.sharing.folders import read_config, read_values

LEGACY = ROOT / "tests" / "fixtures" / "legacy"


def _ids(vocab_size: int, rows: int = 3, steps: int = 20) -> torch.Tensor:
    return torch.randint(vocab_size, (rows, steps), generator=torch.Generator().manual_seed(1))


def _lm_logits(model: RNNLM, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(ids, direction=d).logits for d in DIRECTIONS[: 2 if model.config.bidirectional else 1]]


def _classifier_logits(model: Classifier, vocab_size: int) -> torch.Tensor:
    ids = _ids(vocab_size, rows=4, steps=12)
    lengths = torch.tensor([12, 9, 5, 2])
    with torch.no_grad():
        return model.eval()(ids, lengths)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def exported_lm(tiny_lm_checkpoint, tmp_path, capsys) -> Path:
    folder = tmp_path / "exported"
    export_main(["--checkpoint", str(tiny_lm_checkpoint), "--out", str(folder)])
    capsys.readouterr()  # export reports on stdout; the tests read what loading prints
    return folder


# ----------------------------------------------------------------------------------------- language models
def test_an_exported_folder_loads_with_the_logits_rnnlm_load_gives(exported_lm, capsys):
    model = RNNLM.from_pretrained(exported_lm)
    assert capsys.readouterr().out == ""
    reference = rnnlm.load(exported_lm).model
    assert not model.training and model.config == reference.config
    ids = _ids(model.config.vocab_size)
    for a, b in zip(_lm_logits(model, ids), _lm_logits(reference, ids), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_pretrained_then_from_pretrained_is_bit_for_bit(kind, tmp_path, capsys):
    torch.manual_seed(0)
    model = RNNLM(_config(_tokenizer().get_vocab_size(with_added_tokens=True), **KINDS[kind])).eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = RNNLM.from_pretrained(tmp_path / "saved")
    assert capsys.readouterr().out == ""
    assert loaded.config == model.config
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = _ids(model.config.vocab_size)
    for a, b in zip(_lm_logits(model, ids), _lm_logits(loaded, ids), strict=True):
        assert torch.equal(a, b)
    if model.config.tie_weights:
        assert loaded.decoder.weight is loaded.embedding.weight
    # The sharing layer reads the same config.json (a folder without a tokenizer is then refused by name).
    assert read_config(tmp_path / "saved") == model.config
    with pytest.raises(PretrainedError, match="has no tokenizer.json"):
        rnnlm.load(tmp_path / "saved")


def test_an_exported_folder_saved_again_keeps_its_settings(exported_lm, tmp_path):
    model = RNNLM.from_pretrained(exported_lm)
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    exported = read_values(exported_lm)
    assert saved["model_type"] == exported["model_type"] == "rnnlm"
    assert {k: saved[k] for k in RNNLMConfig.__dataclass_fields__} == {
        k: exported[k] for k in RNNLMConfig.__dataclass_fields__}
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == load_file(
        exported_lm / "model.safetensors").keys()


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_missing_or_unexpected_tensor_is_refused_by_name(change, tmp_path):
    RNNLM(RNNLMConfig(12, num_layers=1, embedding_dim=4, hidden_size=6)).save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "model.safetensors"
    tensors = load_file(path)
    if change == "missing":
        del tensors["rnn.weight_hh_l0"]
        named = "missing tensors: rnn.weight_hh_l0"
    else:
        tensors["extra.weight"] = torch.zeros(2)
        named = "tensors the config has no place for: extra.weight"
    save_file(tensors, path)
    with pytest.raises(PretrainedError, match=named):
        RNNLM.from_pretrained(tmp_path / "saved")


def test_saving_refuses_a_non_empty_folder_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = RNNLM(RNNLMConfig(12, num_layers=1, embedding_dim=4, hidden_size=6))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(PretrainedError, match="exists and is not empty.*overwrite=True"):
        model.save_pretrained(tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]

    model.save_pretrained(tmp_path / "old")
    before = _files(tmp_path / "old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("rnnlm.network.pretrained.save_weights", broken)
    for target, overwrite in (("new", False), ("old", True)):
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(tmp_path / target, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert _files(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "taken"]  # no temporary folders
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "taken", overwrite=True)  # replaced as a whole, as export --overwrite does
    assert sorted(os.listdir(tmp_path / "taken")) == ["README.md", "config.json", "model.safetensors"]


def test_a_hub_id_loads_from_the_hub_cache_offline(exported_lm, hub_cache, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    _populate_hub_cache(hub_cache, "someone/tiny-rnnlm", exported_lm)
    model = RNNLM.from_pretrained("someone/tiny-rnnlm")
    assert capsys.readouterr().out == ""
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_lm_logits(model, ids)[0], _lm_logits(rnnlm.load(exported_lm).model, ids)[0])
    with pytest.raises(PretrainedError, match="HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"):
        RNNLM.from_pretrained("someone/not-downloaded")


def test_push_to_hub_uploads_what_from_pretrained_reads(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi, RepoUrl

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploads.append((repo_id, sorted(p.name for p in folder.iterdir()), RNNLM.from_pretrained(folder)))
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = RNNLM(RNNLMConfig(12, num_layers=1, embedding_dim=4, hidden_size=6)).eval()
    assert model.push_to_hub("someone/tiny") == "https://huggingface.co/someone/tiny/commit/1"
    ((repo_id, files, loaded),) = uploads
    assert repo_id == "someone/tiny" and files == ["README.md", "config.json", "model.safetensors"]
    ids = _ids(12)
    assert torch.equal(_lm_logits(loaded, ids)[0], _lm_logits(model, ids)[0])
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------- classifiers
@pytest.mark.parametrize("which", ["legacy folder", "exported now"])
def test_an_exported_classifier_loads_with_the_logits_its_loader_gives(which, tmp_path, capsys):
    folder = LEGACY / "classifier_folder"
    if which == "exported now":
        folder = tmp_path / "exported"
        export_main(["--checkpoint", str(LEGACY / "classifier_last.ckpt"), "--out", str(folder)])
        capsys.readouterr()
    model = Classifier.from_pretrained(folder)
    assert capsys.readouterr().out == ""
    reference = sharing_classifier.load(folder).model
    vocab_size = model.config.vocab_size
    assert torch.equal(_classifier_logits(model, vocab_size), _classifier_logits(reference, vocab_size))

    model.save_pretrained(tmp_path / "saved")
    again = Classifier.from_pretrained(tmp_path / "saved")
    assert again.num_classes == model.num_classes and again.head_settings == model.head_settings
    assert torch.equal(_classifier_logits(again, vocab_size), _classifier_logits(model, vocab_size))
    assert read_values(tmp_path / "saved", task="classification")["classifier"]["num_classes"] == model.num_classes


def test_the_wrong_kind_of_network_is_refused_by_name(exported_lm, tmp_path):
    with pytest.raises(PretrainedError, match="holds a text classifier, not a language model: "
                                              "Classifier.from_pretrained"):
        RNNLM.from_pretrained(LEGACY / "classifier_folder")
    with pytest.raises(PretrainedError, match="holds a language model, not a text classifier: RNNLM.from_pretrained"):
        Classifier.from_pretrained(exported_lm)
    Classifier(RNNLMConfig(12, num_layers=1, embedding_dim=4, hidden_size=6), 3).save_pretrained(tmp_path / "clf")
    with pytest.raises(PretrainedError, match="holds a text classifier"):
        RNNLM.from_pretrained(tmp_path / "clf")
    with pytest.raises(PretrainedError, match="holds a text classifier, not a language model"):
        rnnlm.load(tmp_path / "clf")  # the sharing layer reads the network's config.json the same way
