"""`stoptool prepare`: an image set written once as the tar shards of `stoptool.data.shards`, its
images shrunk to the short side training crops from, so that an epoch reads a few large files
in order instead of a million small ones.

Sources: an ImageFolder tree (`train/` and optionally `val/`, or the class folders alone, a
train split), CIFAR-10/100 (its test split becomes `val`), or a transfer set in its release
layout (`clevr-count:PATH`, `clevr-dist:PATH`, `inat18:PATH`, `places205:PATH`; its train and
val splits, labels from the release's lists). Each split is shuffled once, with
the seed, so that every shard mixes the classes. A JPEG already small enough is copied byte for
byte (no second generation of JPEG loss); any other image is decoded (a large JPEG at a reduced
scale where that still leaves enough pixels), shrunk and encoded as JPEG. Images that cannot be
read are skipped and listed. Everything is written into a hidden sibling of the destination and
renamed into place at the end, so the destination is whole or absent.
"""

import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from decimal import Decimal
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from stoptool.data.base import ImageDataset, as_rgb, open_image
from stoptool.data.cifar import load_cifar
from stoptool.data.datasets import FolderDataset, open_dataset
from stoptool.data.shards import (
    FORMAT,
    INDEX,
    KEY_DIGITS,
    VERSION,
    files_name,
    is_prepared,
    members_name,
    shard_name,
)
from stoptool.data.transfer import parse_name
from stoptool.errors import UserError, plural
from stoptool.io.paths import check_writable, size_text
from stoptool.options import option

Progress = Callable[[str, int, int], None]  # (split, images done, images in the split)
Encoder = Callable[[Iterable], Iterator[tuple[bytes | None, str]]]  # images in, (JPEG or None, reason) out
CIFAR = ("cifar10", "cifar100")
MIN_SHORT_SIDE = 16
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)
CHUNK = 16  # images handed to a worker at a time: fewer round trips, order kept by imap



@dataclass
class PrepareOptions:
    """`stoptool prepare`'s options (see `stoptool.options`)."""

    src: str = option(
        None, "An ImageFolder tree (train/ and optionally val/, one folder per class in each; or the class "
        "folders alone, a train split), cifar10 | cifar100 (from --data-root; its test split becomes "
        "val), or a transfer set in its release layout: clevr-count:PATH | clevr-dist:PATH | inat18:PATH | "
        "places205:PATH.",
        argument=True, required=True)
    dst: str = option(None, "The directory to write: new or empty.", argument=True, required=True)
    short_side: int = option(256, "Shrink images whose short side is longer to this many pixels, aspect kept "
                             "(at least 16); JPEGs already this small are copied unchanged.")
    shard_size: str = option("1GB", "Largest shard: bytes, or with a unit: 64KB, 500MB, 1GB (decimal), 1GiB "
                             "(binary).")
    quality: int = option(90, "JPEG quality (1 to 100) of the images re-encoded.")
    workers: int | None = option(None, "Processes that decode and encode images; 0 = in this one. The output "
                                 "is the same for any number.", default_text="the CPUs available")
    seed: int = option(0, "Seed of the order images are written in (shuffled once, so every shard mixes the "
                       "classes).", low=0, high=2**32 - 1)
    data_root: str | None = option(None, "Where CIFAR's release archive or extracted folder lives.",
                                   default_text="~/.cache/stoptool/data")

def skipped_name(split: str) -> str:
    return f"{split}.skipped.txt"


def partial_dir(dst: Path) -> Path:
    """Where the set is written before it is renamed to `dst`."""
    return dst.parent / f".{dst.name}.partial"


@dataclass(frozen=True)
class Settings:
    """What the images were written with (recorded in the index)."""

    short_side: int = 256
    shard_size: int = 10**9  # bytes
    quality: int = 90
    seed: int = 0


