#!/usr/bin/env bash
# The rows of docs/performance.md: run on an otherwise idle machine.
# Usage: benchmarks/perf_table.sh [OUT_DIR] [DEVICE]   (writes one JSON per row)
# PRECISIONS (default "fp32 bf16") are the precisions of the training rows; FAST (default bf16)
# is the one of the compiled and extraction rows. T sets the timing of a row, TC that of a
# compiled row. On a CPU without bf16 instructions, and on a GPU (steps of milliseconds):
#   PRECISIONS=fp32 FAST=fp32 benchmarks/perf_table.sh runs/bench-avx2 cpu
#   T="--steps 20 --warmup 5 --repeats 3" TC="--steps 20 --warmup 5 --repeats 3" benchmarks/perf_table.sh runs/bench-gpu cuda
set -euo pipefail
out=${1:-runs/bench}
device=${2:-auto}
mkdir -p "$out"
st=${STOPTOOL:-stoptool}
run() { name=$1; shift; echo "== $name: stoptool bench $*"; $st bench --device "$device" "$@" --json "$out/$name.json"; }
T=${T:-"--steps 2 --warmup 1 --repeats 2"}
TC=${TC:-"--steps 2 --warmup 3 --repeats 2"}  # the first steps compile: more warm-up
PAPER="--pred-depth 6 --pred-width 384"  # the paper's ViT-B predictor
SMALL="--pred-depth 2 --pred-width 96"   # the predictor pretrain uses for patches of 4 px or less

fast=${FAST:-bf16}
for p in ${PRECISIONS:-fp32 bf16}; do
  run "vit_t4-32-b128-paper-$p" --arch vit_t4 --img-size 32 --batch-size 128 $PAPER --precision $p $T
  run "vit_s16-224-b16-paper-$p" --arch vit_s16 --img-size 224 --batch-size 16 $PAPER --precision $p $T
  run "vit_b16-224-b8-paper-$p" --arch vit_b16 --img-size 224 --batch-size 8 $PAPER --precision $p $T
  run "vit_t4-32-b128-small-$p" --arch vit_t4 --img-size 32 --batch-size 128 $SMALL --precision $p $T
  run "vit_s16-224-b16-small-$p" --arch vit_s16 --img-size 224 --batch-size 16 $SMALL --precision $p $T
done
# the released code's way of running: fp32, every block recomputed, plain matmul attention
for pred in paper small; do
  args=$PAPER; [ $pred = small ] && args=$SMALL
  run "vit_s16-224-b16-$pred-reference-like" --arch vit_s16 --img-size 224 --batch-size 16 $args \
    --precision fp32 --grad-checkpoint --attn math $T
done
run "vit_t4-32-b128-small-reference-like" --arch vit_t4 --img-size 32 --batch-size 128 $SMALL \
  --precision fp32 --grad-checkpoint --attn math $T
run "extract-vit_s16-224-$fast" --what extract --arch vit_s16 --img-size 224 --batch-size 64 --precision $fast $T
run "masks-14x14-b256" --what masks --arch vit_b16 --img-size 224 --batch-size 256 --steps 50 --repeats 5
# torch.compile (per block), last: compiling takes the longest
run "vit_t4-32-b128-small-$fast-compile" --arch vit_t4 --img-size 32 --batch-size 128 $SMALL \
  --precision $fast --compile $TC
run "vit_s16-224-b16-small-$fast-compile" --arch vit_s16 --img-size 224 --batch-size 16 $SMALL \
  --precision $fast --compile $TC
