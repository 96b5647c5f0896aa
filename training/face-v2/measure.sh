#!/bin/bash
# Re-measure the installed embedded model (TRAINING.md step 4): every bench whose numbers the README, the issue
# notes and the acceptance lists quote, full settings, one after another, JSON into $OUT/bench/ (a bench whose
# JSON exists is skipped, so the same command resumes). Run on an otherwise idle machine: times are reported.
#   mkdir -p ~/.cache/latent-edit-train/face-v2 && nohup setsid training/face-v2/measure.sh >> ~/.cache/latent-edit-train/face-v2/measure.txt 2>&1 < /dev/null &
set -e
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO"
OUT=${OUT:-$HOME/.cache/latent-edit-train/face-v2}/bench
mkdir -p "$OUT"
for bench in demo edits expanded magec chunks speed editability; do  # editability last: hours at full settings
  [ -e "$OUT/$bench.json" ] && continue
  echo "== bench/$bench.py $(date -u +%H:%M)"
  .venv/bin/python "bench/$bench.py" --json "$OUT/$bench.json.part" > "$OUT/$bench.txt" 2>&1
  mv "$OUT/$bench.json.part" "$OUT/$bench.json"
done
echo "== all measured $(date -u +%H:%M): tables in $OUT/*.txt"
