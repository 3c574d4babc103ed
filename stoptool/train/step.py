"""One I-JEPA/StoP training step, in the order of the paper's Algorithm 1.

masks (from the loader) -> targets from the EMA encoder -> context features -> predictor with
stochastic masked positions -> smooth-L1 loss -> optimizer step -> EMA update.

The step calls the networks through `state.nets` (see `train.distributed.Nets`): the same
code runs in one process and under torchrun, where those wrappers average gradients (DDP) or
gather shards (FSDP).
"""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stoptool.models.jepa import JEPA
from stoptool.train.distributed import Nets, whole
from stoptool.train.schedules import Hyper


@dataclass
class StepInputs:
    images: torch.Tensor  # [B, 3, H, W]
    ctx_idx: torch.Tensor  # [B, Nc] context patch indices
    tgt_idx: torch.Tensor  # [B, M, K] patch indices of M target blocks


@dataclass
class TrainState:
    """Everything a step reads and updates. `scaler` is a no-op unless training in fp16."""

    model: JEPA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    nets: Nets
    autocast: Callable[[], AbstractContextManager]
    a_l1: float = 0.0  # λ of the l1 penalty on A
    clip_grad: float | None = None  # max gradient norm of the context encoder
    stats: dict | None = None  # when a dict, the step leaves what the health metrics need in it


class NonFiniteLoss(RuntimeError):
    pass


def train_step(state: TrainState, batch: StepInputs, hp: Hyper) -> float:
    """Run one step; return the loss. Raises NonFiniteLoss before touching any weight.

    The context encoder's gradient norm, and only it, is clipped (`clip_grad`), as the
    released StoP loop does. The loss is averaged over the processes first, so that every
    process takes the same decision on it.
    """
    set_hyperparams(state.optimizer, hp.lr, hp.wd)
    loss = jepa_loss(state.nets, batch, state.autocast, state.a_l1, state.stats)
    value = state.nets.mean(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value}")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if state.clip_grad or state.stats is not None:
        state.scaler.unscale_(state.optimizer)
    if state.stats is not None:  # before clipping
        state.stats["grad_norm"] = grad_norm(p for g in state.optimizer.param_groups for p in g["params"])
    if state.clip_grad:
        torch.nn.utils.clip_grad_norm_(state.model.encoder.parameters(), state.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    ema_update(*state.nets.ema_pairs(), hp.momentum)
    return value


def jepa_loss(nets: Nets, batch: StepInputs, autocast, a_l1: float = 0.0, stats: dict | None = None):
    """smooth-L1(g_φ(f_θ(context)) at the targets, f̄_θ(image) at the targets) (+ λ‖A‖₁).
    `stats`, if given, receives the batch's average-pooled target features."""
    targets = compute_targets(nets.target, batch, autocast, stats)
    with autocast():
        pred, a_norm = nets.online(batch.images, batch.ctx_idx, batch.tgt_idx)
    loss = F.smooth_l1_loss(pred.float(), targets, beta=1.0)
    if a_l1:
        loss = loss + a_l1 * a_norm
    return loss


def compute_targets(target: Callable, batch: StepInputs, autocast, stats: dict | None = None) -> torch.Tensor:
    """f̄_θ on the whole image (`target`: images -> tokens), layer-normed over features (no
    affine), gathered per block: [B, M, K, D]. `stats` (if given) gets the pooled tokens."""
    with torch.no_grad(), autocast():
        h = target(batch.images)
    if stats is not None:
        stats["target_features"] = h.float().mean(1)
    h = F.layer_norm(h.float(), h.shape[-1:])
    return gather_targets(h, batch.tgt_idx)


def grad_norm(parameters) -> float:
    """The total 2-norm of the gradients of `parameters` (whole, under FSDP too)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(whole(torch.nn.utils.get_total_norm(grads)))


def gather_targets(tokens: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], tgt_idx [B, M, K] -> [B, M, K, D]."""
    batch = torch.arange(tokens.size(0), device=tokens.device)[:, None, None]
    return tokens[batch, tgt_idx]


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """f̄_θ <- m f̄_θ + (1 - m) f_θ, in place and in fp32, over matching lists of weights."""
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)


def set_hyperparams(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd


def make_optimizer(model: JEPA, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel where this torch has one for the device
    (one pass over all parameters instead of a dozen per tensor: about 5 % of a vit_s16 step
    on a 2-core CPU). The update is the same AdamW either way."""
    try:
        return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=wd, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=wd)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs a loss scale against underflowing gradients; elsewhere the scaler does nothing."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def single_process_state(model: JEPA, autocast, precision: str = "fp32", lr: float = 1e-3,
                         wd: float = 0.04, **options) -> TrainState:
    """A TrainState for `model` in this process alone (bench, tests): plain networks, a fresh
    AdamW; `options` are TrainState's a_l1 and clip_grad."""
    device = next(model.parameters()).device
    return TrainState(model, make_optimizer(model, lr, wd), make_scaler(device, precision),
                      Nets.plain(model), autocast, **options)


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
