"""One fine-tuning step: classifier forward, loss (timm's), backward over the micro-batches,
clip, optimizer step; each parameter group at the step's lr times its layer's scale.

The step is run by pretraining's loop (`train.fit.fit`) and uses pretraining's guard against
non-finite steps (`train.guard`), its loss scaler and its process wrapper (`train.distributed
.Nets`: the classifier itself, or under DDP its wrapper, which averages the gradients).
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from stoptool.finetune.model import set_lr
from stoptool.train import runtime
from stoptool.train.distributed import Nets
from stoptool.train.guard import Guard, optimizer_step
from stoptool.train.schedules import Hyper
from stoptool.train.step import StepResult


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W], normalised
    targets: torch.Tensor  # [B] class labels, or [B, classes] soft targets (Mixup/CutMix)
    measure: bool = False  # a logged step: hand back the gradient norm (see StepInputs)


@dataclass
class FinetuneState:
    """Everything a step reads and updates. `scaler` is a no-op unless training in fp16."""

    model: torch.nn.Module  # the classifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    nets: Nets  # nets.online: the classifier as the step calls it
    autocast: Callable[[], AbstractContextManager]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    clip_grad: float | None = None
    accum_steps: int = 1
    guard: Guard | None = None
    forward: Callable | None = None  # `classification_loss` compiled (see `compile_forward`), or None

    def __post_init__(self):
        if self.guard is None:
            self.guard = Guard(next(self.model.parameters()).device)


def finetune_step(state: FinetuneState, batch: Batch, hp: Hyper) -> StepResult:
    """Run one step at `hp.lr` (scaled per layer); return its loss (averaged over the processes)
    and gradient norm, without waiting for the device. A non-finite loss or gradient changes no
    weight (see `train.guard`)."""
    set_lr(state.optimizer, hp.lr)
    state.optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(state, batch)
    grads = state.guard.inspect(state.optimizer, state.scaler, loss, bool(state.clip_grad), batch.measure)
    if state.clip_grad:
        if grads is None:  # (fp16 on an unmeasured step: the norms were not taken)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.clip_grad)
        else:
            grads.clip_(state.model.parameters(), state.clip_grad)
    optimizer_step(state.optimizer, state.scaler, state.guard.skip(state.scaler))
    return StepResult(loss, grads.norm if grads is not None else None)


def accumulate_gradients(state: FinetuneState, batch: Batch) -> torch.Tensor:
    """Forward and backward in `accum_steps` equal micro-batches, gradients scaled to add up to
    the whole batch's; the processes average them on the last micro-batch only."""
    n = state.accum_steps
    forward = state.forward or partial(classification_loss, state.nets.online, state.autocast, state.loss_fn)
    total = None
    for i, (images, targets) in enumerate(zip(batch.images.chunk(n), batch.targets.chunk(n), strict=True)):
        with state.nets.no_sync() if i < n - 1 else nullcontext():
            loss = forward(images, targets)
            state.scaler.scale(loss / n if n > 1 else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return state.nets.mean(total / n if n > 1 else total)


def classification_loss(net: Callable, autocast, loss_fn, images: torch.Tensor, targets: torch.Tensor):
    """The loss of one (micro-)batch: logits under autocast, the loss in fp32."""
    with autocast():
        logits = net(images)
    return loss_fn(logits.float(), targets)


def compile_forward(state: FinetuneState) -> None:
    """Compile the step's forward, and so its backward, as one graph each."""
    state.forward = runtime.compiled(partial(classification_loss, state.nets.online, state.autocast,
                                             state.loss_fn))
