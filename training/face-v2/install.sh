#!/bin/bash
# Install the finished v2 run as the embedded default and refit what belongs to the generator
# (core/demo/TRAINING.md, "Installing it"). It starts as soon as the finetune has finished: the directions run
# here, beside the encoder (which needs only the generator), so run.sh's own directions stage is not needed.
# Resumable: each step leaves a marker in $OUT/install/ and is skipped when it is there; the encoder and
# segmenter trainers resume from their own checkpoints.
#   mkdir -p ~/.cache/latent-edit-train/face-v2 && nohup setsid training/face-v2/install.sh >> ~/.cache/latent-edit-train/face-v2/install.txt 2>&1 < /dev/null &
# It writes core/demo/weights/ (core.demo draws with the run's renderer): review and commit the result, then
# re-measure (TRAINING.md step 4). FORCE=1 installs a run below the issue's 30 dB target. For the polish
# (polish.sh): OUT=~/.cache/latent-edit-train/face-v2-polish training/face-v2/install.sh; ENCODER_INIT=FILE
# ENCODER_MINUTES=M warm-start the encoder from FILE (train_encoder --init) for M minutes instead of 90 from scratch
set -e
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
export OMP_NUM_THREADS=1 PYTHONPATH="$REPO"
OUT=${OUT:-$HOME/.cache/latent-edit-train/face-v2}
CACHE=$(dirname "$OUT")
PY="nice -n 10 .venv/bin/python"
FLAGS="--out $OUT --renderer v2 --channels 4:128,8:128,16:128,32:64,64:32"
mkdir -p "$OUT/install"
step_done() { [ -e "$OUT/install/$1" ]; }
mark() { touch "$OUT/install/$1"; echo "== $1 done $(date -u +%H:%M)"; }

.venv/bin/python -c "import json, sys; sys.exit(not {'ckpt_finetune.pt', 'ckpt_polish.pt'} & set(json.load(open('$OUT/generator_eval.json'))['phases']))" \
  || { echo "the finetune has not finished: $OUT/generator_eval.json lists no ckpt_finetune.pt (training/face-v2/run.sh)"; exit 2; }
PSNR=$(.venv/bin/python -c "import json; print(json.load(open('$OUT/generator_eval.json'))['test_psnr_db'])")
echo "held-out PSNR $PSNR dB (issue 16 asks >= 30)"
if ! .venv/bin/python -c "import sys; sys.exit(0 if $PSNR >= 30 else 1)" && [ -z "$FORCE" ]; then
  echo "below the target: resume the finetune with a larger --finetune-steps (run.sh), or FORCE=1"; exit 3
fi

# 1. two lanes on the two cores: the encoder of the run's generator (90 min) | the directions (~35 min on one
# thread), then generator, scorer and directions into core/demo/weights/, the segmenter, the sparse directions and
# MAGEC's LinkNet (~45 min); every step ends its lane on failure, and the script fails when either lane did
(
  step_done encoder || { $PY -m core.demo.train_encoder --out "$CACHE/encoder-v2" --model "$OUT/face64.pt" --resume \
    --minutes "${ENCODER_MINUTES:-90}" ${ENCODER_INIT:+--init "$ENCODER_INIT"} --install && mark encoder; } || exit 1
) &
ENC=$!
(
  step_done directions || { [ -e "$OUT/directions_eval.json" ] && mark directions; } \
    || { $PY -m core.demo.train $FLAGS --resume --threads 1 --stages directions > "$OUT/directions.txt" 2>&1 \
         && mark directions; } || exit 1
  step_done weights || { $PY -m core.demo.train $FLAGS --stages '' --install && mark weights; } || exit 1
  if ! step_done segmenter; then
    [ -e "$OUT/install/segmenter-started" ] || { rm -rf "$CACHE/segmenter-v2"; touch "$OUT/install/segmenter-started"; }
    $PY -m core.demo.train_segmenter --out "$CACHE/segmenter-v2" --renderer v2 --minutes 22 --install && mark segmenter || exit 1
  fi
  step_done sparse || { $PY -m core.edits fit-sparse core/demo/weights/face64.pt --report "$OUT/fit_sparse.json" && mark sparse; } || exit 1
  step_done linknet || { $PY -m core.magec core/demo/weights/face64.pt && mark linknet; } || exit 1
) &
LANE=$!
rc=0
wait $ENC || rc=1
wait $LANE || rc=1
[ $rc = 0 ] || { echo "a refit failed (see above); rerun install.sh: finished steps are skipped"; exit 1; }
# 2. the learned content extractor trains on the new encoder's codes (~5 min)
step_done content || { $PY -m core.demo.train_content --steps 800 --install && mark content; }
echo "v2 installed: run the tests, re-measure (TRAINING.md step 4) and commit"
