"""Text classification on an RNN LM's encoder (ULMFiT): padding, pooling, layer groups, unfreezing, learning rates,
batching, labels, checkpoints, predict / evaluate, and bad input refused before training."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, tiny_trainer

import rnnlm
from rnnlm.data.classifier import BucketLoader, ClassificationDataModule
from rnnlm.errors import ConfigError, UserError
from rnnlm.network.classifier import Classifier, concat_pool, reverse_texts
from rnnlm.network.config import CELLS, RNNLMConfig
from rnnlm.sharing.classifier import load
from rnnlm.sharing.folders import FILES
from rnnlm.text.batching import make_batch
from rnnlm.text.sources import DataError
from rnnlm.text.tokenization import TokenizerError
from rnnlm.training.classifier import TextClassifier
from rnnlm.training.ulmfit import SlantedTriangularLR

CLASSIFY = [sys.executable, "-m", "rnnlm.classify"]
CONFIGS = sorted(c for c in CONFIG_DIR.glob("*.yaml") if "label_field:" in c.read_text())


# ----------------------------------------------------------------------------------------- helpers
def contains_x(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """The synthetic task: does the line contain an "x"? Lines of 4-24 characters over a small alphabet."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = "".join(rng.choice("abcdefg ") for _ in range(rng.randint(4, 24)))
        label = rng.random() < 0.5
        if label:
            i = rng.randrange(len(text) + 1)
            text = text[:i] + "x" + text[i:]
        rows.append((text, int(label)))
    return rows


def write_tsv(path: Path, rows, header=("id", "text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for i, row in enumerate(rows):
            f.write("\t".join([str(i), *(str(v) for v in row)]) + "\n")
    return path


def data_module(source, root: Path, **overrides) -> ClassificationDataModule:
    settings = dict(source=str(source), batch_size=16, cache_dir=str(root / "cache"))
    return ClassificationDataModule(**{**settings, **overrides})


def classifier(data: ClassificationDataModule, lr: float = 1e-2, **overrides) -> TextClassifier:
    settings = dict(gradual_unfreezing=False, head_hidden=16, pool_dropout=0.0, head_dropout=0.0,
                    optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr))
    config = overrides.pop("config", RNNLMConfig(data.vocab_size, num_layers=1, embedding_dim=8, hidden_size=24))
    return TextClassifier(config, data.classes, **{**settings, **overrides})


def small_encoder(cell="lstm", **kwargs) -> Classifier:
    torch.manual_seed(0)
    config = dict(vocab_size=13, cell=cell, num_layers=2, embedding_dim=6, hidden_size=10)
    return Classifier(RNNLMConfig(**{**config, **kwargs}), 3).eval()


@pytest.fixture
def pretrained(tiny_lm_checkpoint) -> Path:
    """The language model the classifiers here start from: conftest's tiny trained LM."""
    return tiny_lm_checkpoint


# ----------------------------------------------------------------------------------------- padding and pooling
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kwargs", [{}, {"bidirectional": True}, {"hidden_sizes": [10, 7]}])
def test_a_padded_text_gets_the_features_it_gets_alone(cell, kwargs):
    model = small_encoder(cell, **kwargs)
    rng = np.random.default_rng(0)
    texts = [rng.integers(2, 13, size=n) for n in (9, 3, 6, 1)]
    together = model.features(*make_batch(texts, separator=1)[:2])
    for row, text in enumerate(texts):
        alone = model.features(*make_batch([text], separator=1)[:2])
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    # The padding id does not matter either: padded with another token, the features are the same.
    batch = make_batch(texts, separator=1)
    other = batch.ids.clone()
    other[torch.arange(other.size(1)) >= batch.lengths[:, None]] = 7
    torch.testing.assert_close(model.features(other, batch.lengths), together)


def test_concat_pool_by_hand():
    states = torch.tensor([[[9.0, 9.0], [1.0, -2.0], [3.0, 0.0], [5.0, 5.0]],
                           [[9.0, 9.0], [-1.0, 4.0], [7.0, 7.0], [7.0, 7.0]]])  # fmt: skip
    lengths = torch.tensor([3, 2])  # row 0: separator + 2 tokens + padding; row 1: separator + 1 token + padding
    pooled = concat_pool(states, lengths)
    expected = torch.tensor([[3.0, 0.0, 3.0, 0.0, 2.0, -1.0],  # last, max, mean over positions 1..2
                             [-1.0, 4.0, -1.0, 4.0, -1.0, 4.0]])  # fmt: skip
    torch.testing.assert_close(pooled, expected)


def test_backward_direction_reads_each_text_reversed_in_place():
    ids = torch.tensor([[1, 5, 6, 7, 1], [1, 8, 9, 1, 1]])
    lengths = torch.tensor([4, 3])
    reversed_ids, index = reverse_texts(ids, lengths)
    assert reversed_ids.tolist() == [[1, 7, 6, 5, 1], [1, 9, 8, 1, 1]]
    assert reversed_ids.gather(1, index).tolist() == ids.tolist()  # the index is its own inverse


def test_bidirectional_features_are_forward_then_backward():
    model = small_encoder(bidirectional=True)
    text = np.array([3, 4, 5, 6])
    ids, lengths = make_batch([text], separator=1)[:2]
    features = model.features(ids, lengths)
    forward, _ = model.encoder.encode(ids)
    backward, _ = model.encoder.encode(torch.tensor([[1, 6, 5, 4, 3]]), direction="backward")
    torch.testing.assert_close(features, torch.cat([concat_pool(forward, lengths), concat_pool(backward, lengths)], -1))


# ----------------------------------------------------------------------------------------- ULMFiT
def test_layer_groups_hold_every_parameter_once_bottom_to_top():
    model = small_encoder(bidirectional=True, share_directions=False)
    groups = model.layer_groups()
    assert [name for name, _ in groups] == ["embedding", "layer1", "layer2", "head"]
    members = [id(p) for _, params in groups for p in params]
    assert len(members) == len(set(members)) and set(members) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("_l1") for p in dict(groups)["layer2"])
    assert {names[id(p)].split(".")[1] for p in dict(groups)["layer1"]} == {"rnn", "rnn_backward"}
    assert not any("decoder" in n or "projection" in n for n in names.values())  # the LM's output layers are gone


