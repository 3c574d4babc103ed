"""Fine-tuning's input, built from timm's parts: `create_transform` (random resized crop, flip,
RandAugment, random erasing; at evaluation resize and centre crop) and `Mixup` (Mixup/CutMix
on the batch, with label smoothing folded into the soft targets).

timm's transforms draw from Python's, numpy's and torch's global random streams. Each image is
transformed with those streams seeded from (seed, epoch, image) and each batch mixed with them
seeded from (seed, epoch, batch, process), then put back as they were: a run sees the same
batches with any number of loader workers, a resumed run the batches it would have seen, and
the model's own random stream (stochastic depth) is left alone. The batches of a run are
pretraining's (`data.loader.RunBatches`: a seeded order per epoch, each process its slice of
every global batch).
"""

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from stoptool.data.datasets import ImageDataset
from stoptool.data.loader import PREFETCH_GPU, RunBatches, SkipReport, stream_seed, unreadable_reason
from stoptool.errors import UserError
from stoptool.finetune.config import FinetuneConfig
from stoptool.probe.config import ProbeConfig
from stoptool.probe.run import open_splits as probe_splits
from stoptool.probe.subset import balanced_subset


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's (CPU) global random streams seeded from `seed` inside,
    restored after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # the CPU's generator alone: torch.manual_seed also queues the GPUs' seeding, recording the
        # call's stack each time (milliseconds an image)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def train_transform(cfg: FinetuneConfig, img_size: int, mean, std):
    """timm's training transform as `cfg` sets it: PIL image -> normalised float [3, H, W]."""
    from timm.data import create_transform

    try:
        transform = create_transform(
            img_size, is_training=True, scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
            mean=mean, std=std, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)
    except (AssertionError, ValueError, KeyError, IndexError) as err:  # timm's parsing of the policy
        raise UserError(f"auto_augment '{cfg.auto_augment}' is not a timm augmentation policy (e.g. "
                        f"rand-m9-mstd0.5-inc1): {err or type(err).__name__}", key="auto_augment") from None
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):  # RandAugment's operations
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def posterize(img: Image.Image, bits: int, **_) -> Image.Image:
    """Keep the `bits` most significant bits of each channel, as timm's RandAugment asks; 0 bits
    leave a black image. At its top magnitude RandAugment's increasing posterize keeps 0 bits,
    which Pillow's `posterize` did the same way once and now refuses (a ValueError in a worker)."""
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits)


