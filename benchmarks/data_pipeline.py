"""The pretraining input pipeline per core, against a plain PIL pipeline, on ImageNet-like JPEGs.

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/data_pipeline.py            # one core
    python benchmarks/data_pipeline.py --workers 8 --rounds 1                         # + 8 workers

Writes `--images` JPEGs of 500 × 375 at quality 90 whose content has the spectrum of
photographs (amplitude falling as 1/frequency, a shared luminance plus weaker colour; about
the size of an average ImageNet file), prepares them as shards (`stoptool prepare`, short side
256), then times, alternating in `--rounds` rounds, one pass each over all images at 224 px
with batches of `--batch`, in this process (`--workers 0`):

- plain: what a straightforward loader does per image: PIL decode, RandomResizedCrop(0.3-1)
  resized bicubic, float tensor normalised with the ImageNet statistics, batches stacked;
- folder: stoptool's pretraining loader over the loose JPEG folder (crop, masks, collate);
- shards: the same loader over the prepared shards.

Prints img/s of each and the ratios to plain taken within each round (their median), as
Markdown rows, and with `--workers N` also the loaders' rate with N workers on this machine's
cores. `--json FILE` keeps the figures.
"""

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stoptool.config import MaskConfig
from stoptool.data.datasets import open_dataset
from stoptool.data.loader import pretrain_loader
from stoptool.data.prepare import available_cpus, prepare
from stoptool.data.transforms import MEAN, STD, PretrainTransform
from stoptool.masks import MaskSampler

SIZE = 224


def photo_like(rng: np.random.Generator, h: int = 375, w: int = 500) -> np.ndarray:
    """uint8 [h, w, 3]: 1/f noise, luminance shared by the channels, colour at a third of it."""
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    f[0, 0] = 1.0

    def field() -> np.ndarray:
        spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
        x = np.fft.irfft2(spec, s=(h, w))
        return (x - x.mean()) / x.std()

    lum = field()
    img = np.stack([lum + 0.35 * field() for _ in range(3)], -1) * 48 + 120
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, n: int, classes: int = 8) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(photo_like(rng)).save(path, quality=90)
        total += path.stat().st_size
    return total


def plain_pass(files: list[Path], batch: int, seed: int) -> int:
    """The straightforward pipeline over every file once; returns images produced."""
    rng = random.Random(seed)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    done, pending = 0, []
    for path in files:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for _ in range(10):  # RandomResizedCrop(scale=(0.3, 1.0)), torchvision's draws
            area = w * h * rng.uniform(0.3, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                break
        else:
            cw = ch = min(w, h)
            left, top = (w - cw) // 2, (h - ch) // 2
        crop = img.crop((left, top, left + cw, top + ch)).resize((SIZE, SIZE), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
        pending.append((x - mean) / std)
        if len(pending) == batch:
            torch.stack(pending)
            done, pending = done + batch, []
    return done


def loader_pass(data, batch: int, workers: int, epoch: int) -> int:
    sampler = MaskSampler(MaskConfig().on_grid(SIZE // 16))
    steps = len(data) // batch
    loader = pretrain_loader(data, PretrainTransform(SIZE), sampler, batch, 0, epoch * steps,
                             (epoch + 1) * steps, workers=workers)
    return sum(len(images) for images, *_ in loader)


def timed(fn) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="also time the loaders with this many workers")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = write_folder(root / "folder", args.images)
        prepare(root / "folder", root / "shards", short_side=256, workers=0)
        folder, shards = open_dataset(str(root / "folder")), open_dataset(str(root / "shards"))
        files = list(folder.files)
        random.Random(0).shuffle(files)
        out = {"images": args.images, "mean_file_kb": size / args.images / 1e3, "batch": args.batch,
               "cpus": available_cpus(), "rounds": []}
        for r in range(args.rounds):
            row = {}
            for name, fn in (("plain", lambda r=r: plain_pass(files, args.batch, r)),
                             ("folder", lambda r=r: loader_pass(folder, args.batch, 0, r)),
                             ("shards", lambda r=r: loader_pass(shards, args.batch, 0, r))):
                seconds, n = timed(fn)
                row[name] = n / seconds
            out["rounds"].append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in row.items()), flush=True)
        if args.workers:
            out["workers"] = args.workers
            for name, data in (("folder", folder), ("shards", shards)):
                loader_pass(data, args.batch, args.workers, 0)  # the page cache warm, as above
                seconds, n = timed(lambda data=data: loader_pass(data, args.batch, args.workers, 1))
                out[f"{name}_workers_img_per_s"] = n / seconds
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def report(out: dict) -> None:
    rounds = out["rounds"]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratio = {k: statistics.median(r[k] / r["plain"] for r in rounds) for k in ("folder", "shards")}
    out.update(median=med, ratio=ratio)
    print(f"\n{out['images']} JPEGs of 500 × 375, q90, {out['mean_file_kb']:.0f} kB on average; "
          f"{SIZE} px, batch {out['batch']}, one core, {len(rounds)} rounds\n")
    print("| pipeline | img/s (median) | × plain (median of rounds) |")
    print("|---|---|---|")
    print(f"| plain PIL (decode, RRC bicubic, float normalise) | {med['plain']:.0f} | 1.00 |")
    print(f"| stoptool, loose JPEG folder | {med['folder']:.0f} | {ratio['folder']:.2f} |")
    print(f"| stoptool, prepared shards (short side 256) | {med['shards']:.0f} | {ratio['shards']:.2f} |")
    if "workers" in out:
        folder, shards = out["folder_workers_img_per_s"], out["shards_workers_img_per_s"]
        print(f"\nwith {out['workers']} workers on {out['cpus']} cores: folder {folder:.0f} img/s, "
              f"shards {shards:.0f} img/s")


if __name__ == "__main__":
    main()
