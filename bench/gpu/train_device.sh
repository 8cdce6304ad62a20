#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root (see prepare_train.sh). Each call copies what
# it carried into /tmp/specdec-gpu; until all three parts of the model are there it says what it
# holds and exits. The call that completes them installs the wheels, reassembles the GGUF file
# and trains the feature drafter.
#   TRAIN_ARGS   flags for specdec train-draft (default: the budget below)
#   DEVICE       cuda (default), or cpu to rehearse the script on a machine without a GPU
# The data mixes train-draft's three kinds of conversation (instruction, grounded: a task on a
# passage the target wrote, follow-up), and the run fine-tunes the shipped drafter (--init: its
# weights and its draft vocabulary), which saw instructions alone (bench/RESULTS.md, "What the
# drafter lacks").
set -euo pipefail
STORE=${STORE:-/tmp/specdec-gpu}
mkdir -p "$STORE"
for f in .gpu/*/* .gpu/*/wheels/*; do [ -f "$f" ] && cp -n "$f" "$STORE/" || true; done
export PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/out}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for part in part-00 part-01 part-02; do
  if [ ! -f "$STORE/$part" ]; then echo "holding: $(ls "$STORE" | tr '\n' ' '); waiting for $part"; exit 0; fi
done
read -r sha name < "$STORE/model.sha256"
if [ ! -f "$STORE/$name" ]; then
  cat "$STORE"/part-0? > "$STORE/$name"
  echo "$sha  $STORE/$name" | sha256sum -c -
fi
SITE=${SITE:-/tmp/site}
if [ ! -d "$SITE" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$STORE"/*.whl
fi
export PYTHONPATH=$SITE:$PWD SPECDEC_CACHE_DIR=/tmp/specdec-cache
WORK=${WORK:-/tmp/drafter}
python3 -m specdec.train_draft --target "$STORE/$name" --out "$WORK" --device "${DEVICE:-cuda}" --no-progress \
  ${TRAIN_ARGS:---init drafters/smollm2-eagle3 --data-minutes 4 --conversations 30000 --batch-conversations 768 --minutes 3 --ttt-steps 4 --batch-tokens 32768 --lr 4e-4} \
  2>&1 | tee "$OUTDIR/train.log" | grep -v "^data:" || true
cp "$WORK/config.json" "$WORK/README.md" "$OUTDIR/"
split -b 12000000 -d "$WORK/model.safetensors" "$OUTDIR/model.safetensors.part-"
gzip -1 -c "$WORK/data.pt" | split -b 15000000 -d - "$OUTDIR/data.pt.gz.part-"
ls -la "$OUTDIR"
