"""Frozen-encoder features for the probes: extraction in batches, and an on-disk cache.

`last` is the average of the last block's tokens after the closing norm (the feature the
I-JEPA and StoP papers probe); `last4` concatenates that average for each of the last four
blocks (the paper's ViT-B/L protocol). Images go through the evaluation transform: resize
and centre-crop to the encoder's image size, then the pretraining normalization.

The cache key is a hash of everything the features depend on: the encoder's tensors, the
data set's content, the split, the layers, the image size and the precision.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stoptool.data.datasets import ArrayDataset, FolderDataset, ImageDataset
from stoptool.data.transforms import center_crop, to_tensor
from stoptool.io.checkpoint import tensors_digest
from stoptool.models.encoder import block_outputs, encode
from stoptool.train.runtime import autocast_factory

Progress = Callable[[int, int], None]  # progress(done, total)


@dataclass
class Features:
    x: np.ndarray  # [N, D] float32
    y: np.ndarray  # [N] int64
    skipped: int = 0  # unreadable images left out

    def __len__(self) -> int:
        return len(self.y)


def pooled_features(encoder: torch.nn.Module, images: torch.Tensor, layers: str) -> torch.Tensor:
    """[B, D] (`last`) or [B, 4D] (`last4`) average-pooled token features."""
    if layers == "last":
        return encode(encoder, images).mean(1)
    if layers == "last4":
        return torch.cat([h.mean(1) for h in block_outputs(encoder, images, last=4)], dim=-1)
    raise ValueError(f"unknown layers {layers!r}")


class EvalImages(Dataset):
    """Evaluation-transformed images (of `indices` only, when given); an unreadable file
    yields None and is counted."""

    def __init__(self, data: ImageDataset, img_size: int, indices=None):
        self.data, self.img_size = data, img_size
        self.indices = list(range(len(data))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int):
        i = self.indices[n]
        try:
            img = self.data.load(i)
        except (OSError, ValueError):
            return None, int(self.data.labels[i])
        return to_tensor(center_crop(img, self.img_size)), int(self.data.labels[i])


def collate_eval(items):
    kept = [(x, y) for x, y in items if x is not None]
    images = torch.stack([x for x, _ in kept]) if kept else None
    labels = torch.tensor([y for _, y in kept], dtype=torch.int64)
    return images, labels, len(items) - len(kept)


def extract_features(
    encoder: torch.nn.Module,
    data: ImageDataset,
    img_size: int,
    layers: str = "last",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    workers: int = 0,
    progress: Progress | None = None,
) -> Features:
    """Run the frozen encoder (eval mode, no grad) over `data` and pool its tokens."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    autocast = autocast_factory(device, precision)
    loader = DataLoader(
        EvalImages(data, img_size), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate_eval,
    )
    xs, ys, skipped, done = [], [], 0, 0
    if progress:
        progress(0, len(data))
    with torch.inference_mode():
        for images, labels, n_skipped in loader:
            skipped += n_skipped
            if images is not None:
                with autocast():
                    feats = pooled_features(encoder, images.to(device), layers)
                xs.append(feats.float().cpu().numpy())
                ys.append(labels.numpy())
            done += len(labels) + n_skipped
            if progress:
                progress(done, len(data))
    if not xs:
        from stoptool.errors import UserError

        raise UserError(f"no readable image in '{data.name}'")
    return Features(np.concatenate(xs), np.concatenate(ys), skipped)


# ---------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stoptool" / "features"


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the encoder's tensors."""
    return tensors_digest(encoder.state_dict())


def dataset_fingerprint(data: ImageDataset) -> str:
    """A hash of what the data set holds: its pixels (in memory) or its files (on disk)."""
    h = hashlib.sha256()
    h.update(f"{type(data).__name__}|{len(data)}|".encode())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    if isinstance(data, ArrayDataset):
        h.update(np.ascontiguousarray(data.images).tobytes())
    elif isinstance(data, FolderDataset):
        for f in data.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    elif hasattr(data, "identity"):  # a prepared set: its index and its shards' sizes and times
        h.update(data.identity())
    else:  # a data set we know nothing about: its name is all we have
        h.update(data.name.encode())
    return h.hexdigest()


def cache_key(encoder_hash: str, data_hash: str, split: str, layers: str, img_size: int,
              precision: str) -> str:
    fields = {
        "encoder": encoder_hash, "data": data_hash, "split": split, "layers": layers,
        "img_size": img_size, "precision": precision, "version": 1,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def load_cached(cache_dir: Path, key: str) -> Features | None:
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return Features(f["x"], f["y"], int(f["skipped"]))
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is recomputed


def save_cached(cache_dir: Path, key: str, feats: Features) -> Path:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.npz"
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp.npz"
    np.savez(tmp, x=feats.x, y=feats.y, skipped=np.int64(feats.skipped))
    os.replace(tmp, path)
    return path