def parse_size(text: str) -> int:
    """Bytes from `1GB`, `500MB`, `64KB` (decimal), `1GiB`, `512MiB` (binary) or `2000000`."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise UserError(f"a shard size is bytes with an optional unit, e.g. 1GB, 500MB, 64KB, 1GiB or "
                        f"2000000; got '{text}'", key="shard_size")
    number, unit = match.groups()
    return int(Decimal(number) * UNITS[(unit or "b").lower()])


def check_settings(short_side: int, shard_size: int | str, quality: int, seed: int) -> Settings:
    size = parse_size(shard_size) if isinstance(shard_size, str) else shard_size
    if size <= 0:
        raise UserError(f"the shard size must be more than 0 bytes, got {shard_size}", key="shard_size")
    if short_side < MIN_SHORT_SIDE:
        raise UserError(f"the short side must be at least {MIN_SHORT_SIDE} pixels, got {short_side}",
                        key="short_side")
    if not 1 <= quality <= 100:
        raise UserError(f"the JPEG quality runs from 1 to 100, got {quality}", key="quality")
    if seed < 0:
        raise UserError(f"the seed must be 0 or more, got {seed}", key="seed")
    return Settings(short_side, size, quality, seed)


# ---------------------------------------------------------------------- one image


def target_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """The size an image of `size` is written at: its short side brought down to `short_side`,
    the aspect kept; an image no larger keeps its size (images are never enlarged)."""
    w, h = size
    if min(w, h) <= short_side:
        return w, h
    if w <= h:
        return short_side, round(h * short_side / w)
    return round(w * short_side / h), short_side


def encode(item: Path | np.ndarray, short_side: int, quality: int) -> bytes:
    """The JPEG of one image (a file, or uint8 [H, W, 3] pixels) as a shard holds it. Raises
    OSError or ValueError for a file that cannot be read."""
    if isinstance(item, np.ndarray):
        img = Image.fromarray(item)
        return _shrink(img, target_size(img.size, short_side), quality)
    raw = item.read_bytes()
    img = open_image(raw)  # (as the loaders open it: a decompression bomb is a ValueError)
    size = target_size(img.size, short_side)
    if img.format == "JPEG" and size == img.size:
        img.load()  # a truncated file fails here, not in the middle of a training run
        return raw
    img.draft(None, size)  # a JPEG decodes at 1/2, 1/4 or 1/8 scale while that leaves `size`
    return _shrink(as_rgb(img), size, quality)


def _shrink(img: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)  # Pillow widens the filter: antialiased
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def encode_or_skip(item: Path | np.ndarray, short_side: int, quality: int) -> tuple[bytes | None, str]:
    """`encode`'s bytes and "", or None and why the image cannot be read (on one line)."""
    try:
        return encode(item, short_side, quality), ""
    except (OSError, ValueError) as err:
        text = str(err).replace(f" {str(item)!r}", "")  # Pillow repeats the file name
        return None, " ".join(text.split()) or type(err).__name__


# ---------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Source:
    """One split of the source: its images and labels, and where its files are."""

    data: ImageDataset
    root: Path | None = None  # the split's folder; None for images held in memory (CIFAR)

    def item(self, i: int) -> Path | np.ndarray:
        """What a worker gets for image `i`: a file name, or the pixels."""
        return self.data.files[i] if self.root is not None else np.asarray(self.data.load(i))

    def name(self, i: int) -> str:
        """How `files.txt` names image `i`: its path under the split's folder, or e.g. `cifar10/train[7]`."""
        if self.root is None:
            return self.data.item_name(i)
        return self.data.files[i].relative_to(self.root).as_posix()


