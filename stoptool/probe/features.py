"""Frozen-encoder features for the probes: extraction in batches, and an on-disk cache.

`last` is the average of the last block's patch tokens after the closing norm (the feature the
I-JEPA and StoP papers probe); `last4` concatenates that average for each of the last four
blocks (the paper's ViT-B/L protocol), so its last quarter is `last`. Any timm
`VisionTransformer` works the same way through timm's own entry points (`forward_features`,
`forward_intermediates`): stoptool's encoders, which have no class token, and `timm:NAME`
baselines, whose class and other prefix tokens are left out of the average.

Images go through an `ImageTransform`: by default the evaluation transform (resize and
centre-crop to the encoder's image size, or squash the whole image to it for sets that ask,
e.g. CLEVR), then the normalisation the encoder was trained with (ImageNet's statistics for
stoptool's encoders, a timm model's own). A training view (`view=k`) is a seeded random
resized crop and flip instead, for protocols that train on augmented crops.

The cache key is a hash of everything the features depend on: the encoder's tensors, the
data set's content, the split, the layers, the image size, the precision and the transform.
"""

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from stoptool.data.datasets import ArrayDataset, FolderDataset, ImageDataset
from stoptool.data.transforms import MEAN, STD, center_crop, crop_box, resized_crop
from stoptool.errors import UserError
from stoptool.io.checkpoint import tensors_digest
from stoptool.train.runtime import autocast_factory

Progress = Callable[[int, int], None]  # progress(done, total)


@dataclass
class Features:
    x: np.ndarray  # [N, D] float32
    y: np.ndarray  # [N] int64
    skipped: int = 0  # unreadable images left out

    def __len__(self) -> int:
        return len(self.y)


def pooled_features(encoder: torch.nn.Module, images: torch.Tensor, layers: str) -> torch.Tensor:
    """[B, D] (`last`) or [B, 4D] (`last4`) average-pooled patch-token features."""
    if layers == "last":
        tokens = encoder.forward_features(images)
        return tokens[:, getattr(encoder, "num_prefix_tokens", 0):].mean(1)
    if layers == "last4":  # (timm leaves the prefix tokens out of the intermediates)
        blocks = encoder.forward_intermediates(images, indices=4, norm=True, output_fmt="NLC",
                                               intermediates_only=True)
        return torch.cat([h.mean(1) for h in blocks], dim=-1)
    raise ValueError(f"unknown layers {layers!r}")


TRAIN_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop, as VISSL's linear benchmarks train


def resize_of(data: ImageDataset) -> str:
    """How the evaluation transform fits `data`'s images to the encoder: `crop` unless the set
    says otherwise (CLEVR: `squash`, the whole scene, since a crop could cut objects away)."""
    return getattr(data, "eval_resize", "crop")


@dataclass(frozen=True)
class ImageTransform:
    """How an image becomes the encoder's input [3, S, S], normalised with `mean` and `std`.

    `view=None` is the evaluation transform: `crop` resizes the short side to S / 0.875 and takes
    the centre (`transforms.center_crop`), `squash` resizes the whole image to S × S. `view=k`
    is the k-th training view of each image: a random resized crop (area 8–100 %, aspect 3/4–4/3)
    with `crop`, the whole image with `squash`, then a horizontal flip with probability 1/2;
    drawn from (seed, k, image index) alone, so a view is the same in every run and worker."""

    img_size: int
    resize: str = "crop"
    view: int | None = None
    seed: int = 0
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    def __call__(self, img: Image.Image, index: int) -> torch.Tensor:
        size, whole = self.img_size, (0, 0, *img.size)
        if self.view is None and self.resize == "crop":
            pixels = torch.from_numpy(np.array(center_crop(img, size))).permute(2, 0, 1)
        elif self.view is None:
            pixels = resized_crop(img, whole, size)
        else:
            rng = random.Random(f"{self.seed}/{self.view}/{index}")
            box = crop_box(*img.size, TRAIN_CROP_SCALE, rng) if self.resize == "crop" else whole
            pixels = resized_crop(img, box, size)
            if rng.random() < 0.5:
                pixels = pixels.flip(2)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def key(self) -> dict | None:
        """What the cache key needs beyond the image size: nothing for the default transform
        (so the probe's cache entries stay valid), else every field that changes the pixels."""
        if (self.resize, self.view, self.mean, self.std) == ("crop", None, MEAN, STD):
            return None
        out = {"resize": self.resize, "mean": list(self.mean), "std": list(self.std)}
        if self.view is not None:
            out.update(view=self.view, seed=self.seed, crop_scale=list(TRAIN_CROP_SCALE), hflip=0.5)
        return out


