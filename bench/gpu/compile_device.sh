#!/usr/bin/env bash
# The compiled target step on a GPU (issue 12), on the GPU machine from the repository root,
# staged like run_device.sh (three calls carrying .gpu/c1, c2, c3; see prepare.sh):
#
#   bash bench/gpu/compile_device.sh          carry [".gpu/c1"], then [".gpu/c2"], then [".gpu/c3"]
#
# `specdec bench` on CUDA, eager (--compile off) and compiled with CUDA graphs (--compile on):
# target-only and the n-gram drafter at k = 4 on one prompt per Spec-Bench category (64 new
# tokens, with HF generate() and prompt lookup beside them in the eager run), then concurrency
# sweeps at 1 and 16 sessions, speculating (k = 4) and target-only. Start-up, including the
# compile and the CUDA graph captures, is in each run's log. Planned to fit ten minutes; not yet
# run (no device time was left when it was written).
set -euo pipefail
source "$(dirname "$0")/stage.sh"
OUTDIR=${OUT:-bench/out}/compile
COMMON=(--target "$MODEL" --device cuda --prompts "$PROMPTS" --limit 1 --no-progress --no-overhead
        --drafters ngram --no-adaptive --concurrency 1,16 --sweep-tokens 32)
for mode in off on; do
  peers=(); [ "$mode" = on ] && peers=(--no-peers)
  started=$(date +%s)
  python3 -m specdec.cli bench "${COMMON[@]}" --compile "$mode" --max-new-tokens 64 --ks 4 "${peers[@]}" \
    --out "$OUTDIR/$mode" 2>&1 | tail -40
  python3 -m specdec.cli bench "${COMMON[@]}" --compile "$mode" --sweep-only --ks 0 \
    --out "$OUTDIR/$mode-k0-sweep" 2>&1 | tail -12
  echo "compile $mode: $(( $(date +%s) - started )) s in all"
done