def test_layer_groups_of_a_layer_stack_and_of_one_hot_input():
    stack = small_encoder(hidden_sizes=[10, 6], weight_drop=0.3)
    assert [n for n, _ in stack.layer_groups()] == ["embedding", "layer1", "layer2", "head"]
    one_hot = small_encoder(input_mode="one_hot")
    assert [n for n, _ in one_hot.layer_groups()] == ["layer1", "layer2", "head"]


def test_gradual_unfreezing_and_discriminative_rates_through_training(tmp_path):
    import lightning as L

    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(120)), tmp_path, val_fraction=0.0)
    model = classifier(data, config=RNNLMConfig(data.vocab_size, num_layers=2, embedding_dim=4, hidden_size=6),
                       gradual_unfreezing=True, lr=0.01, lr_factor=2.0)
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:  # what this epoch trains
                seen.append({names[id(p)] for p in pl_module.parameters() if p.requires_grad})

        def on_train_epoch_end(self, trainer, pl_module):
            changed = {n for n, p in pl_module.named_parameters() if not torch.equal(p.detach(), before[n])}
            seen[-1] = (seen[-1], changed)

    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[Record()], limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    groups = [{names[id(p)] for p in params} for _, params in model.model.layer_groups()]
    head, layer2, layer1, embedding = groups[3], groups[2], groups[1], groups[0]
    expected = [head, head | layer2, head | layer2 | layer1, head | layer2 | layer1 | embedding]
    assert [trainable for trainable, _ in seen] == expected
    for epoch, (_, changed) in enumerate(seen):
        assert changed <= expected[epoch]  # frozen weights never moved
    assert seen[0][1] == head  # the first epoch moved the head only

    optimizer = trainer.optimizers[0]
    assert [g["name"] for g in optimizer.param_groups] == ["embedding", "layer1", "layer2", "head"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 / 8, 0.01 / 4, 0.01 / 2, 0.01])
    for group, members in zip(optimizer.param_groups, groups, strict=True):
        assert {names[id(p)] for p in group["params"]} == members


