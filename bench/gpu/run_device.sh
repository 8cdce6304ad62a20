#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root (see prepare.sh): stages what the calls
# carried (stage.sh), then runs the same harness as `make bench`, on CUDA.
set -euo pipefail
source "$(dirname "$0")/stage.sh"
OUTDIR=${OUT:-bench/out}/bench
python3 -m specdec.cli bench --target "$MODEL" --device cuda --prompts "$PROMPTS" \
  --limit 1 --max-new-tokens 128 --ks 2,4,8 --no-progress --out "$OUTDIR" ${BENCH_ARGS:-}
