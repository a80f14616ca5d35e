#!/usr/bin/env bash
# The preference experiments (docs/preferences.md) on SmolLM2-135M binarized (the default model):
#   1. ZO-DPO on the shipped (mismatch) pairs: held-out rewards/accuracies before and after
#   2. best-of-n on held-out panels: the book's paragraph among n-1 the model wrote, picked by the
#      implicit reward vs by the length-normalized likelihood
#   3. two rounds of the data-model loop: held-out target loss with the panel, per round; and the
#      control run (the same fine-tuning on the data as given: what the rewrites add)
#   4. C-RLFT (book = 1, model = 0.1): held-out book paragraphs under each condition
# Every step writes one file and is skipped when that file exists: rerun to resume (the training
# steps resume from their checkpoints, the refine loop from its partial files).
#
#   tools/prefs_experiment.sh                                     # the full run
#   DPO_LR=2e-3 tools/prefs_experiment.sh                         # another DPO learning rate (its own files)
#   DPO_ARGS="--granularity tensor --noise rademacher --n-perturb 1 --optimizer sgd" DPO_TAG=tensor DPO_LR=2e-3 \
#       tools/prefs_experiment.sh                                  # the first measurement's recipe
#   N=8 TRAIN_N=16 STEPS=4 DPO_STEPS=2 PANELS_N=4 REFINE_N=4 CRLFT_N=4 SEQ=192 OUT=/tmp/p WORK=/tmp/p tools/prefs_experiment.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/data/prefs}
WORK=${WORK:-$HOME/.cache/edgepanel/prefs}
N=${N:-100}                 # held-out pairs
TRAIN_N=${TRAIN_N:-400}     # training pairs (evenly spaced over the shipped 3000)
STEPS=${STEPS:-200}         # ZO steps of each training run
REFINE_STEPS=${REFINE_STEPS:-$STEPS}   # the loop's fine-tuning steps per round
CRLFT_STEPS=${CRLFT_STEPS:-$STEPS}
SEQ=${SEQ:-384}             # tokens per sequence
BETA=${BETA:-0.1}
LR=${LR:-6e-3}               # C-RLFT's (finetune's default)
REFINE_LR=${REFINE_LR:-2e-3} # the loop's: 6e-3 made a 40-step round's held-out change a coin toss (docs/preferences.md)
DPO_STEPS=${DPO_STEPS:-20}  # ZO-DPO steps (each: 32 Hadamard directions, 64 forward passes of 4 pairs)
DPO_LR=${DPO_LR:-1e-3}      # finetune's dpo recipe: kind, hadamard, 32 perturbations, Adam, eps 0.05
DPO_ARGS=${DPO_ARGS:-}      # more finetune options for the DPO run (e.g. --granularity tensor)
DPO_TAG=${DPO_TAG:-lr$DPO_LR}   # names the DPO run's files
EVAL_EVERY=${EVAL_EVERY:-50}
DPO_EVAL_EVERY=${DPO_EVAL_EVERY:-10}
BEST_N=${BEST_N:-4}         # candidates per panel: the book's paragraph and BEST_N-1 model-written
PANELS_N=${PANELS_N:-50}    # held-out panels for best-of-n
REFINE_N=${REFINE_N:-200}   # training panels the loop rewrites
ROUNDS=${ROUNDS:-2}
CRLFT_N=${CRLFT_N:-200}     # training panels whose paragraph the model rewrites for C-RLFT
THREADS=${THREADS:-}        # empty: all cores
T=${THREADS:+-t $THREADS}
MODEL=${MODEL:-$(python -c "from edgepanel.hub import resolve_model; print(resolve_model(None, progress=False))")}
PAIRS_TRAIN=data/panels/austen-pairs-train.jsonl.gz
PAIRS_EVAL=data/panels/austen-pairs-eval.jsonl.gz
PANELS_TRAIN=data/panels/austen-train.jsonl.gz
PANELS_EVAL=data/panels/austen-eval.jsonl.gz
mkdir -p "$OUT" "$WORK"
grep -m1 'model name' /proc/cpuinfo | tee "$OUT/cpu.txt"

