#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, install rnnlm as the README says and print, in under 8 minutes,
#   1. training tokens/s of rnnlm against the hand-written loop (scripts/bench.py train) for the classic 2 x 200
#      WikiText-2 model, a 2 x 650 model and the AWD-LSTM 3-layer model, in fp32 and bf16-mixed, with rnnlm's
#      fused softmax head on and off, and the peak GPU memory of each side;
#   2. the number of cuDNN "weights are not part of single contiguous chunk of memory" warnings with weight drop
#      (scripts/weight_drop_speed.py, and the AWD model trained by rnnlm alone): must be 0;
#   3. evaluation tokens/s and peak GPU memory (scripts/bench.py eval) at eval batch 10 and 80, head on and off;
#   4. the tests that need a GPU: pytest -m cuda.
#
#   bash scripts/gpu_check.sh                     # fresh venv in .venv-gpu, then everything above
#   bash scripts/gpu_check.sh --no-install        # reuse .venv-gpu (or --venv DIR) as it is
#   bash scripts/gpu_check.sh --data DIR          # WikiText-2 folder (train.txt, valid.txt, test.txt)
#   bash scripts/gpu_check.sh --dry-run           # no GPU needed: every step on the CPU, tiny sizes (checks the script)
#
# The install is the README's: `python3 -m venv DIR && DIR/bin/pip install "torch==2.13.0" -e ".[test]"`. On Linux
# x86_64 that pin resolves on PyPI to a CUDA 13.0 build of torch (nvidia-*-cu13 wheels, cuDNN 9), which needs an
# NVIDIA driver of the R580 series or newer; the script stops with that explanation if torch sees no GPU.
# Without --data it looks for shared/data/wikitext-2 here, beside the checkout and in /work/shared; failing that it
# writes a synthetic corpus with a 33,278-word vocabulary (the output layer, where the time goes, has then the
# WikiText-2 size; perplexities are meaningless). Everything is written under $OUT (default gpu_check_out/).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV="$ROOT/.venv-gpu"
INSTALL=1
DRY_RUN=0
DATA=""
OUT="${OUT:-$ROOT/gpu_check_out}"
FUSED_ROWS="${FUSED_ROWS:-2048}"  # rows per block of the fused head when it is "on"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --venv) VENV="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

START=$SECONDS
section() { printf '\n=== %s  [%ds]\n' "$1" $((SECONDS - START)); }
mkdir -p "$OUT"

section "machine"
[[ $DRY_RUN == 1 ]] && echo "DRY RUN: every step on the CPU with tiny sizes; it checks the script, its figures mean nothing"
date -u +"%Y-%m-%d %H:%M UTC"
echo "rnnlm $(git rev-parse --short HEAD 2>/dev/null || echo '(not a git checkout)'), $(nproc) CPU cores"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
elif [[ $DRY_RUN == 0 ]]; then
  echo "nvidia-smi not found: this is not a machine with an NVIDIA GPU (use --dry-run to check the script on a CPU)" >&2
  exit 1
fi

section "install"
if [[ $INSTALL == 1 ]]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "torch==2.13.0" -e ".[test]"
elif [[ ! -x "$VENV/bin/python" ]]; then
  echo "--no-install: no environment at $VENV (give --venv DIR)" >&2
  exit 1
fi
PY="$VENV/bin/python"
export PYTHONPATH="$ROOT" WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
"$PY" - "$DRY_RUN" <<'EOF'
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}, compute capability {torch.cuda.get_device_capability(0)}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
elif sys.argv[1] != "1":
    sys.exit("torch sees no GPU. The PyPI wheel of torch 2.13.0 is built for CUDA 13.0 and needs an NVIDIA driver "
             "R580 or newer; with an older driver install a matching build, e.g. pip install torch==2.13.0 "
             "--index-url https://download.pytorch.org/whl/cu126, then run this script with --no-install.")
EOF

section "data"
if [[ -z "$DATA" ]]; then
  for candidate in "$ROOT/shared/data/wikitext-2" "$ROOT/../shared/data/wikitext-2" /work/shared/data/wikitext-2; do
    if [[ -f "$candidate/train.txt" ]]; then DATA="$candidate"; break; fi
  done
fi
if [[ -z "$DATA" ]]; then
  DATA="$OUT/synthetic-33k"
  "$PY" - "$DATA" "$DRY_RUN" <<'EOF'
import sys
from pathlib import Path

