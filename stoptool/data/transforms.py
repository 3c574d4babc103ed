"""Pretraining augmentations, driven by an explicit random source.

Each image's augmentation is a pure function of (seed, epoch, index), so runs are repeatable
whatever the number of loader workers and a resumed run sees the same images.
"""

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

# ImageNet statistics, used by I-JEPA for pretraining and evaluation.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalized float tensor [3, H, W]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


def random_resized_crop(
    img: Image.Image,
    size: int,
    scale: tuple[float, float],
    rng: random.Random,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """A crop of random area share and aspect ratio, resized to size × size (bicubic)."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = rng.randint(0, w - cw)
            top = rng.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    side = min(w, h)  # fall back to the central square
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def center_crop(img: Image.Image, size: int, crop_ratio: float = 0.875) -> Image.Image:
    """Evaluation transform: resize the short side to size / crop_ratio, take the centre."""
    w, h = img.size
    short = size / crop_ratio if min(w, h) > size else size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class PretrainTransform:
    size: int
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: float = 0.0
    blur: float = 0.0
    gray: float = 0.0

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = random_resized_crop(img, self.size, self.crop_scale, rng)
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < self.blur:
            # radius in image-size units, as SimCLR/I-JEPA's 0.1–2.0 px at 224 px
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0) * self.size / 224))
        if rng.random() < self.gray:
            img = img.convert("L").convert("RGB")
        return to_tensor(img)