def test_slanted_triangular_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": 1.0}, {"params": [], "lr": 0.5}])
    schedule = SlantedTriangularLR(optimizer, total_steps=100, cut_frac=0.1, ratio=32)
    rates = []
    for _ in range(101):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx([1 / 32, 0.5 / 32])
    assert rates[10] == pytest.approx([1.0, 0.5])  # the peak at cut = 10
    assert rates[5] == pytest.approx([(1 + 0.5 * 31) / 32, 0.5 * (1 + 0.5 * 31) / 32])
    assert rates[55][0] == pytest.approx((1 + 0.5 * 31) / 32)  # half way down
    assert rates[100][0] == pytest.approx(1 / 32)
    assert max(range(101), key=lambda t: rates[t][0]) == 10


def test_slanted_triangular_from_a_config_gets_its_length_from_the_trainer(tmp_path):
    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(64)), tmp_path, val_fraction=0.0)
    model = classifier(data, lr_scheduler=lambda opt: SlantedTriangularLR(opt))
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and scheduler.scheduler.total_steps == 2 * 4  # 64 texts / 16 per batch
    assert trainer.optimizers[0].param_groups[-1]["lr"] == pytest.approx(1e-2 / 32)


# ----------------------------------------------------------------------------------------- learning
def test_learns_whether_a_line_contains_x(tmp_path):
    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(800)), tmp_path, batch_size=32)
    model = classifier(data)
    trainer = tiny_trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=data)
    assert float(trainer.callback_metrics["val/accuracy"]) > 0.9  # chance is about 0.5


# ----------------------------------------------------------------------------------------- batching
def test_bucket_loader_covers_every_text_once_with_little_padding():
    rng = np.random.default_rng(0)
    tokens = [rng.integers(2, 9, size=int(n)) for n in rng.integers(1, 200, size=1000)]
    labels = list(rng.integers(0, 2, size=1000))
    loader = BucketLoader(tokens, labels, separator=1, batch_size=16, seed=3, bucket_size=20)
    epoch0 = [b.index.tolist() for b in loader]
    assert sorted(i for b in epoch0 for i in b) == list(range(1000))
    loader.set_epoch(1)
    epoch1 = [b.index.tolist() for b in loader]
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(1000))
    random_batches = BucketLoader(tokens, labels, separator=1, batch_size=16, seed=3, bucket_size=1)
    assert loader.padding_fraction < 0.1 < random_batches.padding_fraction
    batch = next(iter(loader))
    assert batch.labels.tolist() == [labels[i] for i in batch.index.tolist()]
    for row, i in enumerate(batch.index.tolist()):
        assert batch.ids[row, 1 : batch.lengths[row]].tolist() == tokens[i].tolist() and batch.ids[row, 0] == 1


def test_bucket_loader_shards_processes_evenly_and_resumes_mid_epoch():
    tokens = [np.arange(2, 2 + n % 7 + 1) for n in range(203)]
    labels = [n % 2 for n in range(203)]
    ranks = [BucketLoader(tokens, labels, 1, 10, seed=0, world_size=2, rank=r) for r in (0, 1)]
    seen = [[i for b in loader for i in b.index.tolist()] for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) and not set(seen[0]) & set(seen[1])
    loader = BucketLoader(tokens, labels, 1, 10, seed=0, epoch=2)
    full = [b.index.tolist() for b in loader]
    loader.position = 4
    state = loader.state_dict()
    resumed = BucketLoader(tokens, labels, 1, 10, seed=0)
    resumed.load_state_dict(state)
    assert [b.index.tolist() for b in resumed] == full[4:]
    with pytest.raises(ConfigError, match="Cannot resume mid-epoch"):
        BucketLoader(tokens, labels, 1, 20, seed=0).load_state_dict(state)


# ----------------------------------------------------------------------------------------- labels and checkpoints
def test_string_labels_survive_a_checkpoint_and_predict(tmp_path):
    rows = [(t, {0: "neg", 1: "pos"}[y] if i % 5 else "meh") for i, (t, y) in enumerate(contains_x(150))]
    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", rows), tmp_path)
    assert data.classes == ["meh", "neg", "pos"]
    model = classifier(data)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "clf.ckpt"
    trainer.save_checkpoint(path)
    clf = load(path)
    assert clf.labels == ["meh", "neg", "pos"] and clf.max_length == 512
    texts = ["abc x", "gfedcba", ""]
    predictions = clf.predict(texts)
    assert predictions[2] is None
    model.eval()
    with torch.no_grad():
        batch = make_batch(clf.tokenize(texts[:2]), clf.encoder.separator)
        expected = torch.softmax(model(batch.ids, batch.lengths).double(), -1)
    for prediction, probs in zip(predictions[:2], expected, strict=True):
        assert list(prediction.probabilities) == ["meh", "neg", "pos"]
        assert list(prediction.probabilities.values()) == pytest.approx(probs.tolist())
        assert prediction.label == clf.labels[int(probs.argmax())]


