"""Does a language model carry sentiment? A quick diagnostic that needs no fine-tuning: the LM's frozen features,
pooled over each text (``rnnlm.embed``'s concat pooling: the state at the last token, the maximum and the mean of
the top layer), fed to a logistic regression fitted on the training texts; accuracy on the evaluation texts.

    python scripts/feature_probe.py --checkpoint runs/nsmc_char_lm/checkpoints/last.ckpt \
        --train ../shared/data/nsmc-sentiment-1k/train.tsv --eval ../shared/data/nsmc-sentiment-1k/validation.tsv

Compare it across checkpoints of a pretraining run (or against an untrained model of the same shape, ``--untrained``)
before spending a fine-tuning run on one: the features of an LM that learned something about the reviews separate
the classes better than those of random weights. Prints one JSON line. Needs scikit-learn and pandas, which rnnlm
does not depend on (``pip install scikit-learn pandas``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from rnnlm.embed import FeatureWriter, load_encoder


def read(path: str, text_field: str, label_field: str) -> tuple[list[str], list]:
    import pandas as pd  # an optional extra of this script, not a dependency of rnnlm

    frame = pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",", dtype={text_field: str},
                        keep_default_na=False, na_values={label_field: [""]})
    frame = frame[frame[text_field].str.strip().astype(bool) & frame[label_field].notna()]
    return frame[text_field].tolist(), frame[label_field].tolist()


def features(writer: FeatureWriter, texts: list[str], labels: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The pooled features of the texts the tokenizer leaves some token of, and their labels."""
    tokens, rows = writer.block(texts, batch_size)
    kept = [i for i, ids in enumerate(tokens) if len(ids)]
    return rows[kept], np.asarray([labels[i] for i in kept])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a language model (a .ckpt, an exported folder)")
    parser.add_argument("--train", default="../shared/data/nsmc-sentiment-1k/train.tsv")
    parser.add_argument("--eval", default="../shared/data/nsmc-sentiment-1k/validation.tsv")
    parser.add_argument("--text_field", default="document")
    parser.add_argument("--label_field", default="label")
    parser.add_argument("--max_length", type=int, default=160, help="tokens read per text (as the NSMC configs)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--C", type=float, default=1.0, help="inverse regularisation strength of the regression")
    parser.add_argument("--untrained", action="store_true", help="the same model with its weights re-initialised")
    args = parser.parse_args()
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        sys.exit("This diagnostic needs scikit-learn, which rnnlm does not depend on: pip install scikit-learn")

    start = time.perf_counter()
    model = load_encoder(args.checkpoint, torch.device("cpu"), args.max_length)
    if args.untrained:
        torch.manual_seed(0)
        for module in model.encoder.modules():
            if hasattr(module, "reset_parameters") and module is not model.encoder:
                module.reset_parameters()
    writer = FeatureWriter(model, pooling="concat", layers="top")
    train_texts, train_labels = read(args.train, args.text_field, args.label_field)
    eval_texts, eval_labels = read(args.eval, args.text_field, args.label_field)
    x_train, y_train = features(writer, train_texts, train_labels, args.batch_size)
    x_eval, y_eval = features(writer, eval_texts, eval_labels, args.batch_size)
    scaler = StandardScaler().fit(x_train)
    regression = LogisticRegression(C=args.C, max_iter=3000).fit(scaler.transform(x_train), y_train)
    accuracy = float((regression.predict(scaler.transform(x_eval)) == y_eval).mean())
    print(json.dumps({"checkpoint": args.checkpoint, "untrained": args.untrained, "train": args.train,
                      "eval": args.eval, "train_texts": len(train_texts), "eval_texts": len(eval_texts),
                      "features": int(x_train.shape[1]), "C": args.C, "accuracy": round(accuracy, 4),
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
