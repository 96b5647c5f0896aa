#!/bin/bash
# Phase 3 of the v2 run (core/demo/TRAINING.md, "Polish"): from the shipped face64.pt, the finetune's losses plus
# squared error on faces rendered afresh every step, on two single-thread workers. Starts, resumes, and resumes on
# a new machine (restoring the state carried in training/face-v2-polish/ first), like run.sh:
#   nohup setsid training/face-v2/polish.sh > /dev/null 2>&1 < /dev/null &
# Carry before a session ends mid-run:
#   .venv/bin/python -m core.demo.train --out ~/.cache/latent-edit-train/face-v2-polish --stages '' --carry-to training/face-v2-polish
set -e
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
export OMP_NUM_THREADS=1 PYTHONPATH="$REPO"
OUT=${OUT:-$HOME/.cache/latent-edit-train/face-v2-polish}
STEPS=${STEPS:-10000}
mkdir -p "$OUT"
FLAGS="--out $OUT --renderer v2 --channels 4:128,8:128,16:128,32:64,64:32 --polish-steps $STEPS --resume"
[ -d training/face-v2-polish ] && .venv/bin/python -m core.demo.train $FLAGS --stages '' --carry-from "$REPO/training/face-v2-polish"
[ -e "$OUT/scorer.pt" ] || cp core/demo/weights/scorer.pt "$OUT/scorer.pt"   # the v2 run's scorer, as shipped
[ -e "$OUT/start.pt" ] || cp core/demo/weights/face64.pt "$OUT/start.pt"      # the shipped weights it starts from
[ -e "$OUT/scorer_eval.json" ] || cp core/demo/weights/scorer.eval.json "$OUT/scorer_eval.json"
# the earlier phases' logs, so the polished face64.pt's meta (train_steps, phases) and an install keep them
[ -e "$OUT/train_log_finetune.json" ] || .venv/bin/python -c "
import json, sys
logs = json.load(open('core/demo/weights/face64.train_log.json'))
for stage in ('generator', 'finetune'):
    json.dump(logs[stage], open(sys.argv[1] + '/train_log_' + stage + '.json', 'w'))" "$OUT"
exec >> "$OUT/log.txt" 2>&1
echo "== polish.sh $(date -u '+%F %H:%M') UTC"
nice -n 19 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m core.demo.train $FLAGS --threads 1 \
  --stages polish --polish-from "$OUT/start.pt"
echo "polish finished: generator_eval.json holds the held-out PSNR (first 256 of the 2 000 held-out faces); install as core/demo/TRAINING.md says"