step() {  # step OUT COMMAND...: run unless OUT exists
    local out=$1; shift
    if [ -s "$out" ]; then echo "= $out (done)"; return; fi
    echo "+ $*"; "$@"
}
spaced() {  # spaced FILE K OUT: K lines evenly spaced over the JSON Lines FILE
    python - "$@" <<'EOF'
import gzip, sys
src, k, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = [l for l in (gzip.open(src, "rt") if src.endswith(".gz") else open(src)).read().splitlines() if l.strip()]
pick = [lines[round(i * (len(lines) - 1) / max(1, k - 1))] for i in range(min(k, len(lines)))] if k > 1 else lines[:1]
open(out + ".tmp", "w").write("\n".join(pick) + "\n")
EOF
    mv "$3.tmp" "$3"
}

TRAIN="$WORK/pairs-train-$TRAIN_N.jsonl"; EVAL="$WORK/pairs-eval-$N.jsonl"
HELD="$WORK/panels-eval-$N.jsonl"; RTRAIN="$WORK/panels-train-$REFINE_N.jsonl"; CTRAIN="$WORK/panels-train-$CRLFT_N.jsonl"
[ -s "$TRAIN" ] || spaced $PAIRS_TRAIN "$TRAIN_N" "$TRAIN"
[ -s "$EVAL" ] || spaced $PAIRS_EVAL "$N" "$EVAL"
[ -s "$HELD" ] || spaced $PANELS_EVAL "$N" "$HELD"
[ -s "$RTRAIN" ] || spaced $PANELS_TRAIN "$REFINE_N" "$RTRAIN"
[ -s "$CTRAIN" ] || spaced $PANELS_TRAIN "$CRLFT_N" "$CTRAIN"

# 1. ZO-DPO
DPO="$WORK/dpo-$TRAIN_N-s$DPO_STEPS-$DPO_TAG.ep"
step "$OUT/pairs-base.json" python tools/prefs_eval.py pairs "$MODEL" "$EVAL" "$OUT/pairs-base.json" --seq-len "$SEQ" $T
if [ ! -s "$DPO" ]; then
    echo "+ finetune --objective dpo"
    edgepanel finetune "$MODEL" --objective dpo --data "$TRAIN" --eval "$EVAL" --steps "$DPO_STEPS" --seq-len "$SEQ" \
        --beta "$BETA" --lr "$DPO_LR" --eval-every "$DPO_EVAL_EVERY" --eval-batches 4 --out "$DPO" $T $DPO_ARGS \
        $( [ -f "$DPO.ckpt" ] && echo --resume "$DPO.ckpt" ) 2>&1 | tee "$OUT/dpo-$DPO_TAG.log"
fi
step "$OUT/pairs-dpo-$DPO_TAG.json" python tools/prefs_eval.py pairs "$DPO" "$EVAL" "$OUT/pairs-dpo-$DPO_TAG.json" \
    --seq-len "$SEQ" $T

# 2. best-of-n: the implicit reward against the length-normalized likelihood
step "$OUT/best-of-$DPO_TAG.json" python tools/prefs_eval.py best-of "$MODEL" "$DPO" "$HELD" "$OUT/best-of-$DPO_TAG.json" \
    --n "$BEST_N" --limit "$PANELS_N" --seq-len "$SEQ" $T

# 3. the data-model loop, and its control: the same rounds, seeds and steps on the data as given
#    (what the rewrites add)
loop() {  # loop OUTNAME WORKNAME [OPTIONS...]: one refine run unless $OUT/OUTNAME.json exists
    local name=$1 work="$WORK/$2-$REFINE_N-lr$REFINE_LR.jsonl.gz"; shift 2
    if [ -s "$OUT/$name.json" ]; then echo "= $OUT/$name.json (done)"; return; fi
    echo "+ data refine $*"
    edgepanel data refine "$MODEL" --data "$RTRAIN" --eval "$HELD" --rounds "$ROUNDS" --steps "$REFINE_STEPS" \
        --seq-len "$SEQ" --lr "$REFINE_LR" --eval-every 0 --out "$work" $T "$@" | tee "$OUT/$name.md"
    cp "$work.rounds/summary.json" "$OUT/$name.json"
}
loop "refine-lr$REFINE_LR" refined
loop "refine-lr$REFINE_LR-control" control --no-rewrite

