"""The transfer sets of the paper's Table 4, read where their releases put them: CLEVR v1.0
(two tasks, Count and Dist), iNaturalist 2018 and Places205. No conversion step: the scene
descriptions, the COCO-style annotations and the split lists are the labels.

`stoptool.data.datasets.open_dataset` opens them by a prefixed name, `KIND:PATH`:

| name | PATH holds | classes |
|---|---|---|
| `clevr-count:PATH` | `images/{train,val}/CLEVR_*.png`, `scenes/CLEVR_{train,val}_scenes.json` | 8 |
| `clevr-dist:PATH` | the same | 6 |
| `inat18:PATH` | `train2018.json`, `val2018.json`, `train_val2018/...` | 8,142 |
| `places205:PATH` | `trainvalsplit_places205/{train,val}_places205.csv` and the images | 205 |

Each trains on its train split and is tested on its val split (`test` names val too).

PATH may also be the folder above CLEVR's `CLEVR_v1.0/`. A `places205:` tree with `train/`
and `val/` class folders instead of the lists is read as an ImageFolder tree (by `datasets`).
Every file a list names is checked to be there before any image is read: a list naming absent
images is a mistake to hear of at once. An image that is there but cannot be decoded is
skipped and counted later, as in every other set.

CLEVR images are 480 × 320: the probes squash them whole to the encoder's square input, as
VISSL's CLEVR benchmarks do (`eval_resize = "squash"`): a centre crop could cut objects away
and change the label.
"""

import bisect
import hashlib
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from stoptool.data.base import ImageDataset, as_rgb, open_image
from stoptool.errors import UserError, plural
from stoptool.io.paths import check_file

KINDS = ("clevr-count", "clevr-dist", "inat18", "places205")

# CLEVR/Count: a scene holds 3 to 10 objects; the class is the count minus 3 (VTAB's
# `_count_preprocess_fn`: `tf.size(objects.size) - 3`, 8 classes).
COUNT_RANGE = (3, 10)
# CLEVR/Dist: the depth (`pixel_coords[2]`) of the scene's nearest object, cut at these values.
DIST_THRESHOLDS = (8.0, 8.5, 9.0, 9.5, 10.0)
PLACES_IMAGE_DIRS = ("data/vision/torralba/deeplearning/images256", "images256", ".")


def count_label(objects: int) -> int:
    """CLEVR/Count's class of a scene with `objects` objects: 3 -> 0, ..., 10 -> 7."""
    low, high = COUNT_RANGE
    if not low <= objects <= high:
        raise ValueError(f"a CLEVR scene holds {low} to {high} objects, this one {objects}")
    return objects - low


def dist_label(depth: float) -> int:
    """CLEVR/Dist's class of a scene whose nearest object lies at `depth`.

    Class k holds the depths in (t[k-1], t[k]] for the thresholds t = 8.0, 8.5, 9.0, 9.5, 10.0:
    a depth equal to a threshold falls in the class *below* it (8.0 -> 0, 8.5 -> 1, 8.7 -> 2,
    10.0 -> 4, above 10.0 -> 5). This is VTAB's rule (task_adaptation/data/clevr.py,
    `_closest_object_preprocess_fn`: the label is the largest k with thrs[k] < depth for
    thrs = [0, 8, 8.5, 9, 9.5, 10, 100]) and VISSL's (extra_scripts/datasets/
    create_clevr_dist_data_files.py: `bisect_left` into [8, 8.5, 9, 9.5, 10, 100]). Both cap the
    last class at 100, a depth no CLEVR scene comes near; here every depth above 10 is class 5.
    """
    return bisect.bisect_left(DIST_THRESHOLDS, depth)


DIST_CLASSES = ["<=8.0", *(f"({a},{b}]" for a, b in zip(DIST_THRESHOLDS, DIST_THRESHOLDS[1:])), ">10.0"]
COUNT_CLASSES = [str(n) for n in range(COUNT_RANGE[0], COUNT_RANGE[1] + 1)]


def parse_name(name: str) -> tuple[str, str] | None:
    """(kind, path) of a `KIND:PATH` data set name, or None for any other name."""
    kind, sep, path = name.partition(":")
    return (kind, path) if sep and kind in KINDS else None


