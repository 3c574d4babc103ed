"""`count`: a synthetic counting set in the spirit of CLEVR/Count, drawn by the tool on demand.

Each 32 × 32 image shows one to six flat objects (discs, squares and triangles of random
colour and size, apart from each other) on a plain background of another random colour; the
label is how many there are. Nothing is downloaded or stored: image `i` of a split is drawn
from a random generator seeded with (split, i), so every run sees the same pixels (with the
same numpy and Pillow: their random streams and edge drawing are not promised to stay fixed
across versions; the probe's feature cache hashes the pixels, so it notices). The training
split holds 5,000 images and the test split 1,000, with the counts equally represented and
shuffled.

Counting asks an encoder for something digits do not: the number of separate things in the
image, whatever their shape, colour, size and place, which no single pixel or position tells.
"""

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from stoptool.data.base import ArrayDataset
from stoptool.errors import UserError

COUNTS = tuple(range(1, 7))
SIZES = {"train": 5000, "test": 1000}
IMG = 32
SUPER = 4  # drawn at 4× and box-filtered down: smooth edges, and sizes finer than a pixel
RADIUS = (2.0, 4.5)  # radius of the circle an object fills or is inscribed in, in output pixels
GAP = 2.0  # pixels between those circles: anti-aliased edges never join two objects
SEED = 1729  # part of every image's seed: changing it changes the data set
_SPLIT_ID = {"train": 0, "test": 1}


def count_dataset(split: str = "train") -> ArrayDataset:
    """The `count` split: "train" or "test"."""
    if split not in SIZES:
        raise UserError(f"the count data set has the splits train and test, not '{split}'")
    images, labels = _drawn(split)
    return ArrayDataset(f"count/{split}", images, labels, [str(c) for c in COUNTS])


@lru_cache(maxsize=2)
def _drawn(split: str) -> tuple[np.ndarray, np.ndarray]:
    n = SIZES[split]
    order = np.random.default_rng([SEED, _SPLIT_ID[split]]).permutation(n)
    labels = (order % len(COUNTS)).astype(np.int64)  # equal shares, shuffled
    images = np.stack([draw_image(split, i, COUNTS[label]) for i, label in enumerate(labels)])
    images.flags.writeable = False  # shared between calls through the cache
    labels.flags.writeable = False
    return images, labels


def draw_image(split: str, index: int, count: int) -> np.ndarray:
    """Image `index` of `split` with `count` objects: uint8 [IMG, IMG, 3]."""
    rng = np.random.default_rng([SEED, _SPLIT_ID[split], index])
    background = rng.integers(0, 256, 3)
    size = IMG * SUPER
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in background))
    pen = ImageDraw.Draw(canvas)
    for (x, y, r) in _place(rng, count):
        colour = tuple(int(v) for v in _contrasting(rng, background))
        x, y, r = x * SUPER, y * SUPER, r * SUPER
        shape = rng.integers(3)
        if shape == 0:
            pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == 1:
            s = r * 0.7  # inside the object's circle, as every shape is
            pen.rectangle((x - s, y - s, x + s, y + s), fill=colour)
        else:
            pen.regular_polygon((x, y, r), 3, rotation=float(rng.uniform(0, 120)), fill=colour)
    small = canvas.resize((IMG, IMG), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def _place(rng: np.random.Generator, count: int) -> list[tuple[float, float, float]]:
    """`count` (x, y, r) circles inside the image, GAP pixels apart. A layout that cannot be
    completed is drawn again with smaller objects."""
    hi = RADIUS[1]
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            r = rng.uniform(RADIUS[0], hi)
            x, y = rng.uniform(r + 1.0, IMG - r - 1.0, 2)  # a pixel inside the border
            if all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + GAP) ** 2 for px, py, pr in placed):
                placed.append((x, y, r))
                if len(placed) == count:
                    return placed
        hi = max(RADIUS[0], hi - 0.5)


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour that stands out from `background` (summed channel distance ≥ 160)."""
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() >= 160:
            return colour
