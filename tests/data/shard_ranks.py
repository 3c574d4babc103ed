"""Run by tests/data/test_shards.py under torchrun (2 CPU processes, gloo): each process reads
its share of one epoch of a prepared set with 2 loader workers; each worker lists the rows it
opened in OUT/rank{R}-worker{W}.txt, and process 0 writes its batches' sizes."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import get_worker_info

from stoptool.data.loader import pretrain_loader
from stoptool.data.shards import ShardDataset
from stoptool.data.transforms import PretrainTransform
from stoptool.masks import MaskConfig, MaskSampler


class Listed(ShardDataset):
    def open(self, index: int):
        info = get_worker_info()
        with open(Path(self.out) / f"rank{self.rank}-worker{info.id}.txt", "a") as f:
            f.write(f"{index}\n")
        return super().open(index)


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = Listed(root, "train")
    data.out, data.rank = out, rank
    sampler = MaskSampler(MaskConfig().on_grid(8))
    steps = len(data) // 8
    loader = pretrain_loader(data, PretrainTransform(16), sampler, 8, 0, 0, steps, workers=2, rank=rank,
                             world=world)
    sizes = [len(images) for images, *_ in loader]
    if rank == 0:
        Path(out, "rank0-batches.json").write_text(json.dumps([[0] * n for n in sizes]))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
