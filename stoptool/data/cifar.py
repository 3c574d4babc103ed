"""CIFAR-10 and CIFAR-100 from the standard python-version release, read without trusting it.

A data root holds the release archive (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`)
or the folder it extracts to (`cifar-10-batches-py/`, `cifar-100-python/`). `download=True`
fetches the archive (checked against its published MD5) when the network allows.

The release files are Python pickles: dicts of byte strings, lists of ints and one uint8
numpy array. They are read with an unpickler that can build exactly those (three numpy
names for the array) and refuses any other callable, so a file crafted to run code fails
with a clear error instead of running it.
"""

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stoptool.data.base import ArrayDataset
from stoptool.errors import UserError
from stoptool.io.paths import check_writable


@dataclass(frozen=True)
class Release:
    name: str
    archive: str
    folder: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


RELEASES = {
    "cifar10": Release(
        "CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
        "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        "labels", "label_names",
    ),
    "cifar100": Release(
        "CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python",
        "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
    ),
}
URL = "https://www.cs.toronto.edu/~kriz/"


def default_data_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stoptool" / "data"


# ---------------------------------------------------------------------- safe unpickling


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# The only globals a release file may name: how numpy pickles an ndarray (module spelled as
# numpy 1.x, which wrote the release, or as numpy 2.x does).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class UnsafePickle(ValueError):
    pass


class _ReleaseUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise UnsafePickle(f"it references {module}.{name}, which a CIFAR file never does")
        return make()

    def persistent_load(self, pid):
        raise UnsafePickle("it uses persistent ids, which a CIFAR file never does")


def safe_load(raw: bytes, what: str) -> dict:
    """Unpickle a release file: only dicts, lists, strings, numbers and plain numpy arrays."""
    try:
        obj = _ReleaseUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except UnsafePickle as err:
        raise UserError(f"refusing to read {what}: {err}") from None
    except Exception as err:  # a truncated or foreign file: any unpickling error
        raise UserError(f"{what} is not a CIFAR python-version file ({type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} is not a CIFAR python-version file (not a dict)")
    out = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin1")
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise UserError(f"refusing to read {what}: it holds an object array")
        out[key] = value
    return out


# ---------------------------------------------------------------------- reading the release


def _read_members(release: Release, root: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """Raw bytes of release files, from the extracted folder or straight from the archive."""
    folder = root / release.folder
    if folder.is_dir() and all((folder / n).is_file() for n in names):
        return {n: (folder / n).read_bytes() for n in names}
    archive = root / release.archive
    if not archive.is_file():
        raise UserError(
            f"{release.name} not found: put {release.archive} (the python version, from "
            f"{URL}) or its extracted folder {release.folder}/ in {root}, or turn on download"
        )
    wanted = {f"{release.folder}/{n}": n for n in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # one pass: a gzip stream is cheap to read forward only
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"'{archive}' is not a readable {release.name} archive: {err}") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"'{archive}' lacks {release.folder}/{missing[0]}: not the python-version release")
    return found


def _to_images(data, what: str) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{what} holds no [N, 3072] uint8 'data' array")
    # Each row is 1024 red, 1024 green, 1024 blue values of a 32×32 image in raster order.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def load_cifar(name: str, split: str = "train", root: str | Path | None = None,
               download: bool = False) -> ArrayDataset:
    """`name` is cifar10 or cifar100 (fine labels); `split` is train or test."""
    release = RELEASES[name]
    if split not in ("train", "test"):
        raise UserError(f"{release.name} has splits train and test, not '{split}'")
    root = Path(root).expanduser() if root is not None else default_data_root()
    if download:
        fetch(name, root)
    files = release.train_files if split == "train" else release.test_files
    raw = _read_members(release, root, files + (release.meta_file,))
    images, labels = [], []
    for f in files:
        what = f"{release.name} file '{f}'"
        batch = safe_load(raw[f], what)
        if "data" not in batch or release.label_key not in batch:
            raise UserError(f"{what} lacks 'data' or '{release.label_key}'")
        images.append(_to_images(batch["data"], what))
        labels.append(np.asarray(batch[release.label_key], dtype=np.int64))
        if len(labels[-1]) != len(images[-1]):
            raise UserError(f"{what} holds {len(images[-1])} images but {len(labels[-1])} labels")
    meta = safe_load(raw[release.meta_file], f"{release.name} file '{release.meta_file}'")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(release.names_key, [])]
    y = np.concatenate(labels)
    if not classes or y.min() < 0 or y.max() >= len(classes):
        raise UserError(f"{release.name} labels do not match the class names in '{release.meta_file}'")
    return ArrayDataset(f"{name}/{split}", np.concatenate(images), y, classes)


def fetch(name: str, root: Path) -> Path:
    """Download the release archive into `root` (atomically, MD5-checked) unless present."""
    release = RELEASES[name]
    target = root / release.archive
    if target.is_file() or (root / release.folder).is_dir():
        return target
    if root.exists() and not root.is_dir():
        raise UserError(f"data_root '{root}' is not a directory")
    check_writable(target)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{release.archive}.", dir=root)
    md5 = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL + release.archive, timeout=30) as resp:
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        if md5.hexdigest() != release.md5:
            raise UserError(f"downloaded {release.archive} has the wrong MD5 checksum; try again")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as err:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(
            f"cannot download {release.archive} ({getattr(err, 'reason', err)}): put it (from "
            f"{URL}) in {root} by hand"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
