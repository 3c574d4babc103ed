"""How long writing `latest` holds up the training loop, in the foreground and in the
background (copy to host memory, then a thread writes), for one model's whole resumable
state (weights, EMA target, AdamW moments, random states).

    python benchmarks/checkpoint_stall.py [--arch vit_b16] [--repeats 3] [--dir DIR]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from stoptool.config import config_from_dict
from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.checkpointer import Checkpointer
from stoptool.train.distributed import World
from stoptool.train.runtime import autocast_factory
from stoptool.train.schedules import Hyper
from stoptool.train.step import StepInputs, single_process_state, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_b16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    cfg = config_from_dict({"arch": args.arch})
    torch.manual_seed(0)
    model = build_jepa(cfg.model).train()
    state = single_process_state(model, autocast_factory(torch.device("cpu"), "fp32"))
    ctx, tgt = MaskSampler(cfg.mask_config())(2, torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size)
    train_step(state, StepInputs(images, ctx, tgt), Hyper(1e-4, 0.04, 0.996))  # AdamW moments exist
    ckpt = Checkpointer(state, {"kind": "pretrain"}, 1000, World(), torch.device("cpu"))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "latest.safetensors"
        rows = {"foreground": [], "background": [], "background, until written": []}
        for _ in range(args.repeats):
            for background in (False, True):
                start = time.perf_counter()
                ckpt.save(path, 1, background=background)
                held = time.perf_counter() - start
                ckpt.wait()
                landed = time.perf_counter() - start
                rows["background" if background else "foreground"].append(held)
                if background:
                    rows["background, until written"].append(landed)
        size = path.stat().st_size
    print(f"{args.arch}: {size / 2**20:.0f} MiB a checkpoint; seconds the loop is held "
          f"(median of {args.repeats})")
    for name, seconds in rows.items():
        every = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"  {name}: {sorted(seconds)[len(seconds) // 2]:.2f} s  (all: {every})")


if __name__ == "__main__":
    main()
