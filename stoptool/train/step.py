"""One I-JEPA/StoP training step, in the order of the paper's Algorithm 1.

masks (from the loader) -> targets from the EMA encoder -> context features -> predictor with
stochastic masked positions -> smooth-L1 loss -> optimizer step -> EMA update.
"""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stoptool.models.encoder import encode
from stoptool.models.jepa import JEPA, predict
from stoptool.train.distributed import local


@dataclass
class StepInputs:
    images: torch.Tensor  # [B, 3, H, W]
    ctx_idx: torch.Tensor  # [B, Nc] context patch indices
    tgt_idx: torch.Tensor  # [B, M, K] patch indices of M target blocks


def gather_targets(tokens: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], tgt_idx [B, M, K] -> [B, M, K, D]."""
    batch = torch.arange(tokens.size(0), device=tokens.device)[:, None, None]
    return tokens[batch, tgt_idx]


def compute_targets(
    model: JEPA, inputs: StepInputs, autocast: Callable[[], AbstractContextManager], target=None
):
    """f̄_θ on the whole image, layer-normed over features (no affine), gathered per block.
    `target`, if given, is the sharded target encoder (a TargetNet under FSDP)."""
    with torch.no_grad(), autocast():
        if target is not None:
            h = target(inputs.images)
            target.reshard()  # FSDP keeps a root's weights gathered after a forward without backward
        else:
            h = encode(model.target_encoder, inputs.images)
    h = F.layer_norm(h.float(), h.shape[-1:])
    return gather_targets(h, inputs.tgt_idx)


def jepa_loss(
    model: JEPA, inputs: StepInputs, autocast, a_l1: float = 0.0, online=None, target=None
) -> torch.Tensor:
    """The loss of one batch. `online`, if given, runs context encoder and predictor in one
    call (an OnlineNet wrapped by DDP or FSDP) and `target` the target encoder (under FSDP);
    they compute exactly what the default does."""
    targets = compute_targets(model, inputs, autocast, target)
    with autocast():
        if online is not None:
            pred, a_norm = online(inputs.images, inputs.ctx_idx, inputs.tgt_idx)
        else:
            pred = predict(model.encoder, model.predictor, inputs.images, inputs.ctx_idx, inputs.tgt_idx)
            a_norm = model.predictor.A.float().abs().sum() if a_l1 else None
    loss = F.smooth_l1_loss(pred.float(), targets, beta=1.0)
    if a_l1:
        loss = loss + a_l1 * a_norm
    return loss


@torch.no_grad()
def ema_update(model: JEPA, momentum: float) -> None:
    """f̄_θ <- m f̄_θ + (1 - m) f_θ, in place and in fp32 (shard by shard under FSDP: both
    encoders are sharded alike)."""
    target = [local(p) for p in model.target_encoder.parameters()]
    online = [local(p.detach()) for p in model.encoder.parameters()]
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)


def set_hyperparams(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd


class NonFiniteLoss(RuntimeError):
    pass


def train_step(
    model: JEPA,
    optimizer: torch.optim.Optimizer,
    inputs: StepInputs,
    lr: float,
    wd: float,
    momentum: float,
    autocast,
    scaler: torch.amp.GradScaler | None = None,
    a_l1: float = 0.0,
    clip_grad: float | None = None,
    online=None,
    reduce: Callable[[torch.Tensor], float] | None = None,
    target=None,
) -> float:
    """Run one step; return the loss. Raises NonFiniteLoss before touching any weight.

    `clip_grad` clips the context encoder's gradient norm, and only it, as the released StoP
    loop does. Under data parallelism `online` is the wrapped context encoder + predictor (and, under
    FSDP, `target` the sharded target encoder), and `reduce` averages the loss over ranks, so
    that every rank takes the same decision on it.
    """
    set_hyperparams(optimizer, lr, wd)
    loss = jepa_loss(model, inputs, autocast, a_l1, online, target)
    value = reduce(loss.detach()) if reduce is not None else loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.encoder.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.encoder.parameters(), clip_grad)
        optimizer.step()
    ema_update(model, momentum)
    return value


def make_optimizer(model: JEPA, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel where this torch has one for the device
    (one pass over all parameters instead of a dozen per tensor: about 5 % of a vit_s16 step
    on a 2-core CPU). The update is the same AdamW either way."""
    try:
        return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=wd, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=wd)


def use_fused_like(optimizer: torch.optim.Optimizer, groups: list[dict]) -> list[dict]:
    """Saved param groups with this optimizer's kernel choice, so that a checkpoint written with
    (or without) the fused kernel resumes on a machine or torch that decides otherwise."""
    keys = ("fused", "foreach")
    return [{**g, **{k: optimizer.param_groups[0].get(k) for k in keys}} for g in groups]


def param_groups(model: JEPA) -> list[dict]:
    """AdamW groups: biases and 1-D parameters (norm scales) carry no weight decay; everything
    else does, the mask token included, as in the released code."""
    decay, no_decay = [], []
    for module in (model.encoder, model.predictor):
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith("bias") or p.ndim == 1 else decay).append(p)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
    ]
