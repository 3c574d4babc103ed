"""Run by tests/train/test_distributed.py under torchrun (CPU processes, gloo): each rank takes
its part of a fixed batch through the data-parallel context encoder + predictor, for each mode
of the comma-separated second argument in turn, each on a model of its own (`ddp`; `fsdp`;
`hsdp`: hybrid FSDP over 2 groups of 2, on 4 processes), and rank 0 saves the averaged
gradients, whole, to OUT_DIR/MODE.safetensors (OUT_DIR: the first argument)."""

import sys

import torch
from safetensors.torch import save_file

from stoptool.config import PretrainConfig, config_from_dict
from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.distributed import (
    init_world,
    leave_world,
    whole,
    world_from_env,
    wrap_networks,
)
from stoptool.train.runtime import autocast_factory
from stoptool.train.step import StepInputs, jepa_loss


def fixed_batch(cfg: PretrainConfig, n: int) -> StepInputs:
    """The same images and masks in every process (and in the test's one-process reference)."""
    ctx, tgt = MaskSampler(cfg.mask_config())(n, torch.Generator().manual_seed(3))
    side = cfg.model.img_size
    images = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(4))
    return StepInputs(images, ctx, tgt)


def config() -> PretrainConfig:
    return config_from_dict(
        dict(arch="vit_n2", img_size=16, pred_width=48, pred_depth=1, sigma=0.0, precision="fp32")
    ).validate()


def main(out: str, modes: str = "ddp") -> None:
    world = world_from_env()
    device = init_world(world, torch.device("cpu"))
    for mode in modes.split(","):
        grads = averaged_gradients(world, device, mode)
        if world.main:
            save_file(grads, f"{out}/{mode}.safetensors")
    leave_world(world)


def averaged_gradients(world, device, mode: str) -> dict[str, torch.Tensor]:
    cfg = config()
    torch.manual_seed(0)
    model = build_jepa(cfg.model).train()
    batch = fixed_batch(cfg, 8)
    n = 8 // world.size
    part = slice(n * world.rank, n * world.rank + n)
    mine = StepInputs(batch.images[part], batch.ctx_idx[part], batch.tgt_idx[part])
    if mode == "fsdp":
        nets = wrap_networks(model, world, device, fsdp=True)
    elif mode == "hsdp":  # two groups of two: each group holds one sharded copy
        nets = wrap_networks(model, world, device, fsdp=True, shard_group=2)
        mesh = model.encoder.blocks[0].attn.qkv.weight.device_mesh
        # rows are replicas, columns shards: ranks 0 and 1 share a copy (a node's processes)
        assert mesh.mesh.tolist() == [[0, 1], [2, 3]] and mesh.mesh_dim_names == ("replicate", "shard")
    else:
        nets = wrap_networks(model, world, device)
    jepa_loss(nets, mine, autocast_factory(device, "fp32")).backward()
    return {f"{part}.{name}": whole(p.grad) for part in ("encoder", "predictor")
            for name, p in getattr(model, part).named_parameters() if p.grad is not None}


if __name__ == "__main__":
    main(*sys.argv[1:])