def open_source(src: str | Path, data_root: str | Path | None = None
                ) -> tuple[dict[str, Source], list[str], str]:
    """The splits of `src`, its class names, and how the index names it."""
    if str(src) in CIFAR:
        train, val = (load_cifar(str(src), split, data_root) for split in ("train", "test"))
        return {"train": Source(train), "val": Source(val)}, list(train.classes), str(src)
    if parse_name(str(src)) is not None:  # a transfer set: its release's lists give files and labels
        splits = {split: open_dataset(str(src), split) for split in ("train", "val")}
        sources = {split: Source(data, data.root) for split, data in splits.items()}
        _check_same_classes(sources["train"], sources["val"])
        kind, path = parse_name(str(src))
        return sources, list(splits["train"].classes), f"{kind}:{Path(path).expanduser().resolve()}"
    path = Path(src).expanduser()
    if not path.is_dir():
        raise UserError(f"source '{path}' is not a directory: give an ImageFolder tree (train/ and val/, "
                        "or one folder per class), cifar10 or cifar100")
    roots = {"train": path / "train", "val": path / "val"} if (path / "train").is_dir() else {"train": path}
    splits = {split: Source(FolderDataset(root), root) for split, root in roots.items() if root.is_dir()}
    if "val" in splits:
        _check_same_classes(splits["train"], splits["val"])
    return splits, list(splits["train"].data.classes), str(path.resolve())


def _check_same_classes(train: Source, val: Source) -> None:
    """A label is a class's position in the sorted folder names: both splits need the same list."""
    ours, theirs = set(train.data.classes), set(val.data.classes)
    if ours == theirs:
        return
    differences = [f"only in {where}: {', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''}"
                   for where, names in (("train", ours - theirs), ("val", theirs - ours)) if names]
    raise UserError(f"the class folders of '{val.root}' differ from those of '{train.root}' "
                    f"({'; '.join(differences)}): both splits need the same classes")


# ---------------------------------------------------------------------- the destination


def check_destination(dst: Path) -> None:
    """`dst` is new or an empty directory, and its parent takes the partial directory."""
    check_writable(dst, beside=(partial_dir(dst).name,))
    if not dst.exists():
        return
    if not dst.is_dir():
        raise UserError(f"'{dst}' exists and is not a directory: choose a new or empty directory")
    if is_prepared(dst):
        raise UserError(f"'{dst}' already holds a prepared set: remove it or choose another directory")
    if any(dst.iterdir()):
        raise UserError(f"'{dst}' is not empty: choose a new or empty directory")


# ---------------------------------------------------------------------- writing


class ShardWriter:
    """The shards of one split: images go in in order, and a new shard starts when the next image
    would take the current one past `limit` bytes (a shard holds at least one image)."""

    def __init__(self, folder: Path, split: str, limit: int):
        self.folder, self.split, self.limit = folder, split, limit
        self.tar: tarfile.TarFile | None = None
        self.shards: list[dict] = []  # name, images, bytes: as the index lists them
        self.rows: list[tuple[int, int, int, int]] = []  # shard, data offset, size, label

    def add(self, jpeg: bytes, label: int) -> None:
        key = f"{len(self.rows):0{KEY_DIGITS}d}"
        cls = str(label).encode()
        members = [(_member(f"{key}.jpg", len(jpeg)), jpeg), (_member(f"{key}.cls", len(cls)), cls)]
        headers = [len(info.tobuf(tarfile.USTAR_FORMAT)) for info, _ in members]
        grown = sum(headers) + sum(_padded(len(data)) for _, data in members)
        if self.tar is not None and _closed_size(self.tar.offset + grown) > self.limit:
            self.close()
        if self.tar is None:
            self._open()
        self.rows.append((len(self.shards) - 1, self.tar.offset + headers[0], len(jpeg), label))
        for info, data in members:
            self.tar.addfile(info, io.BytesIO(data))
        self.shards[-1]["images"] += 1

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self.tar = tarfile.open(self.folder / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "images": 0, "bytes": 0})

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
            self.shards[-1]["bytes"] = (self.folder / self.shards[-1]["name"]).stat().st_size


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar member with nothing that depends on when or by whom it was written."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    return info


