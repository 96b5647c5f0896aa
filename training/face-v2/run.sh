#!/bin/bash
# The v2 run of the embedded model (core/demo/TRAINING.md). The same command starts, resumes, and resumes on a
# new machine: it first restores the state carried in this folder (training/face-v2/ in the repository) into
# the work folder, where the work folder lacks it. Every stage skips or resumes from its own checkpoint.
#   nohup setsid training/face-v2/run.sh > /dev/null 2>&1 < /dev/null &
# (it makes the work folder and appends its own output to OUT/log.txt, after restoring a carried log.txt)
# Before a session ends mid-run, carry the state back here and commit it:
#   .venv/bin/python -m core.demo.train --out ~/.cache/latent-edit-train/face-v2 --stages '' --carry-to training/face-v2
set -e
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
export OMP_NUM_THREADS=1 PYTHONPATH="$REPO"
OUT=${OUT:-$HOME/.cache/latent-edit-train/face-v2}
mkdir -p "$OUT"
# two single-thread workers for both generator phases: each step averages two batches of 16; phase 1 takes
# 20 000 steps (a 10 000-step schedule was at 23.6 dB by step 8 360 and near its end: updates matter more than
# images here), the finetune 15 000
FLAGS="--out $OUT --renderer v2 --channels 4:128,8:128,16:128,32:64,64:32 --steps 20000 --finetune-minutes 0 --finetune-steps 15000 --resume"
nice -n 19 .venv/bin/python -m core.demo.train $FLAGS --stages '' --carry-from "$REPO/training/face-v2"
exec >> "$OUT/log.txt" 2>&1
echo "== run.sh $(date -u '+%F %H:%M') UTC"
nice -n 19 .venv/bin/python -m core.demo.train $FLAGS --threads 2 --stages cache,scorer
nice -n 19 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m core.demo.train $FLAGS --threads 1 --stages generator,finetune
nice -n 19 .venv/bin/python -m core.demo.train $FLAGS --threads 2 --stages directions
echo "v2 run finished: install it as core/demo/TRAINING.md says"
