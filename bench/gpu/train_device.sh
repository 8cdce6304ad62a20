#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root (see prepare_train.sh). Each call stages what
# it carried (stage.sh: until all three parts of the model are there it says what it holds and
# exits); the call that completes them trains the feature drafter.
#   TRAIN_ARGS   flags for specdec train-draft (default: the budget below)
#   DEVICE       cuda (default), or cpu to rehearse the script on a machine without a GPU
# The data mixes train-draft's four kinds of conversation (instruction, grounded: a task on a
# passage the target wrote, follow-up, translation: that passage translated into another language
# and back into English), and the run fine-tunes the shipped drafter (--init: its weights and its
# draft vocabulary; bench/RESULTS.md, "What bounds the drafter on Spec-Bench").
set -euo pipefail
source "$(dirname "$0")/stage.sh"
OUTDIR=${OUT:-/tmp/out}
mkdir -p "$OUTDIR"
WORK=${WORK:-/tmp/drafter}
python3 -m specdec.train_draft --target "$MODEL" --out "$WORK" --device "${DEVICE:-cuda}" --no-progress \
  ${TRAIN_ARGS:---init drafters/smollm2-eagle3 --data-minutes 4 --conversations 30000 --batch-conversations 768 --minutes 3 --ttt-steps 4 --batch-tokens 32768 --lr 4e-4} \
  2>&1 | tee "$OUTDIR/train.log" | grep -v "^data:" || true
cp "$WORK/config.json" "$WORK/README.md" "$OUTDIR/"
split -b 12000000 -d "$WORK/model.safetensors" "$OUTDIR/model.safetensors.part-"
gzip -1 -c "$WORK/data.pt" | split -b 15000000 -d - "$OUTDIR/data.pt.gz.part-"
ls -la "$OUTDIR"
