"""Miniature copies of the transfer sets' releases, in their published layouts, for the tests
(tests/data/test_transfer.py loads this file by path too).

- CLEVR v1.0: `CLEVR_v1.0/images/{split}/CLEVR_{split}_NNNNNN.png` (RGBA, as released) and
  `CLEVR_v1.0/scenes/CLEVR_{split}_scenes.json` ({"info", "scenes": [{"image_index",
  "image_filename", "split", "objects": [{"3d_coords", "pixel_coords": [x, y, depth], ...}],
  "relationships", "directions"}]}).
- iNaturalist 2018: `train2018.json`, `val2018.json` (COCO style) and
  `train_val2018/<supercategory>/<category id>/<hash>.jpg`.
- Places205: `trainvalsplit_places205/{train,val}_places205.csv` (`a/abbey/00000001.jpg 0`)
  and the images under `data/vision/torralba/deeplearning/images256/`.
- CIFAR-100: `cifar-100-python/{train,test,meta}` (pickles of byte-keyed dicts; protocol 3, whose
  bytes need no codecs call).

Each image's brightness tells its class apart, so a probe has something to find.
"""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng, level: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    w, h = size
    arr = np.clip(level + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert("RGBA") if mode == "RGBA" else img


def write_clevr(root: Path, scenes: dict[str, list[tuple[int, float]]], seed: int = 0) -> Path:
    """CLEVR_v1.0 under `root`; `scenes[split]` lists (objects, nearest depth) per image."""
    rng = np.random.default_rng(seed)
    base = root / "CLEVR_v1.0"
    (base / "scenes").mkdir(parents=True, exist_ok=True)
    for split, items in scenes.items():
        folder = base / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for i, (count, depth) in enumerate(items):
            name = f"CLEVR_{split}_{i:06d}.png"
            _image(rng, 20 + 25 * count, (24, 16), "RGBA").save(folder / name)
            objects = [{"color": "gray", "size": "large", "shape": "cube", "material": "rubber",
                        "3d_coords": [0.5, -1.0, 0.7], "rotation": 30.0,
                        "pixel_coords": [100 + 10 * j, 150, depth + 0.4 * j]} for j in range(count)]
            rng.shuffle(objects)  # the nearest object need not come first
            out.append({"image_index": i, "image_filename": name, "split": split, "objects": objects,
                        "relationships": {"left": [], "right": [], "front": [], "behind": []},
                        "directions": {}})
        doc = {"info": {"split": split, "license": "CC-BY 4.0", "version": "1.0", "date": "2/14/2017"},
               "scenes": out}
        (base / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps(doc))
    return base


def write_inat(root: Path, categories: list[int], per_class: dict[str, int], seed: int = 0) -> Path:
    """iNaturalist 2018 under `root`: `categories` are the category ids (any order),
    `per_class[split]` images of each."""
    rng = np.random.default_rng(seed)
    image_id = 1000
    for split, n in per_class.items():
        images, annotations = [], []
        for k, cid in enumerate(categories):
            for j in range(n):
                digest = hashlib.md5(f"{split}{cid}{j}".encode()).hexdigest()
                name = f"train_val2018/Plantae/{cid}/{digest}.jpg"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                _image(rng, 40 + 60 * k, (20, 28)).save(root / name, quality=95)
                images.append({"id": image_id, "width": 20, "height": 28, "file_name": name, "license": 1,
                               "rights_holder": "someone"})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": cid})
                image_id += 1
        cats = [{"id": cid, "name": f"species{cid}", "supercategory": "Plantae", "kingdom": "Plantae",
                 "phylum": "p", "class": "c", "order": "o", "family": "f", "genus": "g"}
                for cid in categories]
        doc = {"info": {"year": 2018, "version": "1.0"}, "images": images, "annotations": annotations,
               "categories": cats, "licenses": [{"id": 1, "name": "cc", "url": ""}]}
        (root / f"{split}2018.json").write_text(json.dumps(doc))
    return root


PLACES_CLASSES = ("a/abbey", "a/apartment_building/outdoor", "b/bamboo_forest")


def write_places(root: Path, per_class: dict[str, int],
                 images: str = "data/vision/torralba/deeplearning/images256", seed: int = 0) -> Path:
    """Places205 under `root`: the split lists and the images under `images`."""
    rng = np.random.default_rng(seed)
    (root / "trainvalsplit_places205").mkdir(parents=True, exist_ok=True)
    number = 1
    for split, n in per_class.items():
        lines = []
        for label, cls in enumerate(PLACES_CLASSES):
            for _ in range(n):
                name = f"{cls}/{number:08d}.jpg"
                (root / images / name).parent.mkdir(parents=True, exist_ok=True)
                _image(rng, 40 + 70 * label, (26, 26)).save(root / images / name, quality=95)
                lines.append(f"{name} {label}\n")
                number += 1
        (root / "trainvalsplit_places205" / f"{split}_places205.csv").write_text("".join(lines))
    return root


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """CIFAR-100's python-version folder under `root`, labels among the first 4 classes."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 4 for i in range(n)]
        pixels = np.stack([np.clip(40 + 50 * y + rng.normal(0, 8, (3, 32, 32)), 0, 255) for y in labels])
        batch = {b"data": pixels.astype(np.uint8).reshape(n, 3072), b"fine_labels": labels,
                 b"coarse_labels": [0] * n, b"filenames": [f"{i}.png".encode() for i in range(n)]}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=3))
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=3))
    return root


def write_all(root: Path) -> Path:
    """Every Table 4 set under one data root, as `stoptool evaluate --suite table4` finds them."""
    write_cifar100(root)
    write_places(root / "places205", {"train": 4, "val": 2})
    write_inat(root / "inat2018", [7, 3, 11], {"train": 4, "val": 2})
    write_clevr(root, {"train": [(3 + i % 8, 7.5 + 0.25 * i) for i in range(16)],
                       "val": [(3 + i % 8, 7.6 + 0.4 * i) for i in range(8)]})
    return root
