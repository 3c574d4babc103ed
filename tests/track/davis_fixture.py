"""A tiny DAVIS 2017 release built on disk, in the published layout, and a stoptool encoder
whose patch features follow it.

Videos: 64 × 128 frames of textured shapes (each object its own colour, noise on top) moving
a few pixels a frame over a textured background; masks as palette PNGs with object ids.
The encoder (vit_t8, a real stoptool checkpoint) embeds each patch's mean colour, with its
transformer blocks made identities: features that track each shape's texture. Shared by
tests/track and tests/viz (loaded by path).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from stoptool.io.checkpoint import Checkpoint, save_checkpoint
from stoptool.models.encoder import timm_kwargs
from stoptool.models.pos_embed import sincos_2d

HEIGHT, WIDTH = 64, 128
BACKGROUND = (90, 110, 130)
COLOURS = ((210, 50, 40), (40, 190, 60), (230, 210, 40), (150, 60, 200))
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (768 - 15)

# name -> objects, each (top, left, height, width, rows/frame, cols/frame)
VIDEOS = {
    "one-square": [(20, 12, 22, 22, 1, 5)],
    "three-shapes": [(6, 8, 18, 18, 2, 4), (36, 60, 20, 16, -2, 3), (30, 100, 14, 20, 0, -5)],
    "two-boxes": [(10, 90, 20, 20, 1, -5), (34, 10, 18, 26, -1, 4)],
}


def video(objects: list[tuple], frames: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB frames and id masks of shapes moving at constant speed (later ids drawn on top)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for t in range(frames):
        rgb = np.array(BACKGROUND, np.float64) + rng.normal(0, 12, (HEIGHT, WIDTH, 3))
        ids = np.zeros((HEIGHT, WIDTH), np.uint8)
        for k, (top, left, h, w, dr, dc) in enumerate(objects):
            r, c = top + dr * t, left + dc * t
            box = np.s_[max(r, 0):max(r + h, 0), max(c, 0):max(c + w, 0)]
            ids[box] = k + 1
            rgb[box] = np.array(COLOURS[k]) + rng.normal(0, 12, rgb[box].shape)
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
        masks.append(ids)
    return images, masks


def write_mask(path: Path, ids: np.ndarray) -> None:
    img = Image.fromarray(ids)
    img.putpalette(DAVIS_PALETTE)
    img.save(path)


def make_davis(root: Path, frames: int = 8, videos: dict | None = None, split: str = "val") -> Path:
    """root/JPEGImages/480p/SEQ/*.jpg, root/Annotations/480p/SEQ/*.png, ImageSets/2017/SPLIT.txt."""
    videos = VIDEOS if videos is None else videos
    for seed, (name, objects) in enumerate(videos.items()):
        images, masks = video(objects, frames, seed)
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        for t, (rgb, ids) in enumerate(zip(images, masks)):
            Image.fromarray(rgb).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            write_mask(root / "Annotations" / "480p" / name / f"{t:05d}.png", ids)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{n}\n" for n in videos))
    return root


def colour_encoder_checkpoint(path: Path, seed: int = 0) -> Path:
    """An encoder-only stoptool checkpoint (vit_t8 at 64 px): a patch's feature is an affine
    map of its mean colour (the positions, about 1/100 of its scale, hardly count); every block
    adds nothing (all its weights zero), the closing norm is a plain LayerNorm. The tensors are
    made directly, with no network drawn first."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        shapes = VisionTransformer(**timm_kwargs("vit_t8", 64)).state_dict()
    state = {k: torch.zeros(v.shape) for k, v in shapes.items()}
    for k in state:
        if k.endswith(("norm1.weight", "norm2.weight")) or k == "norm.weight":
            state[k].fill_(1.0)
    width = state["pos_embed"].shape[-1]
    state["pos_embed"] = sincos_2d(width, 8)[None]
    colour_map = torch.randn(width, 3) * 100
    state["patch_embed.proj.weight"] = colour_map[:, :, None, None].expand(-1, -1, 8, 8) / 64
    state["patch_embed.proj.bias"] = torch.randn(width) * 100
    tensors = {f"target_encoder.{k}": v.contiguous() for k, v in state.items()}
    meta = {"kind": "imported", "arch": "vit_t8", "img_size": 64, "sigma": 0.0, "source": "colour encoder"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, Checkpoint(meta, tensors))
    return path
