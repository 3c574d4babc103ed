"""Pretraining augmentations, driven by an explicit random source.

Each image's augmentation is a pure function of (seed, epoch, index), so runs are repeatable
whatever the number of loader workers and a resumed run sees the same images.
"""

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from stoptool.data.base import as_rgb

# ImageNet statistics, used by I-JEPA for pretraining and evaluation.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalized float tensor [3, H, W]."""
    return normalize(torch.from_numpy(np.array(img)).permute(2, 0, 1))


def crop_box(w: int, h: int, scale: tuple[float, float], rng: random.Random,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random crop (left, top, right, bottom) of a w × h image: area share in `scale`, aspect
    ratio in `ratio` (log-uniform), ten tries, else the central square."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = rng.randint(0, w - cw)
            top = rng.randint(0, h - ch)
            return left, top, left + cw, top + ch
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def draft_factor(box: tuple[int, int, int, int], size: int) -> int:
    """The JPEG scale divisor (8, 4, 2, else 1) at which the crop `box` still keeps more than
    `size` pixels each way, with room for snapping its edges to that grid."""
    short = min(box[2] - box[0], box[3] - box[1])
    return next((f for f in (8, 4, 2) if short >= f * (size + 1)), 1)


def draft(img: Image.Image, box: tuple[int, int, int, int], size: int) -> tuple[tuple, int]:
    """Have a JPEG not decoded yet decode at 1/2, 1/4 or 1/8 scale (its DCT scaling) where the
    crop allows (`draft_factor`). Returns the crop's box in the pixels it will decode to, and
    the divisor. The box's edges are snapped to multiples of the divisor (moved by at most
    half of it: under a quarter of an output pixel), so that it falls on whole decoded pixels."""
    factor = draft_factor(box, size)
    if factor == 1 or img.format != "JPEG" or not getattr(img, "tile", None):
        return box, 1
    w, h = img.size
    drafted = img.draft(None, (w // factor, h // factor))  # (mode, its box in the scaled pixels)
    factor = round(w / drafted[1][2]) if drafted else 1
    return tuple(round(v / factor) for v in box), factor


def resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """The crop `box` of `img` resized to size × size in one resample: uint8 [3, size, size].

    bilinear (antialiased, as Pillow's and torchvision's) resamples the uint8 pixels with
    torch, after decoding a JPEG at a reduced scale where the crop allows (`draft`); bicubic
    resamples with Pillow from the full-size image."""
    if interpolation == "bicubic":
        img = as_rgb(img).resize((size, size), Image.BICUBIC, box=box)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)
    (left, top, right, bottom), _ = draft(img, box, size)
    pixels = torch.from_numpy(np.array(as_rgb(img))).permute(2, 0, 1)[None]  # channels-last [1, 3, H, W]
    crop = pixels[..., top:bottom, left:right]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].contiguous()


CROP_PCT = 0.875  # the evaluation crop's share of the resized short side (timm's default)


def center_crop(img: Image.Image, size: int, crop_pct: float = CROP_PCT) -> Image.Image:
    """The evaluation transform, the one rule for every image the probes, the online k-NN and
    the evaluations see, and the one an exported folder declares to timm (interpolation
    bicubic, crop_pct, crop_mode center): timm's own, so a model loaded there sees the same
    pixels. The short side is resized (bicubic) to floor(size / crop_pct) and the long side in
    proportion, rounded down; then the centre size × size is taken, its offsets rounded half to
    even. (Images smaller than that are enlarged to it too.)"""
    w, h = img.size
    short = math.floor(size / crop_pct)
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if new != (w, h):
        img = img.resize(new, Image.BICUBIC)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    return img.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class PretrainTransform:
    """Random resized crop, then flip, blur and grey as configured: RGB image -> uint8
    [3, size, size]. The float conversion and normalisation (`normalize`) run on the device,
    once per batch."""

    size: int
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: float = 0.0
    blur: float = 0.0
    gray: float = 0.0
    interpolation: str = "bilinear"

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        box = crop_box(*img.size, self.crop_scale, rng)
        x = resized_crop(img, box, self.size, self.interpolation)
        if rng.random() < self.hflip:
            x = x.flip(2)
        if rng.random() < self.blur:
            # radius in image-size units, as SimCLR/I-JEPA's 0.1–2.0 px at 224 px
            radius = rng.uniform(0.1, 2.0) * self.size / 224
            x = _through_pil(x, lambda im: im.filter(ImageFilter.GaussianBlur(radius)))
        if rng.random() < self.gray:
            x = _through_pil(x, lambda im: im.convert("L").convert("RGB"))
        return x


def _through_pil(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply a Pillow operation `fn` to a uint8 [3, H, W] tensor."""
    img = fn(Image.fromarray(x.permute(1, 2, 0).numpy()))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (as the loader hands them out) -> float, normalised with the
    ImageNet statistics, on their device; float images pass through (already normalised)."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std
