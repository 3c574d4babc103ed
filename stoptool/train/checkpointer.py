"""Writing a run's checkpoints: `latest` (everything a resume needs) and weight snapshots.

Under torchrun every process takes part (random states are gathered from all of them, and
under FSDP so are the weight shards); process 0 alone writes.
"""

import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stoptool.io.checkpoint import Checkpoint, optimizer_tensors, save_checkpoint
from stoptool.runs import RUN_SECONDS, RunClock
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
    """Saves `state` with the run's metadata (`meta`: what every checkpoint of the run says);
    `tensors(model, keep)` names the weights (pretraining's three networks by default, see
    `model_tensors`); `clock`, the run's wall-clock, recorded in each checkpoint so that a
    resumed run can tell its whole length.

    A background save copies every tensor to the host first (the step may go on changing the
    weights), then writes the file in a thread; one write is in flight at a time, and each file
    appears whole or not at all (written beside, then renamed)."""

    def __init__(self, state: TrainState, meta: dict, ipe: int, world: World, device: torch.device,
                 tensors: Callable[..., dict[str, torch.Tensor]] = model_tensors,
                 clock: RunClock | None = None):
        self.state, self.meta, self.ipe, self.tensors = state, meta, ipe, tensors
        self.world, self.device, self.clock = world, device, clock
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.longest_stall_s = 0.0  # the longest a save held up the loop

    def save(self, path: Path, step: int, with_state: bool = True, background: bool = False) -> None:
        """Weights at `step`; `with_state` adds what a bit-exact resume needs (optimizer, random
        states, the fp16 loss scale)."""
        began = time.perf_counter()
        ckpt = self._collect(step, with_state)
        self.wait()
        if ckpt is not None:
            if background:
                ckpt = Checkpoint(ckpt.meta, {k: _host_copy(v) for k, v in ckpt.tensors.items()})
                self._writer = threading.Thread(target=self._write, args=(path, ckpt), daemon=True)
                self._writer.start()
            else:
                save_checkpoint(path, ckpt)
        self.longest_stall_s = max(self.longest_stall_s, time.perf_counter() - began)

    def check(self) -> None:
        """Raise the failure of a background write that has ended, without waiting for one in
        flight: the loop asks after every step, so a full disk stops the run at once."""
        if self._failure is not None:
            self.wait()

    def wait(self) -> None:
        """Until the write in flight (if any) has landed; its failure is raised here."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _write(self, path: Path, ckpt: Checkpoint) -> None:
        try:
            save_checkpoint(path, ckpt)
        except BaseException as err:  # raised in the loop's thread by the next wait
            self._failure = err

    def _collect(self, step: int, with_state: bool) -> Checkpoint | None:
        """The checkpoint's tensors and metadata, on process 0 (None elsewhere); every
        process takes part (random states, and under FSDP the weight shards, are gathered)."""
        world, state = self.world, self.state
        rng = rng_states(world, self.device) if with_state else {}  # every rank takes part
        if not world.main and not state.nets.sharded:
            return None
        # under FSDP every rank takes part in gathering the tensors; rank 0 alone keeps them
        tensors = self.tensors(state.model, keep=world.main)
        opt = whole_state(state.optimizer.state_dict(), keep=world.main) if with_state else None
        if not world.main:
            return None
        extra = {"step": step, "epoch": step // self.ipe}
        whole = self.clock.whole() if self.clock is not None else None
        if whole is not None:
            extra[RUN_SECONDS] = round(whole, 2)
        if with_state:
            opt_tensors, groups = optimizer_tensors(opt)
            tensors.update(opt_tensors)
            tensors.update(rng)
            extra["optimizer_groups"] = groups
            if state.scaler.is_enabled():  # fp16: the loss scale it has settled on, and its growth count
                extra["grad_scaler"] = state.scaler.state_dict()
        return Checkpoint({**self.meta, **extra}, tensors)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy on the host that later steps cannot change (on the CPU, `.cpu()` alone would
    return the live weight itself)."""
    return t.detach().to("cpu", copy=True)