def eval_transform(cfg: FinetuneConfig, img_size: int, mean, std):
    """timm's evaluation transform: resize the short side to img_size / eval_crop_pct, centre crop."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, interpolation=cfg.interpolation,
                            crop_pct=cfg.eval_crop_pct, mean=mean, std=std)


def make_mixup(cfg: FinetuneConfig, num_classes: int):
    """timm's Mixup/CutMix as `cfg` sets it, or None when both are off (the targets stay labels)."""
    if not cfg.mixing():
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def make_loss(cfg: FinetuneConfig) -> torch.nn.Module:
    """MAE's choice of timm's losses: soft-target cross-entropy on mixed targets (the smoothing is
    in them), else label-smoothed cross-entropy, else plain cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixing():
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return torch.nn.CrossEntropyLoss()


class LabelledImages(Dataset):
    """Images `indices` of `data` through `transform`, by key (epoch, batch, n): image
    `indices[n]` with its label, and the images skipped on the way as (name, reason). An
    unreadable image is replaced by the next readable one (with that one's label)."""

    def __init__(self, data: ImageDataset, indices: np.ndarray, transform, seed: int):
        self.data, self.indices, self.transform, self.seed = data, np.asarray(indices), transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, _, n = key
        skipped = []
        for attempt in range(len(self.indices)):
            i = int(self.indices[(n + attempt) % len(self.indices)])
            try:
                img = self.data.load(i)
            except (OSError, ValueError) as err:
                name = self.data.item_name(i)
                skipped.append((name, unreadable_reason(err, name)))
                continue
            with seeded(stream_seed(self.seed, epoch, i)):
                return key, self.transform(img), int(self.data.labels[i]), skipped
        raise UserError(f"no readable image in '{self.data.name}'")


class MixCollate:
    """Stack a batch; with `mixup`, mix it (its draws seeded from seed, epoch, batch and this
    process) into soft targets [B, classes], else keep the labels [B]."""

    def __init__(self, mixup, seed: int, rank: int = 0):
        self.mixup, self.seed, self.rank = mixup, seed, rank

    def __call__(self, items):
        images = torch.stack([x for _, x, _, _ in items])
        targets = torch.tensor([y for _, _, y, _ in items], dtype=torch.int64)
        skipped = [s for *_, named in items for s in named]
        if self.mixup is not None:
            epoch, batch, _ = items[0][0]
            with seeded(stream_seed(self.seed, epoch, batch, -4, self.rank)):
                images, targets = self.mixup(images, targets)
        return images, targets, skipped


class Skips(SkipReport):
    """The loader's batches as the training loop takes them, (images, targets, images skipped),
    the skipped images named as `SkipReport` names them."""

    def __iter__(self):
        for images, targets, skipped in self.loader:
            for name, reason in skipped:
                self._met(name, reason)
            yield images, targets, len(skipped)


def train_loader(data: ImageDataset, indices: np.ndarray, transform, mixup, batch_size: int, seed: int,
                 first: int, last: int, workers: int = 0, pin_memory: bool = False, rank: int = 0,
                 world: int = 1) -> DataLoader:
    """The batches of steps `first` (0-based) to `last` (excluded) over `data[indices]`, this
    process's slice of each."""
    return DataLoader(
        LabelledImages(data, indices, transform, seed),
        batch_sampler=RunBatches(len(indices), batch_size, seed, first, last, rank, world),
        collate_fn=MixCollate(mixup, seed, rank),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH_GPU if workers and pin_memory else None,
        generator=torch.Generator().manual_seed(stream_seed(seed, first, -2)),  # not the global stream
    )


class EvalImages(Dataset):
    """Images `indices` of `data` through the evaluation transform; an unreadable one is None."""

    def __init__(self, data: ImageDataset, indices: np.ndarray, transform):
        self.data, self.indices, self.transform = data, np.asarray(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int):
        i = int(self.indices[n])
        try:
            img = self.data.load(i)
        except (OSError, ValueError):
            return None, int(self.data.labels[i])
        return self.transform(img), int(self.data.labels[i])


def collate_eval(items):
    """(images or None, labels of those images, images skipped)."""
    kept = [(x, y) for x, y in items if x is not None]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, torch.tensor([y for _, y in kept], dtype=torch.int64), len(items) - len(kept)


@dataclass
class Splits:
    """The labelled set of a run: the training images it uses (`indices` of `train`), the
    evaluation split, and how they were chosen."""

    train: ImageDataset
    indices: np.ndarray
    val: ImageDataset
    tag: str  # the data set's name in tables and files
    notes: list[str]

    @property
    def classes(self) -> list[str]:
        return list(self.train.classes)

    def describe(self) -> dict:
        return {"name": self.tag, "train": self.train.name, "train_images": int(len(self.indices)),
                "val": self.val.name, "val_images": len(self.val), "classes": len(self.classes)}


def open_splits(cfg: FinetuneConfig) -> Splits:
    """The training and evaluation splits of `cfg.dataset` (as `stoptool probe` opens them: a
    tree needs train/ and val/ or test/, with the same classes), the subset file and the
    class-balanced fraction applied to the training split."""
    if cfg.dataset.lower() == "imagenet" and not Path(cfg.dataset).expanduser().exists():
        raise UserError("ImageNet is not bundled: set dataset to the path of an ImageFolder tree of it "
                        "(train/ and val/, one folder per class)", key="dataset")
    train, val, tag = probe_splits(ProbeConfig(dataset=cfg.dataset, data_root=cfg.data_root,
                                               download=cfg.download, subset=cfg.subset))
    indices = balanced_subset(train.labels, cfg.fraction, cfg.seed)
    notes = [n for n in (train.subset_note(),) if n]
    return Splits(train, indices, val, tag, notes)
