"""The bag-of-n-grams reference for a text classifier: TF-IDF of character n-grams + logistic regression.

    python scripts/tfidf_baseline.py [--train ../shared/data/nsmc-sentiment/train.tsv]
        [--eval ../shared/data/nsmc-sentiment/validation.tsv] [--analyzer char --min_n 1 --max_n 3] [--C 4]

Reads two labelled files (TSV/CSV with ``--text_field`` and ``--label_field`` columns; rows with an empty text or
no label are left out, as ``rnnlm.classify`` leaves them out), fits the vectorizer and the classifier on the first
and prints accuracy and macro-F1 on the second as one JSON line. Needs scikit-learn, which rnnlm does not depend
on (``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def read(path: str, text_field: str, label_field: str) -> tuple[list[str], list]:
    import pandas as pd

    frame = pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",", dtype={text_field: str},
                        keep_default_na=False, na_values={label_field: [""]})
    frame = frame[frame[text_field].str.strip().astype(bool) & frame[label_field].notna()]
    return frame[text_field].tolist(), frame[label_field].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default="../shared/data/nsmc-sentiment/train.tsv")
    parser.add_argument("--eval", default="../shared/data/nsmc-sentiment/validation.tsv")
    parser.add_argument("--text_field", default="document")
    parser.add_argument("--label_field", default="label")
    parser.add_argument("--analyzer", default="char", choices=("char", "char_wb", "word"))
    parser.add_argument("--min_n", type=int, default=1)
    parser.add_argument("--max_n", type=int, default=3)
    parser.add_argument("--min_df", type=int, default=2)
    parser.add_argument("--C", type=float, default=4.0, help="inverse regularisation strength of the regression")
    args = parser.parse_args()
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score
    except ImportError:
        sys.exit("This reference needs scikit-learn, which rnnlm does not depend on: pip install scikit-learn")

    start = time.perf_counter()
    train_texts, train_labels = read(args.train, args.text_field, args.label_field)
    eval_texts, eval_labels = read(args.eval, args.text_field, args.label_field)
    vectorizer = TfidfVectorizer(analyzer=args.analyzer, ngram_range=(args.min_n, args.max_n), min_df=args.min_df,
                                 sublinear_tf=True)
    x_train = vectorizer.fit_transform(train_texts)
    x_eval = vectorizer.transform(eval_texts)
    model = LogisticRegression(C=args.C, max_iter=2000)
    model.fit(x_train, train_labels)
    predicted = model.predict(x_eval)
    print(json.dumps({
        "train": args.train, "eval": args.eval, "train_texts": len(train_texts), "eval_texts": len(eval_texts),
        "features": x_train.shape[1], "analyzer": args.analyzer, "ngram_range": [args.min_n, args.max_n],
        "min_df": args.min_df, "C": args.C,
        "accuracy": round(float(accuracy_score(eval_labels, predicted)), 4),
        "f1_macro": round(float(f1_score(eval_labels, predicted, average="macro")), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
