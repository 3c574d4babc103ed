#!/usr/bin/env bash
# Draw the figures of docs/figures.md from a pretraining run directory.
#
#   benchmarks/make_figures.sh RUN_DIR [OTHER_RUN_DIR ...]
#
# RUN_DIR gives the checkpoint (RUN_DIR/latest.safetensors) for the similarity and heatmap
# figures and the mask settings (RUN_DIR/config.yaml); every run directory given joins the
# training curves, so pass a σ sweep to get the paper's Fig. 4; the second run's checkpoint is
# drawn beside the first in the compared similarity figure (pass the σ = 0 run second, e.g.
# `make_figures.sh runs/demo runs/demo-sigma0`). The PNGs go to docs/img
# (FIGURES_OUT overrides) at 100 dpi (DPI overrides); the JSON files of numbers that each
# command also writes are removed.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 RUN_DIR [OTHER_RUN_DIR ...]" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
run=$1
out=${FIGURES_OUT:-$root/docs/img}
stoptool=${STOPTOOL:-$root/.venv/bin/stoptool}
dpi=${DPI:-100}  # keeps the PNGs in the repository small
ckpt=$run/latest.safetensors

$stoptool viz similarity "$ckpt" --out "$out/similarity.png" --dpi "$dpi"
$stoptool viz similarity "$ckpt" --sigma 1 --out "$out/similarity-sigma1.png" --dpi "$dpi"
if [ $# -ge 2 ]; then
    $stoptool viz similarity "$2/latest.safetensors" "$ckpt" --out "$out/similarity-compare.png" --dpi "$dpi"
fi
$stoptool viz heatmap "$ckpt" --out "$out/heatmap.png" --dpi "$dpi"
$stoptool viz masks --config "$run/config.yaml" --out "$out/masks.png" --dpi "$dpi"
$stoptool viz masks --config stop-vitb16-in1k --out "$out/masks-vitb16.png" --dpi "$dpi"
$stoptool viz curves "$@" --out "$out/curves.png" --dpi "$dpi"
for name in similarity similarity-sigma1 similarity-compare heatmap masks masks-vitb16 curves; do
    rm -f "$out/$name.json"
done
