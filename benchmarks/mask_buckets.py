"""What --mask-bucket costs and buys: over 200 batches of masks per setting, the distinct
(context length, target length) shapes a compiled step would meet, and the context patches
kept (mean length, and its share of the exact lengths').

    python benchmarks/mask_buckets.py [--batch 128] [--batches 200]
"""

import argparse

import torch

from stoptool.config import build_config
from stoptool.masks import MaskSampler

PRESETS = {"stop-vitb16-in1k": {}, "stop-vith14-in1k": {}, "demo (vit_t4 @ 32)": None}


def measure(preset: str | None, bucket: int, batch: int, batches: int) -> tuple[int, float]:
    cfg = build_config(preset, {"mask_bucket": bucket})
    sampler, gen = MaskSampler(cfg.mask_config()), torch.Generator().manual_seed(0)
    draws = [sampler(batch, gen) for _ in range(batches)]
    shapes = {(ctx.shape[1], tgt.shape[2]) for ctx, tgt in draws}
    return len(shapes), sum(ctx.shape[1] for ctx, _ in draws) / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()
    print("| masks | grid | bucket | shapes in 200 batches | mean context length | kept vs exact |")
    print("|---|---|---|---|---|---|")
    for name, extra in PRESETS.items():
        preset = None if extra is None else name
        grid = build_config(preset).mask_config().grid
        _, exact = measure(preset, 0, args.batch, args.batches)
        for bucket in (0, 8, 16):
            shapes, mean = measure(preset, bucket, args.batch, args.batches)
            row = [name, f"{grid}×{grid}", bucket or "exact", shapes, f"{mean:.1f}", f"{mean / exact:.1%}"]
            print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
