"""`decode=gpu`: loader workers hand out the JPEG bytes and the crop they drew; the training
device decodes a whole batch at once (torchvision's `decode_jpeg`, nvJPEG on a GPU), then crops,
resizes (bilinear, antialiased) and flips each image there.

The draws are those of `PretrainTransform` (crop, then the flip, blur and grey draws), so a run
sees the same crops as with `decode=cpu`. Images that are not JPEGs are transformed in the
worker as usual and travel as pixels. The batch's `to(device)` does the decoding, so the
training loop moves it like any tensor.
"""

import io
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from stoptool.data.transforms import PretrainTransform, crop_box
from stoptool.errors import UserError


@dataclass
class Encoded:
    """One image of a batch: its JPEG bytes with the crop box and flip drawn for it, or (not a
    JPEG) its transformed pixels, uint8 [3, size, size]."""

    jpeg: torch.Tensor | None
    size: int  # of the output's sides
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    flip: bool = False
    pixels: torch.Tensor | None = None


@dataclass(frozen=True)
class DeferredTransform:
    """`PretrainTransform`'s draws, leaving a JPEG's decoding, crop and flip to the device."""

    transform: PretrainTransform  # without blur or grey, resizing bilinear (`DataConfig` checks it)

    def __call__(self, img: Image.Image, rng: random.Random) -> Encoded:
        raw = _file_bytes(img)
        if raw is None:
            return Encoded(None, self.transform.size, pixels=self.transform(img, rng))
        t = self.transform
        box = crop_box(*img.size, t.crop_scale, rng)
        flip = rng.random() < t.hflip
        rng.random(), rng.random()  # the blur and grey draws (both off), as the CPU path makes them
        return Encoded(torch.frombuffer(bytearray(raw), dtype=torch.uint8), t.size, box, flip)


def _file_bytes(img: Image.Image) -> bytes | None:
    """The bytes of a JPEG opened from memory and not decoded yet (`base.open_image`), else None."""
    fp = getattr(img, "fp", None)
    if img.format != "JPEG" or not isinstance(fp, io.BytesIO) or not getattr(img, "tile", None):
        return None
    return fp.getvalue()


class EncodedBatch:
    """A batch of `Encoded` images; `to(device)` decodes it there: uint8 [B, 3, size, size]."""

    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "EncodedBatch":
        return self  # (a few kB an image: nothing worth pinning)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [e.jpeg for e in self.items if e.jpeg is not None]
        decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
        out = []
        for e in self.items:
            if e.jpeg is None:
                out.append(e.pixels.to(device, non_blocking=non_blocking))
            else:
                out.append(crop_resize(next(decoded), e.box, e.size, e.flip))
        return torch.stack(out)


def crop_resize(img: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """uint8 [3, H, W] on any device -> its crop `box` resized to size × size (bilinear,
    antialiased, in float, rounded back to uint8), flipped left-right if `flip`."""
    left, top, right, bottom = box
    crop = img[None, :, top:bottom, left:right].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out[0].round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(2) if flip else out


def check_device(decode: str, device: torch.device) -> None:
    """decode=gpu needs a CUDA device and torchvision's batched decoder: one clear error if not."""
    if decode != "gpu":
        return
    if device.type != "cuda":
        raise UserError(f"decode=gpu decodes JPEGs on a CUDA device, and this run's device is {device.type}: "
                        "use decode=cpu", key="decode")
    try:
        import torchvision
    except ImportError:
        raise UserError("decode=gpu needs torchvision (pip install torchvision)", key="decode") from None
    if tuple(int(p) for p in torchvision.__version__.split("+")[0].split(".")[:2]) < (0, 19):
        raise UserError(f"decode=gpu decodes a batch at once, which needs torchvision 0.19 or later, not "
                        f"{torchvision.__version__}", key="decode")


def pretrain_transform(size: int, d) -> PretrainTransform | DeferredTransform:
    """The transform `d` (a DataConfig, or anything with its augmentation fields) asks for."""
    transform = PretrainTransform(size, tuple(d.crop_scale), d.hflip, d.blur, d.gray, d.interpolation)
    return DeferredTransform(transform) if d.decode == "gpu" else transform
