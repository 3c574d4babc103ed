#!/usr/bin/env bash
# Before/after throughput of two stoptool trees on this machine, alternating A and B so that
# drift in the machine's speed falls on both:
#   benchmarks/ab_bench.sh BEFORE_TREE AFTER_TREE OUT_DIR ROUNDS -- BENCH ARGS...
# Each round runs `stoptool bench ARGS --json` once from each tree and keeps the JSON;
# benchmarks/perf_markdown.py or a one-liner reads img_per_s from them. Each run starts in its
# tree's folder, with PYTHONPATH=TREE: Python puts the current folder first on its path, ahead
# of PYTHONPATH, so a run started elsewhere (in a checkout installed in editable mode, say)
# would import that checkout's stoptool instead. The first line of each run names the file
# it imported. Relative paths in ARGS (--config FILE, a data set's folder) resolve inside each
# tree, so give absolute ones.
set -euo pipefail
a=$(realpath "$1") b=$(realpath "$2") out=$3 rounds=$4
shift 5
py=$(realpath -s "$(command -v "${PYTHON:-python3}")")  # -s: a venv's python is a link
mkdir -p "$out"
out=$(realpath "$out")
for tree in "$a" "$b"; do
  (cd "$tree" && PYTHONPATH=$tree "$py" -c "import stoptool; print('imports', stoptool.__file__)")
done
for r in $(seq 1 "$rounds"); do
  for side in a b; do
    tree=$a; [ "$side" = b ] && tree=$b
    (cd "$tree" && PYTHONPATH=$tree "$py" -m stoptool bench "$@" --json "$out/$side$r.json" >/dev/null)
    "$py" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['img_per_s'], d['img_per_s_min'], d['img_per_s_max'])" "$out/$side$r.json" "$side$r"
  done
done