import numpy as np

folder, dry = Path(sys.argv[1]), sys.argv[2] == "1"
folder.mkdir(parents=True, exist_ok=True)
vocab = 2_000 if dry else 33_276  # + <eos> and <unk>: the WikiText-2 size
rng = np.random.default_rng(0)
words = np.array([f"w{i}" for i in range(vocab)])
for split, tokens in (("train", 200_000 if dry else 2_088_628), ("valid", 60_000 if dry else 217_646),
                      ("test", 60_000 if dry else 245_569)):
    ids = np.minimum(rng.zipf(1.1, tokens) - 1, vocab - 1)
    if split == "train":
        ids[:vocab] = np.arange(vocab)  # every word at least once
    lines = [" ".join(words[ids[i : i + 20]]) for i in range(0, tokens, 20)]
    (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
print(f"synthetic corpus with {vocab:,} words in {folder}")
EOF
fi
echo "data: $DATA"
"$PY" scripts/prepare.py --config configs/wikitext2_word_lstm.yaml --data.source "$DATA" 2>&1 | grep -E "train:|total:" || true

section "training: rnnlm against the hand-written loop"
"$PY" - "$DATA" "$DRY_RUN" "$OUT" "$FUSED_ROWS" <<'EOF'
import contextlib
import gc
import io
import json
import sys
import warnings

import torch

sys.path.insert(0, "scripts")
import bench  # noqa: E402

from rnnlm.network.head import auto_block_rows  # noqa: E402

data, dry, out, fused_rows = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
device = "cpu" if dry else "gpu"
common = ["--data.source", data, "--trainer.accelerator", device, "--trainer.devices", "1", "--no-memory",
          "--val_chunks", "0", "--trainer.enable_model_summary", "false"]
common += ["--repeats", "1", "--warmup", "1", "--steps", "2"] if dry else ["--repeats", "2", "--warmup", "5",
                                                                             "--steps", "25"]
tiny = ["--data.batch_size", "2", "--data.bptt", "5"] if dry else []
models = {
    "2x200 (classic)": ["--config", "configs/wikitext2_word_lstm.yaml"],
    "2x650": ["--config", "configs/wikitext2_word_lstm.yaml", "--model.config.embedding_dim", "650",
              "--model.config.hidden_size", "650", "--model.config.dropout_embedding", "0.5",
              "--model.config.dropout_between", "0.5", "--model.config.dropout_output", "0.5"],
    # Fixed-length chunks, so that both sides train on the same chunks.
    "AWD 3-layer": ["--config", "configs/awd_lstm_wikitext2.yaml", "--data.variable_bptt", "false"],
}
if dry:
    models["AWD 3-layer"] += ["--model.config.hidden_sizes", "[16,16,8]", "--model.config.embedding_dim", "8"]
    for name in ("2x200 (classic)", "2x650"):
        models[name] += ["--model.config.hidden_size", "8", "--model.config.embedding_dim", "8"]
rows = []
for name, args in models.items():
    for precision in ("32-true", "bf16-mixed"):
        for head, block in (("fused", fused_rows), ("plain", 0)):
            argv = ["train", *args, *common, *tiny, "--trainer.precision", precision,
                    "--model.config.loss_block_rows", str(block)]
            print(f"\n--- {name}, {precision}, {head} head", flush=True)
            with contextlib.redirect_stderr(io.StringIO()):
                result = bench.main(argv)
            rows.append((name, precision, head, result))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
with open(f"{out}/train.json", "w") as f:
    json.dump([{"model": n, "precision": p, "head": h, **r} for n, p, h, r in rows], f, indent=1)

print("\ntraining tokens/s (wall clock, medians of the blocks); peak GPU memory allocated (MiB)")
print(f"{'model':<17} {'precision':<11} {'head':<6} {'rnnlm':>9} {'hand':>9} {'ratio':>6} {'pairs':<14} "
      f"{'mem rnnlm':>9} {'mem hand':>9}")
for name, precision, head, r in rows:
    wall, mem = r["wall"], r.get("gpu_peak_mib", {})
    print(f"{name:<17} {precision:<11} {head:<6} {wall['rnnlm_tokens_per_s']:>9,.0f} {wall['hand_tokens_per_s']:>9,.0f} "
          f"{wall['ratio_median_of_pairs']:>6.3f} {' '.join(f'{x:.2f}' for x in wall['ratios']):<14} "
          f"{mem.get('rnnlm', float('nan')):>9,.0f} {mem.get('hand', float('nan')):>9,.0f}")
for name, _, _, r in rows[::4]:
    positions = r["batch_size"] * r["bptt"]
    rows_auto = auto_block_rows(r["vocab_size"], positions, torch.device("cuda"))
    print(f"default (loss_block_rows null) for {name}: {positions} positions x {r['vocab_size']:,} classes on a GPU -> "
          + (f"fused, {rows_auto} rows per block" if rows_auto else "plain head"))

print("\n--- weight drop: rnnlm's AWD model alone, cuDNN repacking warnings", flush=True)
awd = ["train", *models["AWD 3-layer"], *common, *tiny, "--side", "rnnlm"]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with contextlib.redirect_stderr(io.StringIO()):
        bench.main(awd)
repack = sum("contiguous chunk of memory" in str(w.message) for w in caught)
print(f"rnnlm, AWD 3-layer with weight drop 0.5: {repack} 'not part of single contiguous chunk' warnings (must be 0)")
with open(f"{out}/repack_warnings.txt", "w") as f:
    f.write(f"{repack}\n")
EOF

section "weight drop: scripts/weight_drop_speed.py"
WD_ARGS=(--hidden 1150 --layers 3 --vocab 33278 --batch 80 --bptt 70 --steps 10 --warmup 3 --repeats 1)
[[ $DRY_RUN == 1 ]] && WD_ARGS=(--hidden 16 --layers 3 --vocab 500 --batch 4 --bptt 10 --steps 2 --warmup 1 --repeats 1)
"$PY" scripts/weight_drop_speed.py "${WD_ARGS[@]}" | tee "$OUT/weight_drop.jsonl"
"$PY" - "$OUT/weight_drop.jsonl" <<'EOF'
import json
import sys

warned = {r["variant"]: r["repack_warnings"] for r in map(json.loads, open(sys.argv[1]))}
print("cuDNN repacking warnings per variant:", warned, "->", "OK (0)" if not any(warned.values()) else "NOT 0")
EOF

section "evaluation: rnnlm against the hand-written loop"
"$PY" - "$DATA" "$DRY_RUN" "$OUT" "$FUSED_ROWS" <<'EOF'
import contextlib
import io
import json
import sys

sys.path.insert(0, "scripts")
import bench  # noqa: E402

data, dry, out, fused_rows = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
common = ["--config", "configs/wikitext2_word_lstm.yaml", "--data.source", data, "--no-memory",
          "--trainer.accelerator", "cpu" if dry else "gpu", "--trainer.devices", "1",
          "--trainer.enable_model_summary", "false"]
common += ["--repeats", "1", "--warmup", "1", "--steps", "2", "--model.config.hidden_size", "8",
           "--model.config.embedding_dim", "8"] if dry else ["--repeats", "2", "--warmup", "3", "--steps", "30"]
rows = []
for batch in (10, 80):
    for head, block in (("fused", fused_rows), ("plain", 0)):
        print(f"\n--- eval batch {batch}, {head} head", flush=True)
        with contextlib.redirect_stderr(io.StringIO()):
            r = bench.main(["eval", *common, "--eval_batch_size", str(batch), "--model.config.loss_block_rows",
                            str(block)])
        rows.append((batch, head, r))
with open(f"{out}/eval.json", "w") as f:
    json.dump([{"eval_batch": b, "head": h, **r} for b, h, r in rows], f, indent=1)
print("\nevaluation tokens/s (wall clock), 2 x 200 WikiText-2 model; peak GPU memory allocated (MiB)")
for batch, head, r in rows:
    mem = r.get("gpu_peak_mib", {})
    print(f"eval batch {batch:>3}, {head:<5} head: rnnlm {r['wall']['rnnlm_tokens_per_s']:>10,.0f}  hand "
          f"{r['wall']['hand_tokens_per_s']:>10,.0f}  ratio {r['wall']['ratio_median_of_pairs']:.3f}  memory rnnlm "
          f"{mem.get('rnnlm', float('nan')):,.0f}  hand {mem.get('hand', float('nan')):,.0f}")
EOF

section "tests that need a GPU: pytest -m cuda"
if [[ $DRY_RUN == 1 ]]; then
  "$PY" -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tail -3 || true
else
  "$PY" -m pytest -q -m cuda -p no:cacheprovider
fi

section "done in $((SECONDS - START)) s; results under $OUT"
