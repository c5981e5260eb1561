"""An exported folder as a Hugging Face user meets it: transformers loads the model from the code the folder carries
(no rnnlm installed) and gets rnnlm's logits, greedy continuations and labels; AutoTokenizer knows the special
tokens and gives every text the ids the model was trained with."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, tiny_trainer
from test_classify import classifier, contains_x, data_module, write_tsv
from test_sharing import KINDS, _trained

import rnnlm
from rnnlm.classify import main as classify_main
from rnnlm.network.config import RNNLMConfig
from rnnlm.sharing.export import export
from rnnlm.sharing.folders import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, tokenizer_config, write_folder
from rnnlm.text.tokenization import Encoder, train_tokenizer, with_special_tokens

transformers = pytest.importorskip("transformers")

PROMPTS = ["the ", "a cat sat on"]
TEXTS = ["abc x d", "gfe", "a b c d e f g x", "x"]
# Literal special-token spellings: rnnlm reads them as text, and so must the exported tokenizer.
TRICKY = ["a <unk> b <eos> c", "<eos>", "x<unk>y", "<pad> </s>"]
MAX_NEW = 25


@pytest.fixture(scope="module")
def exported(tiny_lm_checkpoint, tmp_path_factory) -> dict:
    """The tiny LM and a small bidirectional classifier with string labels, exported, with what rnnlm makes of
    them (the expectations the transformers side must meet)."""
    root = tmp_path_factory.mktemp("hf")
    export(str(tiny_lm_checkpoint), str(root / "lm"))
    rows = [(t, {0: "neg", 1: "pos"}[y] if i % 5 else "meh") for i, (t, y) in enumerate(contains_x(120))]
    data = data_module(write_tsv(root / "d" / "train.tsv", rows), root)
    config = RNNLMConfig(data.vocab_size, num_layers=1, embedding_dim=8, hidden_size=12, bidirectional=True)
    torch.manual_seed(0)
    trainer = tiny_trainer(root, max_epochs=1)
    trainer.fit(classifier(data, config=config), datamodule=data)
    trainer.save_checkpoint(root / "clf.ckpt")
    export(str(root / "clf.ckpt"), str(root / "clf"))

    lm = rnnlm.load(root / "lm")
    ids = torch.randint(lm.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = lm.model(ids).logits
    separator = lm.encoder.separator
    continuations = []
    for prompt in PROMPTS:
        start = torch.tensor([separator, *lm.encoder.encode_text(prompt)])
        new = lm.model.generate(start, max_new_tokens=MAX_NEW, temperature=0, stop_token=separator).tolist()
        text = lm.samples(prompt, temperature=0, max_new_tokens=MAX_NEW, stop_at_separator=True)[0].text
        continuations.append({"prompt_ids": start.tolist(), "new": new, "text": text})

    (root / "in.txt").write_text("\n".join(TEXTS) + "\n")
    classify_main(["predict", "--checkpoint", str(root / "clf"), "--input", str(root / "in.txt"),
                   "--output", str(root / "out.jsonl")])
    predictions = [json.loads(line) for line in (root / "out.jsonl").read_text().splitlines()]
    expected = {"ids": ids.tolist(), "logits": logits.tolist(), "continuations": continuations,
                "separator": separator, "texts": TEXTS, "predictions": predictions, "max_new": MAX_NEW,
                "encoded": [[separator, *lm.encoder.encode_text(t)] for t in TRICKY], "tricky": TRICKY}
    (root / "expected.json").write_text(json.dumps(expected))
    return {"root": root, "lm": root / "lm", "clf": root / "clf", "expected": root / "expected.json"}


# What runs where rnnlm cannot be imported: only transformers, torch and the folders' own code.
WITHOUT_RNNLM = textwrap.dedent("""
    import json, sys
    sys.modules["rnnlm"] = None  # any import of rnnlm now fails
    # The source tree off the path (a venv inside it, as CI makes one, stays: it holds torch and transformers).
    sys.path = [p for p in sys.path if not p.startswith(sys.argv[1]) or "site-packages" in p]
    try:
        import rnnlm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("rnnlm could be imported")
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    lm_folder, clf_folder, expected_file, report_file = sys.argv[2:6]
    expected = json.load(open(expected_file))
    report = {}
    lm = AutoModelForCausalLM.from_pretrained(lm_folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(lm_folder)
    with torch.no_grad():
        logits = lm(torch.tensor(expected["ids"])).logits
    report["logits_diff"] = (logits - torch.tensor(expected["logits"])).abs().max().item()

    # generate: how many tokens each forward call reads (the prompt once, then one token a step).
    reads = []
    lm.register_forward_pre_hook(lambda module, args, kwargs: reads.append(kwargs["input_ids"].shape[1]),
                                 with_kwargs=True)
    report["greedy"] = []
    for case, prompt in zip(expected["continuations"], ["the ", "a cat sat on"]):
        inputs = tok(prompt, return_tensors="pt")
        reads.clear()
        out = lm.generate(**inputs, max_new_tokens=expected["max_new"], do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        report["greedy"].append({"prompt_ids": inputs["input_ids"][0].tolist(), "new": new, "reads": list(reads),
                                 "text": tok.decode(new, skip_special_tokens=True)})
    # A batch of prompts padded on the left, as transformers pads for generation: each row as if alone.
    tok.padding_side = "left"
    batch = tok(["the ", "a cat sat on"], return_tensors="pt", padding=True)
    out = lm.generate(**batch, max_new_tokens=expected["max_new"], do_sample=False)
    report["batched"] = out[:, batch["input_ids"].shape[1]:].tolist()

    tok.padding_side = "right"
    padded = tok(["ab", "a b c", "t"], padding=True)
    report["padded"] = {"ids": padded["input_ids"], "mask": padded["attention_mask"],
                        "decoded": tok.batch_decode(padded["input_ids"], skip_special_tokens=True)}
    report["tricky"] = [tok(t)["input_ids"] for t in expected["tricky"]]

    classify = pipeline("text-classification", model=clf_folder, trust_remote_code=True)
    report["pipeline"] = classify(expected["texts"], top_k=None)
    model = AutoModelForSequenceClassification.from_pretrained(clf_folder, trust_remote_code=True).eval()
    ctok = AutoTokenizer.from_pretrained(clf_folder)
    with torch.no_grad():
        probs = model(**ctok(expected["texts"], padding=True, return_tensors="pt")).logits.softmax(-1)
    report["probabilities"] = probs.tolist()
    report["id2label"] = {str(k): v for k, v in model.config.id2label.items()}
    # A file, not stdout: transformers asks on stdout whether to run the folder's code (for AutoTokenizer).
    open(report_file, "w").write(json.dumps(report))
""")


@pytest.fixture(scope="module")
def report(exported) -> dict:
    root = exported["root"]
    script = root / "without_rnnlm.py"
    script.write_text(WITHOUT_RNNLM)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home"),
           "HF_MODULES_CACHE": str(root / "hf-modules"), "TOKENIZERS_PARALLELISM": "false"}
    # -I: no user site, no PYTHONPATH, and not the current folder: the worktree is not on the path.
    args = [str(ROOT), str(exported["lm"]), str(exported["clf"]), str(exported["expected"]), str(root / "report.json")]
    done = subprocess.run([sys.executable, "-I", str(script), *args], capture_output=True, text=True, cwd=root,
                          env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((root / "report.json").read_text())


def test_transformers_gives_the_checkpoints_logits_without_rnnlm(report):
    assert report["logits_diff"] <= 1e-6


def test_greedy_generate_is_rnnlms_greedy_continuation_reading_each_token_once(report, exported):
    expected = json.loads(exported["expected"].read_text())
    for got, want in zip(report["greedy"], expected["continuations"], strict=True):
        assert got["prompt_ids"] == want["prompt_ids"]  # the tokenizer puts the separator first, as rnnlm does
        assert got["new"] == want["new"]
        assert got["text"] == want["text"]
        # The state is carried: the prompt is read once, then one new token per step.
        assert got["reads"][0] == len(want["prompt_ids"]) and set(got["reads"][1:]) <= {1}
    separator = expected["separator"]
    for row, want in zip(report["batched"], expected["continuations"], strict=True):
        assert row[: len(want["new"])] == want["new"]
        assert set(row[len(want["new"]) :]) <= {separator}  # a finished row is padded with the separator


def test_the_pipeline_gives_classify_predicts_labels_and_probabilities(report, exported):
    expected = json.loads(exported["expected"].read_text())
    assert set(report["id2label"].values()) == {"meh", "neg", "pos"}
    for scores, probs, want in zip(report["pipeline"], report["probabilities"], expected["predictions"],
                                   strict=True):
        best = max(scores, key=lambda s: s["score"])
        assert best["label"] == str(want["label"])
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(want["probabilities"], abs=1e-6)
        by_name = {report["id2label"][str(i)]: p for i, p in enumerate(probs)}
        assert by_name == pytest.approx(want["probabilities"], abs=1e-6)


def test_autotokenizer_pads_a_batch_strips_special_tokens_and_reads_their_spellings_as_text(report, exported):
    expected = json.loads(exported["expected"].read_text())
    separator = expected["separator"]
    padded = report["padded"]
    assert [len(row) for row in padded["ids"]] == [6, 6, 6]
    assert padded["mask"] == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert all(row[0] == separator for row in padded["ids"])
    assert padded["decoded"] == ["ab", "a b c", "t"]
    assert report["tricky"] == expected["encoded"]


# ----------------------------------------------------------------------------------------- every model kind
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_model_kind_loads_in_transformers_with_the_same_logits(kind, tmp_path):
    trained = _trained(**KINDS[kind])
    write_folder(trained, tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(trained.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained.model(ids).logits
        got = model(ids).logits
        assert (got - want).abs().max().item() <= 1e-6
        # Read in two pieces with the cache between them: the same logits as in one pass.
        first = model(ids[:, :7], use_cache=True)
        second = model(ids[:, 7:], cache=first.cache)
    assert (torch.cat([first.logits, second.logits], 1) - want).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------- the tokenizer
CORPUS = ["the cat sat on the mat\n", "hello world\n한국어 문장입니다  with  double spaces\tand tabs\n",
          "emoji 😀🎉 and cafe\u0301\n", "a <unk> in the text and <eos> too\n"] * 3
LEVEL_SIZES = {"char": None, "byte": None, "word": None, "bpe": 300, "unigram": 80, "wordpiece": 200}


@pytest.mark.parametrize("level", list(LEVEL_SIZES))
def test_the_exported_tokenizer_resaved_by_transformers_gives_the_training_ids(level, tmp_path):
    tokenizer = train_tokenizer(level, iter(CORPUS), LEVEL_SIZES[level])
    encoder = Encoder(tokenizer)
    training = [ids.tolist() for ids in encoder.encode_each(CORPUS + TRICKY)]
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / TOKENIZER_FILE).write_text(with_special_tokens(tokenizer).to_str(), encoding="utf-8")
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(tokenizer)), encoding="utf-8")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "resaved")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "resaved")
    assert [again(t, add_special_tokens=False)["input_ids"] for t in CORPUS + TRICKY] == training
    assert again(CORPUS[0])["input_ids"] == [encoder.separator, *training[0]]
    assert again.pad_token_id == again.eos_token_id == again.bos_token_id == encoder.separator
    assert len(again) == encoder.vocab_size  # no token added, no id moved
    # rnnlm reads the marked tokenizer as before, on the same fast path.
    marked = Encoder(with_special_tokens(tokenizer))
    assert marked.path == encoder.path
    assert [ids.tolist() for ids in marked.encode_each(CORPUS + TRICKY)] == training
