#!/usr/bin/env bash
# Before/after throughput of two stoptool trees on this machine, alternating A and B so that
# drift in the machine's speed falls on both:
#   benchmarks/ab_bench.sh BEFORE_TREE AFTER_TREE OUT_DIR ROUNDS -- BENCH ARGS...
# Each round runs `stoptool bench ARGS --json` once from each tree (PYTHONPATH=TREE) and keeps
# the JSON; benchmarks/perf_markdown.py or a one-liner reads img_per_s from them.
set -euo pipefail
a=$1 b=$2 out=$3 rounds=$4
shift 5
py=${PYTHON:-python3}
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  for side in a b; do
    tree=$a; [ "$side" = b ] && tree=$b
    PYTHONPATH=$tree "$py" -m stoptool bench "$@" --json "$out/$side$r.json" >/dev/null
    "$py" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['img_per_s'], d['img_per_s_min'], d['img_per_s_max'])" "$out/$side$r.json" "$side$r"
  done
done
