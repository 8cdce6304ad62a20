#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root (see prepare_train.sh). Each call copies what
# it carried into /tmp/specdec-gpu. The first call (part a) runs the CUDA checks; the second (part
# b) installs the wheels, reassembles the GGUF file and trains the feature drafter.
#   TRAIN_ARGS   extra flags for specdec train-draft (default: the budget below)
# The data mixes train-draft's three kinds of conversation (instruction, grounded: a task on a
# passage the target wrote, follow-up), its defaults since the shipped drafter was trained on
# instructions alone (bench/RESULTS.md, "What the drafter lacks").
set -euo pipefail
STORE=/tmp/specdec-gpu
mkdir -p "$STORE"
for f in .gpu/*/* .gpu/*/wheels/*; do [ -f "$f" ] && cp -n "$f" "$STORE/" || true; done
export PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/out}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ ! -f "$STORE/part-01" ]; then
  PYTHONPATH=$PWD python3 bench/gpu/cuda_checks.py --out "$OUTDIR/cuda_checks.json"
  echo "holding: $(ls "$STORE" | tr '\n' ' '); waiting for part-01"
  exit 0
fi
read -r sha name < "$STORE/model.sha256"
if [ ! -f "$STORE/$name" ]; then
  cat "$STORE"/part-0? > "$STORE/$name"
  echo "$sha  $STORE/$name" | sha256sum -c -
fi
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$STORE"/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD SPECDEC_CACHE_DIR=/tmp/specdec-cache
WORK=/tmp/drafter
python3 -m specdec.train_draft --target "$STORE/$name" --out "$WORK" --device cuda --no-progress \
  ${TRAIN_ARGS:---data-minutes 3 --conversations 25000 --batch-conversations 768 --minutes 3.5 --ttt-steps 4 --batch-tokens 32768} \
  2>&1 | tee "$OUTDIR/train.log" | grep -v "^data:" || true
cp "$WORK/config.json" "$WORK/README.md" "$OUTDIR/"
split -b 12000000 -d "$WORK/model.safetensors" "$OUTDIR/model.safetensors.part-"
split -b 15000000 -d "$WORK/data.pt" "$OUTDIR/data.pt.part-"
ls -la "$OUTDIR"
