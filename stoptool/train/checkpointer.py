"""Writing a run's checkpoints: `latest` (everything a resume needs) and weight snapshots.

Under torchrun every process takes part (random states are gathered from all of them, and
under FSDP so are the weight shards); process 0 alone writes.
"""

from pathlib import Path

import torch

from stoptool.io.checkpoint import Checkpoint, optimizer_tensors, save_checkpoint
from stoptool.train.distributed import World, rng_states, whole_state
from stoptool.train.step import TrainState


def model_tensors(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of the three networks, whole (gathered from the ranks under FSDP; see
    `whole_state` for `keep`)."""
    tensors = {}
    for part in ("encoder", "target_encoder", "predictor"):
        state = whole_state(getattr(model, part).state_dict(), keep)
        tensors.update({f"{part}.{k}": v for k, v in state.items()})
    return tensors


class Checkpointer:
    """Saves `state` with the run's metadata (`meta`: what every checkpoint of the run says)."""

    def __init__(self, state: TrainState, meta: dict, ipe: int, world: World, device: torch.device):
        self.state, self.meta, self.ipe = state, meta, ipe
        self.world, self.device = world, device

    def save(self, path: Path, step: int, with_state: bool = True) -> None:
        """Weights at `step`; `with_state` adds what a bit-exact resume needs (optimizer, random
        states, the fp16 loss scale)."""
        world, state = self.world, self.state
        rng = rng_states(world, self.device) if with_state else {}  # every rank takes part
        if not world.main and not state.nets.sharded:
            return
        # under FSDP every rank takes part in gathering the tensors; rank 0 alone keeps them
        tensors = model_tensors(state.model, keep=world.main)
        opt = whole_state(state.optimizer.state_dict(), keep=world.main) if with_state else None
        if not world.main:
            return
        extra = {"step": step, "epoch": step // self.ipe}
        if with_state:
            opt_tensors, groups = optimizer_tensors(opt)
            tensors.update(opt_tensors)
            tensors.update(rng)
            extra["optimizer_groups"] = groups
            if state.scaler.is_enabled():  # fp16: the loss scale it has settled on, and its growth count
                extra["grad_scaler"] = state.scaler.state_dict()
        save_checkpoint(path, Checkpoint({**self.meta, **extra}, tensors))
