"""Prepared image sets: WebDataset tar shards that `stoptool prepare` writes, and their reader.

A prepared directory holds, per split (`train`, and `val` when the source had one):

- `{split}-000000.tar`, ...: uncompressed tar shards in the WebDataset layout, two members per
  image, `KEY.jpg` (the JPEG) and `KEY.cls` (the class number as ASCII digits), KEY being the
  image's row number written with eight digits. Any WebDataset reader can stream them.
- `{split}.members.npy`: int64 [N, 4], one row per image in shard order: shard number, byte
  offset of the JPEG's data inside that shard, its size in bytes, class number. It lets the
  reader fetch any image with one read, so a run can start anywhere in an epoch.
- `{split}.files.txt`: the source image of each row, one per line.

and one `index.json` (`INDEX`): format and version, the class names, the settings it was
written with, and per split the shards (name, images, bytes) and the images skipped.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from stoptool.data.base import ImageDataset, as_rgb, open_image
from stoptool.data.loader import stream_seed
from stoptool.errors import UserError

INDEX = "index.json"
FORMAT = "stoptool-shards"
VERSION = 1
KEY_DIGITS = 8
LANES = 8  # streams a process's share of an epoch is read in (see `ShardDataset.epoch_batches`)
SHUFFLE_BUFFER = 1000  # images a stream's shuffle buffer holds


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def members_name(split: str) -> str:
    return f"{split}.members.npy"


def files_name(split: str) -> str:
    return f"{split}.files.txt"


def is_prepared(path: Path) -> bool:
    """Whether `path` is a directory `stoptool prepare` wrote."""
    try:
        return json.loads((Path(path) / INDEX).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_index(root: Path) -> dict:
    try:
        index = json.loads((root / INDEX).read_text())
    except (OSError, ValueError):
        raise UserError(f"'{root}' is not a prepared image set (no readable {INDEX})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"'{root}' is not a prepared image set ({INDEX} is not stoptool's)")
    if index.get("version", 0) > VERSION:
        raise UserError(f"'{root}' was prepared by a newer stoptool (format {index['version']}); "
                        "update stoptool to read it")
    return index


class ShardDataset(ImageDataset):
    """One split of a prepared directory. Any image is one read away (`members`), so the
    loader can start anywhere in an epoch; pretraining reads each process's share of an
    epoch as streams over its shards (`epoch_batches`). Opening checks that every shard is
    there at its recorded size: a missing or cut shard is one clear error before any training."""

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        index = read_index(self.root)
        splits = index.get("splits", {})
        if split not in splits:
            raise UserError(f"'{self.root}' was prepared without a {split} split (it has: "
                            f"{', '.join(splits) or 'none'})")
        info = splits[split]
        self.shards = [self.root / s["name"] for s in info["shards"]]
        for shard, s in zip(self.shards, info["shards"], strict=True):
            if not shard.is_file():
                raise UserError(f"shard '{shard}' of the prepared set is missing: prepare the set again")
            if shard.stat().st_size != s["bytes"]:
                raise UserError(f"shard '{shard}' is {shard.stat().st_size:,} bytes, not the {s['bytes']:,} "
                                "it was written with: prepare the set again")
        self.members = self._members(split, info["images"], len(self.shards))
        self.labels = self.members[:, 3].copy()
        self.classes = list(index["classes"])
        self.name, self.split, self.skipped_at_prepare = f"{self.root}/{split}", split, info.get("skipped", 0)
        self._files: dict[int, object] = {}
        self._pid = None

    def _members(self, split: str, images: int, shards: int) -> np.ndarray:
        path = self.root / members_name(split)
        try:
            members = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            raise UserError(f"'{path}' is missing or unreadable: prepare the set again") from None
        if members.shape != (images, 4) or members.dtype != np.int64 or (
                images and not 0 <= members[:, 0].min() <= members[:, 0].max() < shards):
            raise UserError(f"'{path}' does not match {INDEX}: prepare the set again")
        return members

    def raw(self, index: int) -> bytes:
        """The JPEG bytes of image `index`. Raises OSError where the shard is cut short."""
        shard, offset, size = (int(v) for v in self.members[index, :3])
        f = self._file(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"shard cut short: {len(data)} of {size} bytes")
        return data

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a loader worker: its own handles, not the parent's offsets
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open, per process)
        return self._files[shard]

    def open(self, index: int) -> Image.Image:
        return open_image(self.raw(index))

    def load(self, index: int) -> Image.Image:
        return as_rgb(self.open(index))

    def item_name(self, index: int) -> str:
        return f"{self.shards[int(self.members[index, 0])]}:{index:0{KEY_DIGITS}d}.jpg"

    def identity(self) -> bytes:
        index = (self.root / INDEX).read_bytes()
        stats = "".join(f"{s.name}|{s.stat().st_size}|{s.stat().st_mtime_ns}\n" for s in self.shards)
        return index + stats.encode()

    def __getstate__(self):  # (to loader workers: without open files)
        return {**self.__dict__, "_files": {}, "_pid": None}

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                      world: int = 1):
        """Batches of keys (epoch, batch, row) as `loader.epoch_batches` gives them, in an order
        that reads shards as streams: the shards are shuffled per (seed, epoch) and laid end to
        end; process `rank` takes the `rank`-th contiguous share of what whole batches use; that
        share is cut into `LANES` contiguous streams, each shuffled by a buffer of
        `SHUFFLE_BUFFER` images (seeded per seed, epoch, rank, stream), and batch b comes from
        stream b % LANES. A loader worker thus reads a few regions of a few shards, forward."""
        local = batch_size // world
        steps = len(self) // batch_size
        share = self._epoch_rows(seed, epoch)[rank * steps * local:(rank + 1) * steps * local]
        lanes, at = [], 0
        for lane in range(LANES):
            count = len(range(lane, steps, LANES)) * local
            rng = random.Random(stream_seed(seed, epoch, rank, lane, -5))
            lanes.append(buffer_shuffle(share[at:at + count], rng))
            at += count
        for b in range(start, steps):
            lane, k = b % LANES, b // LANES
            yield [(epoch, b, int(row)) for row in lanes[lane][k * local:(k + 1) * local]]

    def _epoch_rows(self, seed: int, epoch: int) -> np.ndarray:
        """Every row, shard after shard in the epoch's shuffled shard order."""
        order = list(range(len(self.shards)))
        random.Random(stream_seed(seed, epoch, -4)).shuffle(order)
        by_shard = self.members[:, 0]
        rows = np.arange(len(self))
        return np.concatenate([rows[by_shard == s] for s in order]) if order else rows


def buffer_shuffle(rows: np.ndarray, rng: random.Random, size: int = SHUFFLE_BUFFER) -> list[int]:
    """`rows` in the order a shuffle buffer of `size` gives them: fill it, then for each
    further row hand out a random one of the buffer and put the new row in its place; at the
    end hand out the rest in random order."""
    rows = rows.tolist()
    buffer, out = rows[:size], []
    for row in rows[size:]:
        k = rng.randrange(len(buffer))
        out.append(buffer[k])
        buffer[k] = row
    rng.shuffle(buffer)
    return out + buffer