def _padded(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _closed_size(offset: int) -> int:
    """A tar's file size once closed at `offset`: two zero blocks, then padded to a record."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write_split(split: str, source: Source, settings: Settings, encode_all: Encoder, folder: Path,
                progress: Progress | None = None) -> dict:
    """Write one split into `folder` in its seeded order; returns its entry of the index."""
    order = np.random.default_rng(settings.seed).permutation(len(source.data))
    writer = ShardWriter(folder, split, settings.shard_size)
    names, skipped = [], []
    if progress:
        progress(split, 0, len(order))
    try:
        results = encode_all(source.item(i) for i in order)
        for done, (i, (jpeg, reason)) in enumerate(zip(order, results), 1):
            if jpeg is None:
                skipped.append((source.name(i), reason))
            else:
                writer.add(jpeg, int(source.data.labels[i]))
                names.append(source.name(i))
            if progress:
                progress(split, done, len(order))
    finally:
        writer.close()
    if not names:
        raise UserError(f"no readable image in '{source.data.name}' (first: {': '.join(skipped[0])})")
    _write_lists(folder, split, np.array(writer.rows, dtype=np.int64), names, skipped)
    return {"images": len(names), "skipped": len(skipped), "shards": writer.shards}


def _write_lists(folder: Path, split: str, rows: np.ndarray, names: list[str],
                 skipped: list[tuple[str, str]]) -> None:
    np.save(folder / members_name(split), rows)
    (folder / files_name(split)).write_text("".join(f"{name}\n" for name in names))
    if skipped:
        (folder / skipped_name(split)).write_text("".join(f"{name}\t{reason}\n" for name, reason in skipped))


def available_cpus() -> int:
    """The cores this process may run on (its affinity, where the system tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def encoder(settings: Settings, workers: int) -> Iterator[Encoder]:
    """Encode images in order, in `workers` processes (0: in this one)."""
    work = partial(encode_or_skip, short_side=settings.short_side, quality=settings.quality)
    if workers == 0:
        yield lambda items: map(work, items)
        return
    with multiprocessing.Pool(workers, initializer=_ignore_interrupts) as pool:
        yield lambda items: pool.imap(work, items, chunksize=CHUNK)


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the workers too: the main process alone handles it (it ends the pool and
    removes the partial directory), without a traceback from every worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare(src: str | Path, dst: str | Path, short_side: int = 256, shard_size: int | str = 10**9,
            quality: int = 90, seed: int = 0, workers: int | None = None,
            data_root: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Write `src` (an ImageFolder tree, cifar10, cifar100 or a transfer set KIND:PATH) into the
    new directory `dst` as a
    prepared set; returns its index. `workers` defaults to the CPUs this process may use;
    `progress(split, done, total)` is called as images are written."""
    settings = check_settings(short_side, shard_size, quality, seed)
    if workers is not None and workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}", key="workers")
    dst = Path(dst).expanduser()
    check_destination(dst)
    splits, classes, source = open_source(src, data_root)
    partial_path = partial_dir(dst)
    if partial_path.exists():  # left by an interrupted run
        shutil.rmtree(partial_path)
    partial_path.mkdir(parents=True)
    try:
        with encoder(settings, available_cpus() if workers is None else workers) as encode_all:
            written = {split: write_split(split, s, settings, encode_all, partial_path, progress)
                       for split, s in splits.items()}
        index = {"format": FORMAT, "version": VERSION, "classes": classes, "settings": asdict(settings),
                 "source": source, "splits": written}
        (partial_path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if dst.is_dir():
            dst.rmdir()  # empty (checked): the rename takes its place
        os.replace(partial_path, dst)
    except BaseException:
        shutil.rmtree(partial_path, ignore_errors=True)
        raise
    return index


def describe(index: dict, dst: str | Path) -> str:
    """One line on a prepared set: images and shards per split, size, images skipped, where."""
    splits = index["splits"]
    parts = [f"{split} {s['images']:,} images in {plural(len(s['shards']), 'shard')}"
             for split, s in splits.items()]
    total = sum(shard["bytes"] for s in splits.values() for shard in s["shards"])
    skipped = sum(s["skipped"] for s in splits.values())
    listed = ", ".join(skipped_name(split) for split, s in splits.items() if s["skipped"])
    unreadable = f"{skipped:,} unreadable skipped" + (f" (listed in {listed})" if skipped else "")
    return f"prepared {', '.join(parts)}; {size_text(total)}; {unreadable}; in {dst}"