class EvalImages(Dataset):
    """Transformed images (of `indices` only, when given), with their labels; an unreadable
    file yields None and is counted. The transform is the set's evaluation transform unless
    given."""

    def __init__(self, data: ImageDataset, img_size: int, indices=None,
                 transform: ImageTransform | None = None):
        self.data = data
        self.transform = transform or ImageTransform(img_size, resize_of(data))
        self.indices = list(range(len(data))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int):
        i = self.indices[n]
        try:
            img = self.data.load(i)
        except (OSError, ValueError):
            return None, int(self.data.labels[i])
        return self.transform(img, i), int(self.data.labels[i])


def collate_eval(items):
    kept = [(x, y) for x, y in items if x is not None]
    images = torch.stack([x for x, _ in kept]) if kept else None
    labels = torch.tensor([y for _, y in kept], dtype=torch.int64)
    return images, labels, len(items) - len(kept)


def extract_features(
    encoder: torch.nn.Module,
    data: ImageDataset,
    img_size: int,
    layers: str = "last",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    workers: int = 0,
    progress: Progress | None = None,
    transform: ImageTransform | None = None,
    indices=None,
) -> Features:
    """Run the frozen encoder (eval mode, no grad) over `data` (or its `indices`) and pool its
    tokens."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    autocast = autocast_factory(device, precision)
    images = EvalImages(data, img_size, indices, transform)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_eval)
    xs, ys, skipped, done = [], [], 0, 0
    if progress:
        progress(0, len(images))
    with torch.inference_mode():
        for batch, labels, n_skipped in loader:
            skipped += n_skipped
            if batch is not None:
                with autocast():
                    feats = pooled_features(encoder, batch.to(device), layers)
                xs.append(feats.float().cpu().numpy())
                ys.append(labels.numpy())
            done += len(labels) + n_skipped
            if progress:
                progress(done, len(images))
    if not xs:
        raise UserError(f"no readable image in '{data.name}'")
    return Features(np.concatenate(xs), np.concatenate(ys), skipped)


# ---------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stoptool" / "features"


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the encoder's tensors."""
    return tensors_digest(encoder.state_dict())


def dataset_fingerprint(data: ImageDataset) -> str:
    """A hash of what the data set holds: its pixels (in memory) or its files (on disk)."""
    h = hashlib.sha256()
    h.update(f"{type(data).__name__}|{len(data)}|".encode())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    if isinstance(data, ArrayDataset):
        h.update(np.ascontiguousarray(data.images).tobytes())
    elif isinstance(data, FolderDataset):
        for f in data.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    elif hasattr(data, "identity"):  # a prepared set: its index and its shards' sizes and times
        h.update(data.identity())
    else:  # a data set we know nothing about: its name is all we have
        h.update(data.name.encode())
    return h.hexdigest()


# The rules the cached features were made by: 2 since the evaluation crop became timm's
# (`transforms.center_crop`: floor(S / 0.875), and small images enlarged too); entries of 1 are
# not read again.
CACHE_VERSION = 2


def cache_key(encoder_hash: str, data_hash: str, split: str, layers: str, img_size: int,
              precision: str, extra: dict | None = None) -> str:
    """`extra`: anything else the features depend on (a transform's `key()`, a slice of the
    set); None keeps the key of the plain evaluation features."""
    fields = {
        "encoder": encoder_hash, "data": data_hash, "split": split, "layers": layers,
        "img_size": img_size, "precision": precision, "version": CACHE_VERSION,
    }
    if extra:
        fields["extra"] = extra
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def load_cached(cache_dir: Path, key: str) -> Features | None:
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return Features(f["x"], f["y"], int(f["skipped"]))
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is recomputed


def save_cached(cache_dir: Path, key: str, feats: Features) -> Path:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.npz"
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp.npz"
    np.savez(tmp, x=feats.x, y=feats.y, skipped=np.int64(feats.skipped))
    os.replace(tmp, path)
    return path
