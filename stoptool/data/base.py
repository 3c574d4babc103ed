"""The interface every labelled image set offers (`len`, `load(i)` -> RGB PIL image, `labels`),
and `ArrayDataset`, a set held in memory.

The modules that build sets (`datasets`, `cifar`, `count`) all import this one and not each
other's, so that `datasets` can offer them all by name.
"""

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


def open_image(source: Path | bytes) -> Image.Image:
    """An image file (a path or its bytes), opened but not decoded: its size is known and a
    JPEG can still be told to decode at a reduced scale (`Image.draft`). The file is read whole
    first, so no handle stays open. Raises OSError or ValueError for a file that cannot be used
    (the loaders skip and count those): Pillow's refusal of an image so large that it could be
    a decompression bomb is a ValueError here."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as err:
        raise ValueError(str(err)) from None
    except UnidentifiedImageError:  # (Pillow's message would name the in-memory buffer)
        raise OSError("cannot identify image file") from None


def as_rgb(img: Image.Image) -> Image.Image:
    """`img` decoded as 8-bit RGB. 16-bit grey images are scaled to 8 bits, where a plain
    conversion would clip nearly every pixel to white."""
    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and img.getextrema()[1] > 255):
        grey = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


class ImageDataset:
    """Base: subclasses fill `labels`, `classes`, `name` and implement `load`."""

    name: str = ""
    classes: Sequence[str] = ()
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def open(self, index: int) -> Image.Image:
        """Image `index`, perhaps not decoded yet (see `open_image`); `as_rgb` decodes it.
        Sets whose images are files open them lazily; the others return `load(index)`."""
        return self.load(index)

    def item_name(self, index: int) -> str:
        """How messages name image `index` (a file's path, where there is one)."""
        return f"{self.name}[{index}]"

    def subset_note(self) -> str | None:
        """A line on the subset file's lines that named no image, where there were any."""
        return None

    def describe(self) -> dict:
        return {"name": self.name, "size": len(self), "classes": len(self.classes)}


class ArrayDataset(ImageDataset):
    """Images held in memory as uint8 [N, H, W, 3]."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        self.name, self.images, self.labels, self.classes = name, images, labels, list(classes)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])
