"""Turn the JSON files of benchmarks/perf_table.sh into the markdown rows of docs/performance.md.

    python benchmarks/perf_markdown.py runs/bench
"""

import json
import sys
from pathlib import Path


def train_row(r: dict) -> str:
    how = []
    if r["grad_checkpoint"]:
        how.append("grad checkpoint")
    if r["compile"]:
        how.append("compiled" if r["compiled"] else "compile failed")
    config = f"{r['arch']} @ {r['img_size']}, batch {r['batch_size']}"
    config += f", pred {r['pred_depth']} × {r['pred_width']}"
    cells = [
        config + (f" ({', '.join(how)})" if how else ""),
        r["precision"],
        r["attn"],
        f"{r['img_per_s']:.1f} ({r['img_per_s_min']:.1f}–{r['img_per_s_max']:.1f})",
        f"{r['ms_per_step']:.0f}",
        f"{r['flops_per_image'] / 1e9:.2f}",
        f"{r['achieved_flops'] / 1e9:.0f}",
        f"{r['matmul_flops'] / 1e9:.0f}",
        f"{100 * r['share_of_matmul_rate']:.0f} %",
        f"{r['peak_memory_mib'] / 1024:.1f} GiB",
    ]
    return "| " + " | ".join(cells) + " |"


def main(folder: str) -> None:
    for path in sorted(Path(folder).glob("*.json")):
        r = json.loads(path.read_text())
        if r["what"] == "train":
            print(train_row(r), f"<!-- {path.stem} -->")
        elif r["what"] == "extract":
            print(f"extract {path.stem}: {r['img_per_s']:.1f} img/s ({r['img_per_s_min']:.1f}–"
                  f"{r['img_per_s_max']:.1f}), {r['achieved_flops'] / 1e9:.0f} GFLOP/s, "
                  f"{100 * r['share_of_matmul_rate']:.0f} % of {r['matmul_flops'] / 1e9:.0f}")
        else:
            print(f"masks {path.stem}: {r['batches_per_s']:.0f} batches/s ({r['batches_per_s_min']:.0f}–"
                  f"{r['batches_per_s_max']:.0f}), {r['ms_per_batch']:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench")
