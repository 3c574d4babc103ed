#!/usr/bin/env bash
# The rows of docs/performance.md: run on an otherwise idle machine.
# Usage: benchmarks/perf_table.sh [OUT_DIR] [DEVICE]   (writes one JSON per row)
set -euo pipefail
out=${1:-runs/bench}
device=${2:-auto}
mkdir -p "$out"
st=${STOPTOOL:-stoptool}
run() { name=$1; shift; echo "== $name: stoptool bench $*"; $st bench --device "$device" "$@" --json "$out/$name.json"; }

for p in fp32 bf16; do
  run "vit_t4-32-b128-$p" --arch vit_t4 --img-size 32 --batch-size 128 --precision $p --steps 2 --warmup 1 --repeats 2
  run "vit_s16-224-b16-$p" --arch vit_s16 --img-size 224 --batch-size 16 --precision $p --steps 2 --warmup 1 --repeats 2
  run "vit_b16-224-b8-$p" --arch vit_b16 --img-size 224 --batch-size 8 --precision $p --steps 2 --warmup 1 --repeats 2
done
# the released code's way of running: fp32, every block recomputed, plain matmul attention
run "vit_s16-224-b16-reference-like" --arch vit_s16 --img-size 224 --batch-size 16 --precision fp32 \
  --grad-checkpoint --attn math --steps 2 --warmup 1 --repeats 2
run "vit_t4-32-b128-reference-like" --arch vit_t4 --img-size 32 --batch-size 128 --precision fp32 \
  --grad-checkpoint --attn math --steps 2 --warmup 1 --repeats 2
run "extract-vit_s16-224-bf16" --what extract --arch vit_s16 --img-size 224 --batch-size 64 --precision bf16 --steps 2 --warmup 1 --repeats 2
run "masks-14x14-b256" --what masks --arch vit_b16 --img-size 224 --batch-size 256 --steps 50 --repeats 5
