"""The optimizer of pretraining: AdamW over the released code's parameter groups (no weight
decay on biases and 1-D parameters), its hyperparameters set per step from the schedules, and
the loss scaler fp16 needs."""

import torch

from stoptool.models.jepa import JEPA


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
