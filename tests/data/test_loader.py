"""The pretraining loader: one loader for a whole run, the batches of per-epoch loaders."""

import torch

from stoptool.data.datasets import open_dataset
from stoptool.data.loader import RunBatches, epoch_batches, pretrain_loader
from stoptool.data.transforms import PretrainTransform
from stoptool.masks import MaskSampler


def test_run_batches_continue_across_epochs_from_any_step():
    n, batch = 50, 16  # 3 batches an epoch, 2 images dropped
    per_epoch = [list(epoch_batches(n, batch, seed=3, epoch=e)) for e in range(4)]
    whole = [keys for epoch in per_epoch for keys in epoch]
    assert list(RunBatches(n, batch, 3, first=0, last=12)) == whole
    assert list(RunBatches(n, batch, 3, first=4, last=10)) == whole[4:10]  # resumed mid-epoch
    assert len(RunBatches(n, batch, 3, first=4, last=10)) == 6
    assert list(RunBatches(n, batch, 3, first=5, last=5)) == []
    rank1 = [keys for e in range(2) for keys in epoch_batches(n, batch, 3, e, rank=1, world=2)]
    assert list(RunBatches(n, batch, 3, first=2, last=5, rank=1, world=2)) == rank1[2:5]


def test_workers_give_the_batches_of_the_main_process_across_an_epoch_end(tiny_cfg):
    cfg = tiny_cfg(batch_size=64)
    data = open_dataset("digits", "train")  # 21 batches of 64 an epoch
    transform = PretrainTransform(cfg.model.img_size, cfg.data.crop_scale)
    sampler = MaskSampler(cfg.mask_config())

    def batches(workers: int) -> list:
        return list(pretrain_loader(data, transform, sampler, 64, 0, 19, 24, workers=workers))

    main, two = batches(0), batches(2)
    assert len(main) == len(two) == 5
    for a, b in zip(main, two, strict=True):
        for x, y in zip(a[:3], b[:3], strict=True):
            assert torch.equal(x, y)
