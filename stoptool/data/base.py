"""The interface every labelled image set offers (`len`, `load(i)` -> RGB PIL image, `labels`),
and `ArrayDataset`, a set held in memory.

The modules that build sets (`datasets`, `cifar`, `count`) all import this one and not each
other's, so that `datasets` can offer them all by name.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image


class ImageDataset:
    """Base: subclasses fill `labels`, `classes`, `name` and implement `load`."""

    name: str = ""
    classes: Sequence[str] = ()
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

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
