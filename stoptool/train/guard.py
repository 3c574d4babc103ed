"""What keeps a bad step from touching the run: the device-side record of non-finite steps,
the gradient norm it reads, and an optimizer step that a flag on the device can skip.

The step never waits on the device to decide: a non-finite loss or gradient norm sets a flag
there, and the optimizer, the EMA and every later step read the flag instead of the host. The
host reads the record (`Guard.check`) where it reads the loss anyway: at logged steps and
before a checkpoint. fp16 is the exception: its loss scaler skips overflowing steps by design,
and a non-finite loss there is caught on the host at once.
"""

import math
from functools import cached_property

import torch

from stoptool.train.distributed import whole


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradients were not finite; `step` is that step's index, where known."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Guard:
    """The device's record of non-finite steps, kept without waiting on the device: a step whose
    loss or gradient norm is not finite updates no weight, no optimizer moment and no EMA, and
    neither does any step after it, so that the weights stay those from before it."""

    def __init__(self, device: torch.device):
        self.bad = torch.zeros((), device=device)  # 1.0 from the first non-finite step on
        self.good = torch.zeros((), dtype=torch.int64, device=device)  # steps before it
        self.value = torch.zeros((), device=device)  # what was not finite, (loss, norm) packed
        self.what = torch.zeros((), dtype=torch.int64, device=device)  # 0: the loss, 1: the norm

    def record(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        loss_bad, norm_bad = ~torch.isfinite(loss), ~torch.isfinite(norm)
        first = (loss_bad | norm_bad) & (self.bad == 0)
        self.value = torch.where(first, torch.where(loss_bad, loss, norm).float(), self.value)
        self.what = torch.where(first & ~loss_bad, 1, self.what)
        self.bad = torch.maximum(self.bad, (loss_bad | norm_bad).float())
        self.good += (self.bad == 0).long()

    def inspect(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor,
                unscale: bool, measure: bool) -> "Gradients | None":
        """Look at a step's loss and gradients before they are applied; return the gradients with
        their norms (before clipping) where those were computed: always outside fp16, and on
        measured steps. `unscale`: the gradients must be the true ones next (to clip them)."""
        scaled = scaler.is_enabled()
        if scaled and not math.isfinite(loss.item()):
            raise NonFiniteLoss(f"loss is {loss.item()}")
        if unscale or measure:
            scaler.unscale_(optimizer)
        if scaled and not measure:  # (in fp16 the scaler checks the gradients itself)
            return None
        grads = Gradients.of(p for g in optimizer.param_groups for p in g["params"])
        if not scaled:
            self.record(loss, grads.norm)
        return grads

    def skip(self, scaler: torch.amp.GradScaler) -> torch.Tensor | None:
        """The flag the optimizer and the EMA read: None in fp16, whose scaler decides."""
        return None if scaler.is_enabled() else self.bad

    def check(self, first_step: int) -> None:
        """Raise NonFiniteLoss naming the first bad step (of those since `first_step`, where
        this guard began) if there was one."""
        if self.bad.item():
            what = "gradient norm" if self.what.item() else "loss"
            raise NonFiniteLoss(f"{what} is {self.value.item()}", step=first_step + int(self.good.item()))


class Gradients:
    """The gradients of some parameters and their 2-norms, each norm computed once, in one
    foreach operator, for the guard, the logged gradient norm and the clipping alike (torch's
    `get_total_norm` adds a copy per tensor; these are its numbers without them)."""

    def __init__(self, params: list[torch.Tensor], norms: list[torch.Tensor]):
        self.params, self.norms = params, norms

    @classmethod
    def of(cls, parameters) -> "Gradients":
        params = [p for p in parameters if p.grad is not None]
        return cls(params, torch._foreach_norm([p.grad for p in params], 2.0) if params else [])

    @cached_property
    def norm(self) -> torch.Tensor:
        """The total 2-norm (whole, under FSDP too), on the device."""
        if not self.norms:
            return torch.zeros(())
        return whole(torch.linalg.vector_norm(torch.stack(self.norms), 2.0))

    def clip_(self, parameters, max_norm: float) -> None:
        """Scale the gradients of `parameters` (those of them held here) so that their total norm
        is at most `max_norm`, as torch's clip_grad_norm_ does: by min(1, max_norm / (norm + 1e-6))."""
        keep = {id(p) for p in parameters}
        kept = [(p, n) for p, n in zip(self.params, self.norms, strict=True) if id(p) in keep]
        part = Gradients([p for p, _ in kept], [n for _, n in kept])
        coef = torch.clamp(max_norm / (part.norm + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for p in part.params], coef)


def grad_norm(parameters) -> torch.Tensor:
    """The total 2-norm of the gradients of `parameters` (whole, under FSDP too), on the device."""
    return Gradients.of(parameters).norm


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   skip: torch.Tensor | None) -> None:
    """The optimizer's step, left out where `skip` is 1: by the fused kernel itself (as the
    grad scaler has it do), else by reading the flag; then the scaler's update."""
    if skip is None:
        scaler.step(optimizer)
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skip
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():
        optimizer.step()
    scaler.update()