def test_class_label_names_and_explicit_label_order(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    rows = contains_x(60)
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(10))}).save_to_disk(str(tmp_path / "saved"))
    data = data_module(tmp_path / "saved", tmp_path)
    assert data.classes == ["negative", "positive"]
    assert data.targets["validation"] == [y for _, y in rows[:10]]
    csv = write_tsv(tmp_path / "c" / "train.tsv", [(t, y) for t, y in rows])
    assert data_module(csv, tmp_path, label_order=[1, 0]).classes == [1, 0]


def test_validation_is_carved_from_train_when_missing(tmp_path):
    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(200)), tmp_path, val_fraction=0.25)
    assert data.splits == ["train", "validation"]
    assert (data.stats["train"]["rows"], data.stats["validation"]["rows"]) == (150, 50)
    again = data_module(tmp_path / "d" / "train.tsv", tmp_path, val_fraction=0.25)
    assert again.targets["validation"] == data.targets["validation"]  # the same draw every time


def test_csv_json_and_parquet_sources_and_a_delimiter(tmp_path):
    import pandas as pd

    rows = contains_x(40)
    frame = pd.DataFrame({"review": [t for t, _ in rows], "stars": [y for _, y in rows]})
    for name in ("train.csv", "train.jsonl", "train.parquet"):
        path = tmp_path / name.split(".")[1] / name
        path.parent.mkdir()
        {"csv": lambda p: frame.to_csv(p, index=False),
         "jsonl": lambda p: frame.to_json(p, orient="records", lines=True, force_ascii=False),
         "parquet": lambda p: frame.to_parquet(p)}[name.split(".")[1]](path)
        data = data_module(path, tmp_path, text_field="review", label_field="stars", val_fraction=0.0)
        assert data.stats["train"]["rows"] == 40 and data.classes == [0, 1], name
    semicolons = tmp_path / "semi" / "train.csv"
    semicolons.parent.mkdir()
    frame.to_csv(semicolons, index=False, sep=";")
    data = data_module(semicolons, tmp_path, text_field="review", label_field="stars", delimiter=";", val_fraction=0)
    assert data.stats["train"]["rows"] == 40


# ----------------------------------------------------------------------------------------- bad input
def test_missing_label_field_lists_the_columns(tmp_path):
    source = write_tsv(tmp_path / "d" / "train.tsv", contains_x(20), header=("id", "text", "sentiment"))
    with pytest.raises(DataError, match=r"no field 'label'.*\['id', 'text', 'sentiment'\].*data.label_field"):
        data_module(source, tmp_path).classes  # noqa: B018


def test_a_single_class_is_refused(tmp_path):
    source = write_tsv(tmp_path / "d" / "train.tsv", [(t, 1) for t, _ in contains_x(20)])
    with pytest.raises(DataError, match="single class.*labelled 1"):
        data_module(source, tmp_path).classes  # noqa: B018


def test_validation_labels_that_training_never_shows_are_refused(tmp_path):
    write_tsv(tmp_path / "d" / "train.tsv", contains_x(20))
    write_tsv(tmp_path / "d" / "validation.tsv", [("abc", 0), ("abd", 2)])
    with pytest.raises(DataError, match=r"validation split has labels \[2\] that the training split never shows"):
        data_module(tmp_path / "d", tmp_path).classes  # noqa: B018


def test_empty_texts_and_missing_labels_are_skipped_and_counted(tmp_path):
    rows = [*contains_x(30), ("", 1), ("   ", 0), ("abc", "")]
    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", rows), tmp_path, val_fraction=0.0)
    assert data.stats["train"]["rows"] == 30
    assert data.stats["train"]["skipped_empty_text"] == 2 and data.stats["train"]["skipped_no_label"] == 1


