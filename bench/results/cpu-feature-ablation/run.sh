#!/bin/bash
# Fused (layers 2,15,27) vs last layer alone (30): the same self-written data, the same budget, on this CPU.
cd "$(dirname "$0")/../../.."
S=.venv/bin/specdec
mkdir -p "${ABLATION_DIR:-/tmp/ablation}"
COMMON="--device cpu --minutes 8 --ttt-steps 3 --batch-tokens 2048 --max-length 512 --seed 0 --no-progress"
echo "start $(date)"
$S train-draft --out "${ABLATION_DIR:-/tmp/ablation}"/fused --conversations 512 --data-minutes 6 --batch-conversations 64 --answer-tokens 192 $COMMON > "${ABLATION_DIR:-/tmp/ablation}"/fused.log 2>&1
echo "fused $(date)"
$S train-draft --out "${ABLATION_DIR:-/tmp/ablation}"/last --data "${ABLATION_DIR:-/tmp/ablation}"/fused/data.pt --feature-layers 30 $COMMON > "${ABLATION_DIR:-/tmp/ablation}"/last.log 2>&1
echo "last $(date)"
