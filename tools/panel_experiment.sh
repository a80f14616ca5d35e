#!/usr/bin/env bash
# The panel experiment (docs/panels.md): what a panel is worth to SmolLM2-135M, zero-shot and after
# zeroth-order fine-tuning with panels against the same steps on the same targets without them.
# Every step writes one JSON file and is skipped when that file exists: rerun to resume.
#
#   tools/panel_experiment.sh                       # as in docs/panels.md
#   STEPS=30 SEQ=256 LR=6e-3 tools/panel_experiment.sh   # the first fine-tuning setting tried
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/data/panels}
WORK=${WORK:-$HOME/.cache/edgepanel/panels}
N=${N:-100}        # held-out examples for the zero-shot ablation
M=${M:-30}         # held-out examples for the fine-tuning comparison
STEPS=${STEPS:-60}
SEQ=${SEQ:-512}
LR=${LR:-2e-3}
EVAL=data/panels/austen-eval.jsonl.gz
TRAIN=data/panels/austen-train.jsonl.gz
MODEL=${MODEL:-$(python -c "from edgepanel.hub import resolve_model; print(resolve_model(None, progress=False))")}
PASS=${PASS:-$HOME/.cache/edgepanel/quality/pass.ep}   # the source, converted with --passthrough
mkdir -p "$OUT" "$WORK"

step() {  # step OUT.json COMMAND...: run unless OUT.json exists
    local out=$1; shift
    if [ -s "$out" ]; then echo "= $out (done)"; return; fi
    echo "+ $*"; "$@"
}

step "$OUT/zeroshot-k4-n$N.json" edgepanel eval "$MODEL" --data $EVAL --limit "$N" --json "$OUT/zeroshot-k4-n$N.json" -q
step "$OUT/zeroshot-k4-n$M.json" edgepanel eval "$MODEL" --data $EVAL --limit "$M" --conditions full,none \
    --json "$OUT/zeroshot-k4-n$M.json" -q
if [ -f "$PASS" ]; then
    step "$OUT/zeroshot-source-n$M.json" edgepanel eval "$PASS" --data $EVAL --limit "$M" --conditions full,none \
        --json "$OUT/zeroshot-source-n$M.json" -q
fi
for cond in full none; do
    name="tuned-$cond-s$STEPS-lr$LR"
    tuned="$WORK/$name.ep"
    if [ ! -s "$tuned" ]; then
        echo "+ finetune --condition $cond"
        edgepanel finetune "$MODEL" --data $TRAIN --condition "$cond" --steps "$STEPS" --seq-len "$SEQ" \
            --lr "$LR" --eval-every 0 --out "$tuned" -q \
            $( [ -f "$tuned.ckpt" ] && echo --resume "$tuned.ckpt" )
    fi
    step "$OUT/$name.json" edgepanel eval "$tuned" --data $EVAL --limit "$M" --conditions full,none \
        --json "$OUT/$name.json" -q
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print("| model | with panel: loss / acc / entropy | without: loss / acc / entropy |")
print("|---|---|---|")
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    c = json.loads(p.read_text())["conditions"]
    cell = lambda k: f"{c[k]['loss']:.3f} / {c[k]['accuracy']:.3f} / {c[k]['entropy']:.3f}"
    print(f"| {p.stem} | {cell('full')} | {cell('none')} |")
PY
