#!/usr/bin/env bash
# Prepare, on this machine, the GPU run of `specdec train-draft`: the GPU machine has PyTorch
# with CUDA but no network and an older transformers, and one call may carry at most 64 MiB
# *including the working tree* (about 24 MB, most of it the shipped drafter), so the SmolLM2 GGUF
# file (98 MB) and the wheels travel in three parts over three calls made back to back (the
# machine stays warm for 30 s after each), the wheels with the last.
#
#   bash bench/gpu/prepare_train.sh      # writes .gpu/t1 .gpu/t2 .gpu/t3 (ignored by git)
# then, with the device tool, one call per folder, in order, each running
#   bash bench/gpu/train_device.sh       carry: [".gpu/t1"], then [".gpu/t2"], then [".gpu/t3"]
# The first two only stage their part; the third reassembles the model, trains the drafter and
# leaves it (its weights in two parts), its data (gzipped, in parts) and the log under $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/t1 .gpu/t2 .gpu/t3/wheels
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/t3/wheels gguf==0.19.0 transformers==5.24.0
gguf=$("$PY" -c 'from specdec.models import resolve; s = resolve("smollm2"); print(s.location + "/" + s.gguf_file)')
split -b 38000000 -d "$gguf" .gpu/part-   # 38 + 38 + 22 MB: the wheels go with the smallest
mv .gpu/part-00 .gpu/t1/ && mv .gpu/part-01 .gpu/t2/ && mv .gpu/part-02 .gpu/t3/
sha=$(sha256sum "$gguf" | cut -d' ' -f1)
for c in t1 t2 t3; do echo "$sha $(basename "$gguf")" > .gpu/$c/model.sha256; done
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for c in t1 t2 t3; do
  size=$(du -sb .gpu/$c | cut -f1)
  echo "$c: $((size / 1000000)) MB carried + $((tree / 1000000)) MB working tree (limit 67 MB)"
  [ $((size + tree)) -lt 67000000 ] || { echo "$c is over the device tool's 64 MiB" >&2; exit 1; }
done
