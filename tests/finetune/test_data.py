"""Fine-tuning's input: timm's augmentations on or off as the preset says, Mixup/CutMix into
soft targets, and every draw seeded by the image and the batch."""

import random

import numpy as np
import pytest
import torch
from timm.data.auto_augment import RandAugment
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from stoptool.data.datasets import digits
from stoptool.data.loader import epoch_batches
from stoptool.data.transforms import MEAN, STD
from stoptool.finetune.config import build_finetune_config
from stoptool.finetune.data import (
    LabelledImages,
    MixCollate,
    make_loss,
    make_mixup,
    train_loader,
    train_transform,
)

IMG, CLASSES = 16, 10


def recipe(name: str | None, **flags):
    cfg = build_finetune_config(name, {"random_init": True, "arch": "vit_b4", **flags})
    return cfg.for_arch("vit_b4").validate()


def parts(transform) -> dict:
    return {type(t).__name__: t for t in transform.transforms}


@pytest.fixture(scope="module")
def data():
    return digits("train")


def first_batch(cfg, data, mixup, seed=0, batch=8):
    transform = train_transform(cfg, IMG, MEAN, STD)
    loader = train_loader(data, np.arange(len(data)), transform, mixup, batch, seed, 0, 1)
    return next(iter(loader))


def test_the_low_shot_preset_has_randaugment_and_neither_erasing_nor_mixing(data):
    cfg = recipe("finetune-in1k-1pct")
    found = parts(train_transform(cfg, IMG, MEAN, STD))
    ra = found["RandAugment"]
    assert isinstance(ra, RandAugment) and ra.num_layers == 2  # rand-m9-mstd0.5-inc1
    assert {op.magnitude for op in ra.ops} == {9} and {op.magnitude_std for op in ra.ops} == {0.5}
    assert any("Increasing" in op.name for op in ra.ops)
    assert "RandomErasing" not in found and "RandomHorizontalFlip" in found
    assert make_mixup(cfg, CLASSES) is None
    loss = make_loss(cfg)
    assert isinstance(loss, LabelSmoothingCrossEntropy) and loss.smoothing == 0.1
    # unmixed: each target is its image's label (a one-hot class), in the batch's order
    images, targets, skipped = first_batch(cfg, data, None, seed=5)
    keys = next(epoch_batches(len(data), 8, 5, 0))
    assert targets.dtype == torch.int64 and targets.tolist() == [int(data.labels[i]) for _, _, i in keys]
    assert images.shape == (8, 3, IMG, IMG) and skipped == []


def test_the_full_data_preset_erases_and_mixes_into_soft_targets(data):
    cfg = recipe("finetune-in1k")
    found = parts(train_transform(cfg, IMG, MEAN, STD))
    assert isinstance(found["RandAugment"], RandAugment)
    erasing = found["RandomErasing"]
    assert isinstance(erasing, RandomErasing)
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    mixup = make_mixup(cfg, CLASSES)
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert mixup.mix_prob == 1.0 and mixup.mode == "batch"
    assert isinstance(make_loss(cfg), SoftTargetCrossEntropy)
    plain_images, labels, _ = first_batch(cfg, data, None)
    images, targets, _ = first_batch(cfg, data, mixup)
    assert targets.shape == (8, CLASSES) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    off = 0.1 / CLASSES  # the smoothed one-hot's floor, under any mix of two
    assert (targets >= off - 1e-7).all() and (targets.max(1).values < 1 - 0.1 + off + 1e-6).all()
    assert ((targets > off + 1e-6).sum(1) == 2).all()  # each image, mixed with the one across the batch
    mixed_with = labels.flip(0)  # timm pairs image i with image B - 1 - i
    assert all(targets[i, labels[i]] > off and targets[i, mixed_with[i]] > off for i in range(8)
               if labels[i] != mixed_with[i])
    assert not torch.equal(images, plain_images)


def test_the_default_recipe_mixes_nothing_and_smooths_the_labels():
    cfg = recipe(None)
    found = parts(train_transform(cfg, IMG, MEAN, STD))
    assert set(found) == {"RandomResizedCropAndInterpolation", "MaybeToTensor", "Normalize"}
    assert make_mixup(cfg, CLASSES) is None and isinstance(make_loss(cfg), LabelSmoothingCrossEntropy)


def test_each_images_draws_are_its_own_and_leave_the_global_streams_alone(data):
    cfg = recipe("finetune-in1k")
    images = LabelledImages(data, np.arange(len(data)), train_transform(cfg, IMG, MEAN, STD), seed=3)
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    streams = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    _, a, label, _ = images[(2, 0, 17)]
    _, again, _, _ = images[(2, 5, 17)]  # the same image of the same epoch, in another batch
    _, other_epoch, _, _ = images[(3, 0, 17)]
    assert torch.equal(a, again) and not torch.equal(a, other_epoch) and label == data.labels[17]
    assert torch.equal(torch.get_rng_state(), streams[0])
    assert (np.random.get_state()[1] == streams[1]).all() and random.getstate() == streams[2]
    collate = MixCollate(make_mixup(cfg, CLASSES), seed=3)
    items = [images[(2, 4, i)] for i in range(8)]
    first, second = collate(items), collate(items)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # the batch's mix is seeded
    assert not torch.equal(MixCollate(collate.mixup, seed=3, rank=1)(items)[1], first[1])  # per process


def test_randaugments_strongest_posterize_keeps_no_bit_instead_of_stopping_the_run(data):
    """At magnitude 10 timm's increasing posterize keeps 0 bits, which recent Pillow refuses:
    the image turns black (0 bits kept), as older Pillow made it, and the run goes on."""
    cfg = recipe("finetune-in1k", auto_augment="rand-m10-inc1")
    ra = parts(train_transform(cfg, IMG, MEAN, STD))["RandAugment"]
    op = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    (bits,) = op.level_fn(10, op.hparams)
    assert bits == 0
    img = data.load(0).resize((IMG, IMG))
    out = op.aug_fn(img, bits, **op.kwargs)
    assert out.mode == img.mode and out.size == img.size and not np.asarray(out).any()
    kept = op.aug_fn(img, 2, **op.kwargs)  # 2 bits: each value's top two
    assert (np.asarray(kept) == (np.asarray(img) & 0b11000000)).all()
