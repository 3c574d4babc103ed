"""Data-parallel pretraining under `torchrun`: one process per device, gradients averaged.

    torchrun --nproc-per-node 8 -m stoptool pretrain --config stop-vitb16-in1k
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m stoptool pretrain --config stop-vitl16-in1k

The world comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs,
gloo on CPUs. `--batch-size` stays the global batch: each rank takes its own contiguous
slice of every global batch and samples its own masks for it, as each process of the
released code runs its own mask collator. Rank 0 alone writes the run directory.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stoptool.errors import UserError
from stoptool.models.jepa import predict


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this node

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place in a torchrun launch; a plain process is rank 0 of 1."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as err:
        raise UserError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {err}") from None
    return World(rank, size, local, local_size)


def init_world(world: World, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(world: World, batch_size: int) -> int:
    """The per-rank batch of a global `batch_size`."""
    if batch_size % world.size:
        raise UserError(
            f"the batch size {batch_size} is not divisible by the {world.size} processes of this launch"
        )
    return batch_size // world.size


def mean_over_ranks(value: torch.Tensor, world: World) -> float:
    """The mean of a scalar over all ranks (every rank gets the same number)."""
    return sum_over_ranks(value.item(), world, value.device) / world.size


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. a stop signal seen by one process)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def check_same_step(step: int, world: World, device: torch.device) -> None:
    """Every rank must resume from the same checkpoint: the run directory has to be on a
    filesystem all nodes share."""
    if not world.distributed:
        return
    lo = torch.tensor([step], device=device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise UserError(
            f"the processes found different checkpoints in the run directory (steps {lo.item()} to "
            f"{hi.item()}): --out must be on a filesystem that every node shares"
        )


def sum_over_ranks(value: float, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def broadcast_module(module: nn.Module, world: World) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if world.distributed:
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)


def replicas_agree(module: nn.Module, world: World, device: torch.device) -> bool:
    """Whether every rank holds the same weights (a checksum per tensor, compared across ranks)."""
    if not world.distributed:
        return True
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(device)
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


class OnlineNet(nn.Module):
    """Context encoder then predictor as one module, so that DistributedDataParallel sees
    (and averages the gradients of) every trainable weight in one forward."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, images: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        return predict(self.encoder, self.predictor, images, ctx_idx, tgt_idx)


def data_parallel(online: OnlineNet, world: World, device: torch.device) -> nn.Module:
    """`online` wrapped for gradient averaging across ranks (itself when there is one rank)."""
    if not world.distributed:
        return online
    ids = [device.index] if device.type == "cuda" else None
    # gradients live in DDP's buckets instead of beside them: no second copy of them in memory
    return DistributedDataParallel(online, device_ids=ids, gradient_as_bucket_view=True)