def test_a_tokenizer_that_does_not_match_the_pretrained_model_is_refused(tmp_path, pretrained):
    source = write_tsv(tmp_path / "d" / "train.tsv", contains_x(30))
    with pytest.raises(TokenizerError, match="does not match the tokenizer of the pretrained model"):
        data_module(source, tmp_path, init_from=str(pretrained), tokenizer="byte").vocab_size  # noqa: B018
    data = data_module(source, tmp_path, tokenizer="char")
    lm_data = data_module(source, tmp_path, init_from=str(pretrained))
    model = TextClassifier(RNNLMConfig(lm_data.vocab_size), lm_data.classes, init_from=str(pretrained))
    with pytest.raises(TokenizerError, match="tokenized differently from the pretrained model"):
        model.use_data(data.tokenizer.to_str(), data.classes, 512)


def test_init_from_copies_the_pretrained_encoder_and_refuses_a_config(tmp_path, pretrained):
    import rnnlm

    source = write_tsv(tmp_path / "d" / "train.tsv", contains_x(30))
    data = data_module(source, tmp_path, init_from=str(pretrained))
    lm = rnnlm.load(pretrained)
    assert data.tokenizer.to_str() == lm.tokenizer.to_str()
    model = TextClassifier(RNNLMConfig(data.vocab_size), data.classes, init_from=str(pretrained), dropout_scale=0.5)
    assert model.model.config.architecture() == lm.config.architecture()
    for name, value in model.model.encoder.state_dict().items():
        torch.testing.assert_close(value, lm.model.state_dict()[name])
    with pytest.raises(ConfigError, match="model.config sets hidden_size.*init_from"):
        TextClassifier(RNNLMConfig(data.vocab_size, hidden_size=64), data.classes, init_from=str(pretrained))


def test_the_same_schedule_control_takes_the_architecture_and_not_the_weights(tmp_path, pretrained):
    import rnnlm

    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(30)), tmp_path, init_from=str(pretrained))
    lm = rnnlm.load(pretrained)
    control = TextClassifier(RNNLMConfig(data.vocab_size), data.classes, init_from=str(pretrained),
                             pretrained_weights=False)
    assert control.model.config.architecture() == lm.config.architecture()
    assert control.tokenizer_json == lm.tokenizer.to_str()
    own = control.model.encoder.state_dict()
    assert not any(torch.equal(own[name], value) for name, value in lm.model.state_dict().items() if name in own)
    with pytest.raises(ConfigError, match="pretrained_weights: false needs model.init_from"):
        TextClassifier(RNNLMConfig(data.vocab_size), data.classes, pretrained_weights=False)


def test_label_smoothing_changes_the_training_loss_only(tmp_path):
    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(40)), tmp_path, tokenizer="char",
                       val_fraction=0.0)
    batch = next(iter(data.train_dataloader()))
    losses = {}
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        model = classifier(data, label_smoothing=smoothing)
        model.trainer = types.SimpleNamespace(train_dataloader=None, num_training_batches=1, global_step=1,
                                              log_every_n_steps=50)
        losses[smoothing] = model.training_step(batch, 0).item()
        logits = model(batch.ids, batch.lengths)
        assert float(torch.nn.functional.cross_entropy(logits, batch.labels, label_smoothing=smoothing)) \
            == pytest.approx(losses[smoothing])
    assert losses[0.0] != pytest.approx(losses[0.2])
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        classifier(data, label_smoothing=1.0)


