"""Every labelled image set stoptool reads, opened by name (`open_dataset`), each behind the
small interface of `stoptool.data.base`: `len`, `load(i)` -> RGB PIL image, `labels`.

Bundled and offline: scikit-learn's digits, and `count`, a synthetic counting set drawn on
demand (`stoptool.data.count`). On disk: CIFAR-10/100 in the release format
(`stoptool.data.cifar`), any ImageFolder tree (`root/class/img.jpg`), optionally
restricted by a subset file of relative paths, and the transfer sets of the paper's Table 4 in
their own release layouts, by a prefixed name (`clevr-count:PATH`, `clevr-dist:PATH`,
`inat18:PATH`, `places205:PATH`; `stoptool.data.transfer`).
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

# ArrayDataset and ImageDataset are also imported from here by callers
from stoptool.data.base import ArrayDataset, ImageDataset, as_rgb, open_image
from stoptool.data.cifar import load_cifar
from stoptool.data.count import SIZES as COUNT_SIZES
from stoptool.data.count import count_dataset
from stoptool.data.shards import ShardDataset, is_prepared, members_name
from stoptool.data.transfer import open_transfer, parse_name
from stoptool.errors import UserError
from stoptool.io.paths import asset, check_file

BUILTIN = ("digits", "count", "cifar10", "cifar100")  # data set names that are not paths
# Training images of each data set known by name; "imagenet" is the name the paper presets give
# ImageNet-1k (ILSVRC-2012), whose train split has 1,281,167 images.
TRAIN_IMAGES = {"digits": 1347, "count": COUNT_SIZES["train"], "cifar10": 50_000, "cifar100": 50_000,
                "imagenet": 1_281_167}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}


def digits(split: str = "train") -> ArrayDataset:
    """scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels), split 75/25 stratified.

    The split is `train_test_split(test_size=0.25, stratify=labels, random_state=0)`, stored
    in `assets/digits_split.npz` (order included) so that no scikit-learn module is imported:
    that import alone took longer than a short run's training."""
    pixels, target = _digits_arrays()
    images = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    if split == "all":
        idx = np.arange(len(images))
    else:
        with np.load(asset("digits_split.npz")) as stored:
            idx = stored[split].astype(np.int64)
    return ArrayDataset(f"digits/{split}", images[idx], target[idx], [str(d) for d in range(10)])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 × 64 pixels (0–16) and labels, read from scikit-learn's data file without
    importing scikit-learn; through `load_digits` if that file is not where it is expected."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data, data.target


class FolderDataset(ImageDataset):
    """An ImageFolder tree: one sub-directory per class. Unreadable files are skipped."""

    def __init__(self, root: str | Path, subset: str | Path | None = None):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"dataset path '{root}' does not exist or is not a directory")
        self.root = root
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            for p in sorted((root / cls).rglob("*")):
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                    files.append((p, label))
        self.subset_lines, self.subset_unmatched = 0, []  # lines of the subset file, those naming no image
        if subset is not None:
            files, self.subset_lines, self.subset_unmatched = _apply_subset(root, files, Path(subset))
            self.subset = str(subset)
        if not files:
            raise UserError(f"dataset path '{root}' holds no images in class sub-directories")
        self.files = [f for f, _ in files]
        self.labels = np.array([label for _, label in files], dtype=np.int64)
        self.name = str(root)
        self.skipped = 0

    def load(self, index: int) -> Image.Image:
        return read_rgb(self.files[index])

    def open(self, index: int) -> Image.Image:
        return open_image(self.files[index])

    def item_name(self, index: int) -> str:
        return str(self.files[index])

    def subset_note(self) -> str | None:
        """One line on the subset file's lines that name no image here, if there are any."""
        if not self.subset_unmatched:
            return None
        n = len(self.subset_unmatched)
        return (f"{n:,} of {self.subset_lines:,} lines of the subset file '{self.subset}' name no image "
                f"under '{self.root}' and are ignored (first: {self.subset_unmatched[0]})")


def read_rgb(path: Path) -> Image.Image:
    """An image file as 8-bit RGB (see `open_image` and `as_rgb`). Raises OSError or ValueError
    for a file that cannot be used."""
    return as_rgb(open_image(path))