class FileListDataset(ImageDataset):
    """Images named by a release's own list (scenes, annotations, split files), with labels.

    `sources` are the files the list came from: with the names, they identify the set for the
    feature cache (`identity`) without a look at every image."""

    def __init__(self, name: str, root: Path, files: list[Path], labels: Iterable[int], classes: list[str],
                 sources: list[Path]):
        self.name, self.root, self.files, self.classes = name, root, files, classes
        self.labels = np.asarray(list(labels), dtype=np.int64)
        self.sources = sources

    def load(self, index: int) -> Image.Image:
        return as_rgb(self.open(index))

    def open(self, index: int) -> Image.Image:
        return open_image(self.files[index])

    def item_name(self, index: int) -> str:
        return str(self.files[index])

    def identity(self) -> bytes:
        """What the feature cache knows the set by: its list files (path, size, time) and the
        image paths they name; a million images are not looked at one by one."""
        h = hashlib.sha256(self.name.encode())
        for src in self.sources:
            st = src.stat()
            h.update(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        for f in self.files:
            h.update(f"{f}\n".encode())
        return h.digest()


class ClevrDataset(FileListDataset):
    """A CLEVR split: its scenes are fed whole, squashed to the encoder's square input."""

    eval_resize = "squash"


def open_transfer(kind: str, path: str | Path, split: str) -> ImageDataset:
    """Split `split` (train; val or test: the release's val) of the set `kind` at `path`."""
    if kind not in KINDS:
        raise UserError(f"unknown transfer set '{kind}': use one of {', '.join(KINDS)}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{kind} path '{root}' does not exist or is not a directory", key="dataset")
    root = root.resolve()  # (the feature cache knows a set by its files' full paths)
    split = {"train": "train", "val": "val", "test": "val"}.get(split)
    if split is None:
        raise UserError(f"{kind} has splits train and val")
    if kind.startswith("clevr"):
        return clevr(root, split, kind.split("-")[1])
    if kind == "inat18":
        return inat18(root, split)
    return places205(root, split)


# ---------------------------------------------------------------------------------- CLEVR


def clevr_root(path: Path) -> Path:
    """CLEVR_v1.0 itself, or the folder that holds it."""
    return path / "CLEVR_v1.0" if not (path / "scenes").is_dir() and (path / "CLEVR_v1.0").is_dir() else path


def clevr(path: Path, split: str, task: str) -> ClevrDataset:
    """CLEVR v1.0's `split` with the labels of `task` (count or dist)."""
    root = clevr_root(path)
    scenes = root / "scenes" / f"CLEVR_{split}_scenes.json"
    check_file(scenes, "CLEVR scenes file")
    names, counts, depths = _read_scenes(str(scenes), scenes.stat().st_mtime_ns)
    if task == "count":
        labels = [_label(count_label, n, scenes, i) for i, n in enumerate(counts)]
        classes = COUNT_CLASSES
    else:
        labels = [dist_label(d) for d in depths]
        classes = DIST_CLASSES
    folder = root / "images" / split
    files = _present(folder, names, scenes)
    return ClevrDataset(f"clevr-{task}/{split}", folder, files, labels, classes, [scenes])


def _label(rule, value, source: Path, index: int) -> int:
    try:
        return rule(value)
    except ValueError as err:
        raise UserError(f"'{source}': scene {index}: {err}") from None


@lru_cache(maxsize=4)
def _read_scenes(path: str, mtime_ns: int) -> tuple[list[str], list[int], list[float]]:
    """Image file names, object counts and nearest depths of a scenes file (parsed once per
    process: Count and Dist read the same one; `mtime_ns` makes a rewritten file a new entry)."""
    doc = _read_json(Path(path), "CLEVR scenes file")
    scenes = doc.get("scenes") if isinstance(doc, dict) else None
    if not isinstance(scenes, list) or not scenes:
        raise UserError(f"CLEVR scenes file '{path}' holds no 'scenes' list")
    names, counts, depths = [], [], []
    for i, scene in enumerate(scenes):
        try:
            objects = scene["objects"]
            depth = min(float(o["pixel_coords"][2]) for o in objects)
            names.append(str(scene["image_filename"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise UserError(f"CLEVR scenes file '{path}': scene {i} lacks 'image_filename' or objects with "
                            "'pixel_coords' [x, y, depth]") from None
        counts.append(len(objects))
        depths.append(depth)
    return names, counts, depths


# ---------------------------------------------------------------------------------- iNat18


def inat18(root: Path, split: str) -> FileListDataset:
    """iNaturalist 2018 from `train2018.json` / `val2018.json` (COCO style: `images` with
    `id` and `file_name`, `annotations` with `image_id` and `category_id`, `categories` with
    `id`); `file_name` is relative to `root` (`train_val2018/<supercategory>/<id>/<hash>.jpg`).
    Class k is the k-th category id in increasing order (the release's ids run 0..8141, so the
    class is the id)."""
    source = root / f"{split}2018.json"
    check_file(source, "iNaturalist 2018 annotation file")
    doc = _read_json(source, "iNaturalist 2018 annotation file")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    if missing:
        raise UserError(f"iNaturalist 2018 annotation file '{source}' lacks the list '{missing[0]}' "
                        "(COCO style: images, annotations, categories)")
    try:
        category_ids = sorted({int(c["id"]) for c in doc["categories"]})
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in doc["categories"]}
        label_of = {int(a["image_id"]): int(a["category_id"]) for a in doc["annotations"]}
        images = [(int(im["id"]), str(im["file_name"])) for im in doc["images"]]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"iNaturalist 2018 annotation file '{source}': an entry lacks its 'id', 'file_name', "
                        "'image_id' or 'category_id'") from None
    index = {cid: k for k, cid in enumerate(category_ids)}
    labels = []
    for image_id, name in images:
        cid = label_of.get(image_id)
        if cid is None or cid not in index:
            what = "no annotation" if cid is None else f"category {cid}, which is not among its categories"
            raise UserError(f"iNaturalist 2018 annotation file '{source}': image {image_id} ({name}) "
                            f"has {what}")
        labels.append(index[cid])
    files = _present(root, [name for _, name in images], source)
    return FileListDataset(f"inat18/{split}", root, files, labels, [names[c] for c in category_ids], [source])


# ---------------------------------------------------------------------------------- Places205


def places205(root: Path, split: str) -> FileListDataset:
    """Places205 from its split lists, `trainvalsplit_places205/{train,val}_places205.csv`:
    one image a line, `relative/path.jpg LABEL` (space-separated, labels 0..204), the paths
    relative to the images' root (`data/vision/torralba/deeplearning/images256/` as the archive
    extracts, or `images256/`, or `root` itself). A class is named by its images' folder
    (`a/abbey/00000001.jpg` -> `abbey`); both lists are read for the names, so that the two
    splits have one list of classes."""
    lists = root / "trainvalsplit_places205"
    source = lists / f"{split}_places205.csv"
    check_file(source, "Places205 split list")
    names, labels = _read_places_list(source)
    classes = _places_classes([source] + [p for p in (lists / f"{s}_places205.csv" for s in ("train", "val"))
                                          if p != source and p.is_file()])
    image_root = next((root / d for d in PLACES_IMAGE_DIRS if (root / d / names[0]).is_file()), None)
    if image_root is None:
        where = ", ".join(f"'{root / d}'" for d in PLACES_IMAGE_DIRS)
        raise UserError(f"the first image of '{source}', {names[0]}, is not under {where}")
    files = _present(image_root, names, source)
    return FileListDataset(f"places205/{split}", image_root, files, labels, classes, [source])


@lru_cache(maxsize=4)
def _read_places_list_cached(path: str, mtime_ns: int) -> tuple[list[str], list[int]]:
    names, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            try:
                label = int(parts[1])
                if label < 0 or len(parts) != 2:
                    raise ValueError
            except (IndexError, ValueError):
                raise UserError(f"Places205 split list '{path}', line {number}: expected 'relative/path.jpg "
                                f"LABEL' (a label of 0 or more), got '{line.strip()[:80]}'") from None
            names.append(parts[0].lstrip("/"))
            labels.append(label)
    if not names:
        raise UserError(f"Places205 split list '{path}' names no image")
    return names, labels


def _read_places_list(path: Path) -> tuple[list[str], list[int]]:
    return _read_places_list_cached(str(path), path.stat().st_mtime_ns)


def _places_classes(lists: list[Path]) -> list[str]:
    named: dict[int, str] = {}
    for path in lists:
        names, labels = _read_places_list(path)
        for name, label in zip(names, labels):
            if label not in named:
                parts = name.split("/")[:-1]
                if len(parts) > 1 and len(parts[0]) == 1:  # the class name's initial (a/abbey): not its name
                    parts = parts[1:]
                named[label] = "/".join(parts) or str(label)
    return [named.get(k, str(k)) for k in range(max(named) + 1)]


# ---------------------------------------------------------------------------------- shared


def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{what} '{path}' is not valid JSON: {str(err).splitlines()[0][:120]}") from None


def _present(root: Path, names: list[str], source: Path) -> list[Path]:
    """The files `names` (relative to `root`) as paths, once every one is known to be there.

    Each folder is listed once (os.scandir) rather than each file looked up: a million files in
    a few thousand folders take seconds, not minutes, on a network filesystem."""
    listed: dict[Path, set[str]] = {}
    files, absent = [], []
    for name in names:
        f = root / name
        folder = f.parent
        if folder not in listed:
            try:
                with os.scandir(folder) as entries:
                    listed[folder] = {e.name for e in entries}
            except OSError:
                listed[folder] = set()
        if f.name not in listed[folder]:
            absent.append(name)
        files.append(f)
    if absent:
        verb = "is" if len(absent) == 1 else "are"
        raise UserError(f"'{source}' names {plural(len(absent), 'image')} that {verb} not under '{root}' "
                        f"(first: {absent[0]})")
    return files