# ----------------------------------------------------------------------------------------- the command line
def _config(tmp_path: Path, source: Path, **model) -> Path:
    import yaml

    config = {
        "seed_everything": 3,
        "trainer": {"max_epochs": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"), "log_every_n_steps": 1},
        "data": {"source": str(source), "batch_size": 32, "cache_dir": str(tmp_path / "cache")},
        "model": {"head_hidden": 8, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
                  "lr_scheduler": {"class_path": "rnnlm.training.ulmfit.SlantedTriangularLR"}, **model},
    }
    path = tmp_path / "classify.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_trains_from_a_pretrained_lm_then_predicts_evaluates_and_exports(tmp_path, pretrained, capsys):
    from rnnlm.classify import main

    folder = tmp_path / "d"
    write_tsv(folder / "train.tsv", contains_x(200, seed=1))
    write_tsv(folder / "test.tsv", contains_x(40, seed=2))
    cli = main(["--config", str(_config(tmp_path, folder, init_from=str(pretrained), dropout_scale=0.5))])
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and "test/accuracy" in cli.trainer.callback_metrics
    val_accuracy = float(cli.trainer.checkpoint_callback.best_model_score)
    capsys.readouterr()

    result = main(["evaluate", "--checkpoint", best])
    assert result["split"] == "validation" and result["texts"] == 20
    assert result["accuracy"] == pytest.approx(val_accuracy, abs=1e-6)
    assert sum(map(sum, result["confusion_matrix"])) == 20
    result = main(["evaluate", "--checkpoint", best, "--source", str(folder / "test.tsv")])
    assert result["split"] == "train" and result["texts"] == 40  # a single file is one split, read whole

    lines = ["abc x d", "", "gfe"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    assert main(["predict", "--checkpoint", best, "--input", str(tmp_path / "in.txt"),
                 "--output", str(tmp_path / "out.jsonl")]) == 3
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert records[1] == {"label": None, "probabilities": None}
    for record in (records[0], records[2]):
        assert record["label"] in (0, 1) and set(record["probabilities"]) == {"0", "1"}
        assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert record["label"] == int(max(record["probabilities"], key=record["probabilities"].get))

    write_tsv(tmp_path / "other.tsv", [("abc", 0), ("abd", 7)])
    with pytest.raises(DataError, match=r"labels \[7\] that are not among the classes \[0, 1\]"):
        main(["evaluate", "--checkpoint", best, "--source", str(tmp_path / "other.tsv")])

    # Exported, the classifier predicts and evaluates exactly as its checkpoint does.
    from rnnlm.export import main as export_main

    exported = export_main(["--checkpoint", best, "--out", str(tmp_path / "exported")])
    assert exported["logits_identical"] and exported["max_abs_logit_diff"] == 0.0
    assert sorted(exported["files"]) == sorted(FILES)
    settings = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert settings["task"] == "classification" and settings["classifier"]["labels"] == [0, 1]
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card
    assert f"Fine-tuned from the local language model `{Path(pretrained).name}`." in card
    assert str(pretrained) not in card and str(tmp_path) not in card
    assert f"| validation | {val_accuracy:.4f} |" in card and f"| test (`{Path(best).name}`" in card
    assert "rnnlm.classify predict --checkpoint" in card
    # The folder names its local data by base name only (no path of this machine): the data is given.
    by_folder = main(["evaluate", "--checkpoint", str(tmp_path / "exported"), "--source", str(folder)])
    by_ckpt = main(["evaluate", "--checkpoint", best, "--source", str(folder)])
    assert by_folder["accuracy"] == by_ckpt["accuracy"] and by_folder["loss"] == by_ckpt["loss"]
    main(["predict", "--checkpoint", str(tmp_path / "exported"), "--input", str(tmp_path / "in.txt"),
          "--output", str(tmp_path / "out2.jsonl")])
    assert (tmp_path / "out2.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()
    # Each loader refuses the other kind of folder by name.
    with pytest.raises(UserError, match="holds a text classifier, not a language model: rnnlm.sharing.classifier.load"):
        rnnlm.load(tmp_path / "exported")
    export_main(["--checkpoint", str(pretrained), "--out", str(tmp_path / "lm")])
    with pytest.raises(UserError, match="holds a language model, not a text classifier: rnnlm.load"):
        main(["predict", "--checkpoint", str(tmp_path / "lm"), "--input", str(tmp_path / "in.txt")])


def test_cli_logs_a_confusion_matrix_to_wandb(tmp_path, monkeypatch):
    from rnnlm.classify import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    config = _config(tmp_path, write_tsv(tmp_path / "d" / "train.tsv", contains_x(100)),
                     config={"num_layers": 1, "embedding_dim": 8, "hidden_size": 8}, gradual_unfreezing=False)
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.WandbLogger",
                         "init_args": {"project": "rnnlm-test", "save_dir": str(tmp_path)}})
    main(["--config", str(config), "--trainer.logger", logger, "--trainer.max_epochs", "1"])
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    tables = list(run.glob("files/media/table/val/confusion_matrix_table_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert [row[:2] for row in table["data"]] == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]
    assert sum(row[2] for row in table["data"]) == 10  # the validation split: a tenth of 100


@pytest.mark.slow  # a fresh process
def test_cli_refuses_bad_input_before_training(tmp_path):
    source = write_tsv(tmp_path / "d" / "train.tsv", contains_x(20), header=("id", "review", "label"))
    result = subprocess.run([*CLASSIFY, "--config", str(_config(tmp_path, source))], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no field 'text'" in result.stderr and "['id', 'review', 'label']" in result.stderr


def test_a_hub_revision_reaches_datasets_and_local_sources_ignore_it(tmp_path, monkeypatch):
    import datasets

    from rnnlm.data.lm import LMDataModule

    rows = contains_x(40)
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"id": list(range(40)), "document": [t for t, _ in rows], "label": [y for _, y in rows]})})
    calls = []

    def load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs.get("revision")))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = data_module("e9t/nsmc", tmp_path, revision="refs/convert/parquet", text_field="document")
    assert data.stats["train"]["rows"] == 36 and calls == [("e9t/nsmc", "refs/convert/parquet")]
    LMDataModule(source="e9t/nsmc", revision="refs/convert/parquet", text_field="document").corpus  # noqa: B018
    assert calls[-1] == ("e9t/nsmc", "refs/convert/parquet")
    monkeypatch.undo()
    local = data_module(write_tsv(tmp_path / "d" / "train.tsv", rows), tmp_path, revision="refs/convert/parquet")
    assert local.stats["train"]["rows"] == 36


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_classifier_config_runs_end_to_end(config, tmp_path, pretrained):
    from rnnlm.classify import main

    source = write_tsv(tmp_path / "d" / "train.tsv", contains_x(300), header=("id", "document", "label"))
    extra = ["--data.source", str(source), "--data.cache_dir", str(tmp_path / "cache"),
             "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
             "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "3",
             "--trainer.enable_progress_bar", "false"]
    if "init_from:" in config.read_text():
        extra += ["--model.init_from", str(pretrained)]
    else:
        extra += ["--model.config.hidden_size", "16", "--model.config.embedding_dim", "8"]
    cli = main(["--config", str(config), *extra])
    assert cli.trainer.global_step == 3
    best = cli.trainer.checkpoint_callback.best_model_path
    assert Path(best).parent == tmp_path / "ckpt"
    assert load(best).predict(["abc x"])[0].label in (0, 1)