# 4. C-RLFT
CDATA="$WORK/crlft-train-$CRLFT_N.jsonl.gz"; CRLFT="$WORK/crlft-$CRLFT_N-s$CRLFT_STEPS.ep"
step "$CDATA" edgepanel data pairs "$CTRAIN" --model "$MODEL" --crlft --seed 0 -n 200 --out "$CDATA" $T
if [ ! -s "$CRLFT" ]; then
    echo "+ finetune --objective crlft"
    edgepanel finetune "$MODEL" --objective crlft --data "$CDATA" --steps "$CRLFT_STEPS" --seq-len "$SEQ" --lr "$LR" \
        --eval-every 0 --out "$CRLFT" $T $( [ -f "$CRLFT.ckpt" ] && echo --resume "$CRLFT.ckpt" ) 2>&1 | tee "$OUT/crlft.log"
fi
step "$OUT/crlft.json" python tools/prefs_eval.py crlft "$MODEL" "$CRLFT" "$HELD" "$OUT/crlft.json" --seq-len "$SEQ" $T

python - "$OUT" "$DPO_TAG" "$REFINE_LR" <<'EOF'
import json, sys
from pathlib import Path
out, lr, refine_lr = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
load = lambda f: json.loads((out / f).read_text()) if (out / f).exists() else None
b, d = load("pairs-base.json"), load(f"pairs-dpo-{lr}.json")
if b and d:
    print("| held-out pairs | rewards/accuracies | rewards/margins | rewards/chosen | rewards/rejected |")
    print("|---|---|---|---|---|")
    for name, r in (("before (the model is its reference)", b), (f"after ZO-DPO ({lr})", d)):
        print(f"| {name} | {r['rewards/accuracies']:.3f} | {r['rewards/margins']:+.4f} | {r['rewards/chosen']:+.4f} "
              f"| {r['rewards/rejected']:+.4f} |")
    print(f"\n{d['pairs']} pairs; the model alone prefers the chosen paragraph: {b['model_prefers_chosen']:.3f} (sum), "
          f"{b['model_prefers_chosen_per_token']:.3f} (per token) before, {d['model_prefers_chosen']:.3f} / "
          f"{d['model_prefers_chosen_per_token']:.3f} after\n")
bo = load(f"best-of-{lr}.json")
if bo:
    print(f"best-of-{bo['candidates']} over {bo['panels']} held-out panels, the book's paragraph picked by:")
    for k, v in bo["book_picked"].items():
        print(f"- {k}: {v:.3f}")
    print()
rf, ctl = load(f"refine-lr{refine_lr}.json"), load(f"refine-lr{refine_lr}-control.json")
if rf:
    print("| round | rewrites kept | mean I (%) | held-out loss before | after | control (no rewrites): after |")
    print("|---|---|---|---|---|---|")
    after = {r["round"]: r["held_out_after"] for r in (ctl or {}).get("rounds", [])}
    for r in rf["rounds"]:
        c = f"{after[r['round']]:.4f}" if r["round"] in after else ""
        print(f"| {r['round']} | {r['rewrites_kept']} / {r['examples']} | {r['mean_I']:.2f} | {r['held_out_before']:.4f} "
              f"| {r['held_out_after']:.4f} | {c} |")
    print()
c = load("crlft.json")
if c:
    print("| model | loss under book | loss under model |\n|---|---|---|")
    for k in ("base", "tuned"):
        print(f"| {k} | {c[k]['book']:.4f} | {c[k]['model']:.4f} |")
EOF