def _apply_subset(root: Path, files: list[tuple[Path, int]], subset: Path) -> tuple[list, int, list[str]]:
    """Keep the files named in `subset`: one per line, as a relative path or a bare file name.
    Returns the kept (file, label) pairs, the number of distinct lines, and the lines that name
    no file (in file order)."""
    check_file(subset, "subset file")
    try:
        text = subset.read_text()
    except UnicodeDecodeError:
        raise UserError(
            f"subset file '{subset}' is not text: it lists image file names, one per line"
        ) from None
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    wanted = set(lines)
    kept, matched = [], set()
    for f, label in files:
        names = {f.name, f.relative_to(root).as_posix()} & wanted
        if names:
            kept.append((f, label))
            matched |= names
    if not kept:
        raise UserError(f"subset file '{subset}' names no image under '{root}'")
    return kept, len(lines), [line for line in lines if line not in matched]


def has_separator(name: str) -> bool:
    """Whether a --dataset value is written as a path (holds a directory separator)."""
    return any(sep and sep in name for sep in ("/", os.sep, os.altsep))


def has_labelled_splits(name: str) -> bool:
    """Whether the data set `name` has a labelled split to train a probe on and one to test it
    on: the sets known by name, the transfer sets, an ImageFolder tree with train/ and val/ (or
    test/), a prepared set with a val split. Looks at the layout only; opening may still fail."""
    if name in BUILTIN or parse_name(name) is not None:
        return True
    root = Path(name).expanduser()
    if is_prepared(root):
        return (root / members_name("val")).is_file()
    return (root / "train").is_dir() and any((root / v).is_dir() for v in ("val", "test"))


def missing_dataset(name: str, names: str) -> UserError:
    """The error for a --dataset value that is neither a known name nor an existing path:
    written as a path, it is a path that does not exist; else `names` lists what would do."""
    if has_separator(name):
        return UserError(f"dataset path does not exist: {name}", key="dataset")
    return UserError(f"unknown dataset '{name}': use {names}", key="dataset")


def train_images(name: str, subset: str | None = None, root: str | Path | None = None) -> int:
    """How many training images a data set has: from `TRAIN_IMAGES` for a name, else counted."""
    if subset is None and name in TRAIN_IMAGES:
        return TRAIN_IMAGES[name]
    return len(open_dataset(name, "train", subset, root=root))


def open_dataset(name: str, split: str = "train", subset: str | None = None,
                 root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """`digits`, `count`, `cifar10`/`cifar100` (from `root`, see `stoptool.data.cifar`), a
    transfer set `KIND:PATH` (`stoptool.data.transfer`), or a path to an ImageFolder tree (its
    `split` sub-directory when present)."""
    transfer = parse_name(name)
    if (name in BUILTIN or transfer) and subset is not None:
        raise UserError(f"subset keeps images of an ImageFolder tree; {name} has none to name")
    if transfer is not None:
        return _transfer(*transfer, split)
    if name == "digits":
        return digits(split)
    if name == "count":
        return count_dataset(split)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, split, root, download)
    path = Path(name).expanduser()
    if not path.exists() and name.lower() == "imagenet":  # the paper presets name it so
        raise UserError(
            "ImageNet is not bundled: set dataset to the path of an ImageFolder tree of it "
            "(train/ and val/, one folder per class)"
        )
    if not path.exists():
        raise missing_dataset(name, "digits, count, cifar10, cifar100 or a path to an ImageFolder directory "
                              "or to a set stoptool prepare wrote")
    if is_prepared(path):
        if subset is not None:
            raise UserError("subset keeps images of an ImageFolder tree, not of a prepared set", key="subset")
        return ShardDataset(path, "val" if split in ("val", "test") else split)
    if (path / split).is_dir():
        path = path / split
    return FolderDataset(path, subset)


def _transfer(kind: str, path: str, split: str) -> ImageDataset:
    """A transfer set from its release; Places205 may also come as train/ and val/ class
    folders (its images sorted into one folder per class)."""
    root = Path(path).expanduser()
    folder = root / ("train" if split == "train" else "val")
    if kind == "places205" and not (root / "trainvalsplit_places205").is_dir() and folder.is_dir():
        return FolderDataset(folder)
    return open_transfer(kind, root, split)