@pytest.mark.slow
@pytest.mark.ddp
def test_gradual_unfreezing_under_ddp(tmp_path):
    source = write_tsv(tmp_path / "d" / "train.tsv", contains_x(256))
    config = _config(tmp_path, source, config={"num_layers": 2, "embedding_dim": 8, "hidden_size": 8})
    common = [*CLASSIFY, "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.num_sanity_val_steps", "0", "--test_after_fit", "false"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    refused = subprocess.run([*common, "--trainer.strategy", "ddp"], capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "ddp_find_unused_parameters_true" in refused.stderr
    done = subprocess.run([*common, "--trainer.strategy", "ddp_find_unused_parameters_true"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 1: training layer2, head" in done.stdout + done.stderr
    assert "`Trainer.fit` stopped: `max_epochs=2` reached" in done.stdout + done.stderr
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["rnnlm"]["task"] == "classification"


def test_a_run_resumed_mid_epoch_sees_the_batches_it_had_left(tmp_path):
    import lightning as L

    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(160)), tmp_path, val_fraction=0.0)

    class Seen(L.Callback):
        def __init__(self, save_at: int | None = None):
            self.batches, self.save_at = [], save_at

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append((trainer.current_epoch, batch.index.tolist()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.save_at:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    def run(seen, ckpt_path=None):
        torch.manual_seed(0)
        trainer = tiny_trainer(tmp_path, max_steps=15, callbacks=[seen], limit_val_batches=0)
        trainer.fit(classifier(data), datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        return trainer

    whole = Seen(save_at=13)  # 10 batches per epoch: saved 3 batches into epoch 1
    run(whole)
    rest = Seen()
    run(rest, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert whole.batches[:13] + rest.batches == whole.batches
    assert whole.batches[0][1] != whole.batches[10][1]  # epoch 1 has another order than epoch 0


def test_training_seconds_are_the_clock_s_over_a_resume(tmp_path, monkeypatch):
    """train_seconds reads the clock from the start of training, is saved in the checkpoint and, resumed, goes on
    from there; the time between the two runs does not count. Each batch takes 2 s of a fake clock."""
    import lightning as L

    import rnnlm.training.classifier

    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(rnnlm.training.classifier, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    class Tick(L.Callback):
        def __init__(self, save_at: int | None = None):
            self.save_at = save_at

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.now += 2.0
            if trainer.global_step == self.save_at:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(160)), tmp_path, val_fraction=0.0)
    first = tiny_trainer(tmp_path, max_steps=5, callbacks=[Tick(save_at=3)], limit_val_batches=0)
    first.fit(classifier(data), datamodule=data)
    assert first.lightning_module.train_seconds() == 10.0
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)["rnnlm"]["train_seconds"]
    assert saved == 6.0
    clock.now += 1000.0  # between the runs
    resumed = tiny_trainer(tmp_path, max_steps=5, callbacks=[Tick()], limit_val_batches=0)
    resumed.fit(classifier(data), datamodule=data, ckpt_path=str(tmp_path / "mid.ckpt"), weights_only=True)
    assert resumed.lightning_module.train_seconds() == 6.0 + 2 * 2.0


def test_accuracy_against_training_time(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    sys.path.insert(0, str(CONFIG_DIR.parent / "scripts"))
    from plot_accuracy import main as plot
    from plot_accuracy import read_points

    data = data_module(write_tsv(tmp_path / "d" / "train.tsv", contains_x(96)), tmp_path)
    trainer = tiny_trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path / "logs"))
    trainer.fit(classifier(data), datamodule=data)
    metrics = next((tmp_path / "logs").rglob("metrics.csv"))
    points = read_points(metrics)
    assert len(points) == 2 and 0 < points[0][0] < points[1][0]
    assert points[1][1] == pytest.approx(float(trainer.callback_metrics["val/accuracy"]))
    plot([str(metrics), "--labels", "run", "--reference", "0.871", "TF-IDF", "-o", str(tmp_path / "a.png")])
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_accuracy_against_the_number_of_labels(tmp_path):
    sys.path.insert(0, str(CONFIG_DIR.parent / "scripts"))
    from plot_labels import main as plot
    from plot_labels import read_results

    results = tmp_path / "results.csv"
    results.write_text("method,labels,accuracy\npretrained,1000,0.70\npretrained,1000,0.72\npretrained,10000,0.84\n"
                       "TF-IDF,1000,0.753\nTF-IDF,10000,0.827\n")
    assert read_results(str(results)) == {"pretrained": {1000: 0.72, 10000: 0.84}, "TF-IDF": {1000: 0.753,
                                                                                                10000: 0.827}}
    plot([str(results), "-o", str(tmp_path / "labels.png")])
    assert (tmp_path / "labels.png").stat().st_size > 1000


@pytest.mark.slow  # ten timed variants; tiny, but each time step is a kernel call
def test_the_speed_script_measures_every_variant(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(CONFIG_DIR.parent / "scripts"))
    import classifier_speed

    texts = write_tsv(tmp_path / "t.tsv", contains_x(64), header=("id", "document", "label"))
    monkeypatch.setattr(sys, "argv", ["classifier_speed.py", "--texts", str(texts), "--hidden", "8", "--embedding",
                                      "4", "--vocab", "20", "--batch_size", "8", "--lm_batch_size", "4", "--bptt",
                                      "8", "--steps", "2", "--rounds", "1"])
    classifier_speed.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    variants = {row["variant"]: row for row in lines[:-1]}
    assert set(variants) == {"lm", "masks, bucketed", "masks, random batches", "packed, bucketed",
                             "packed, random batches"}
    assert all(row["tokens_per_s"] > 0 for row in variants.values())
    assert variants["masks, bucketed"]["padding"] < variants["masks, random batches"]["padding"]
    assert set(lines[-1]["classifier / lm"]) == set(variants) - {"lm"}


def test_evaluation_batches_give_every_process_its_share():
    tokens = [np.arange(2, 2 + n % 9 + 1) for n in range(21)]
    labels = [n % 2 for n in range(21)]
    from rnnlm.data.classifier import SortedLoader

    ranks = [[i for b in SortedLoader(tokens, labels, 1, 64, world_size=2, rank=r) for i in b.index.tolist()]
             for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(21)) and min(map(len, ranks)) == 10
    single = [b for b in SortedLoader(tokens, labels, 1, 4)]
    assert [len(b.index) for b in single] == [4, 4, 4, 4, 4, 1]
    assert all(b.lengths[0] >= b.lengths[-1] for b in single)
