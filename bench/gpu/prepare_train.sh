#!/usr/bin/env bash
# Prepare, on this machine, the GPU run of `specdec train-draft` (and the CUDA checks): the GPU
# machine has PyTorch with CUDA but no network and an older transformers, and one call may carry
# at most 64 MiB, so the SmolLM2 GGUF file (98 MB) travels in two parts over two calls made back
# to back (the machine stays warm between them), the wheels with the second.
#
#   bash bench/gpu/prepare_train.sh      # writes .gpu/a and .gpu/b (ignored by git)
# then, with the device tool, one call per folder, in order, each running
#   bash bench/gpu/train_device.sh       carry: [".gpu/a"], then [".gpu/b"]
# The first runs bench/gpu/cuda_checks.py (random SmolLM2-shaped model); the second reassembles
# the model, trains the drafter and leaves it (its weights in two parts) and its data under $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/wheels
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/b/wheels gguf==0.19.0 transformers==5.24.0
gguf=$("$PY" -c 'from specdec.models import resolve; s = resolve("smollm2"); print(s.location + "/" + s.gguf_file)')
split -b 50000000 -d "$gguf" .gpu/part-
mv .gpu/part-00 .gpu/a/ && mv .gpu/part-01 .gpu/b/
sha=$(sha256sum "$gguf" | cut -d' ' -f1)
for c in a b; do echo "$sha $(basename "$gguf")" > .gpu/$c/model.sha256; done
du -sh .gpu/a .gpu/b
