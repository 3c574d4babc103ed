"""One I-JEPA/StoP training step, in the order of the paper's Algorithm 1.

masks (from the loader) -> targets from the EMA encoder -> context features -> predictor with
stochastic masked positions -> smooth-L1 loss -> optimizer step -> EMA update.

The step calls the networks through `state.nets` (see `train.distributed.Nets`): the same
code runs in one process and under torchrun, where those wrappers average gradients (DDP) or
gather shards (FSDP).
"""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from stoptool.data.transforms import normalize
from stoptool.models.jepa import JEPA
from stoptool.train import runtime
from stoptool.train.distributed import Nets, whole
from stoptool.train.schedules import Hyper


@dataclass
class StepInputs:
    images: torch.Tensor  # [B, 3, H, W]: uint8 from the loader, or already normalised floats
    ctx_idx: torch.Tensor  # [B, Nc] context patch indices
    tgt_idx: torch.Tensor  # [B, M, K] patch indices of M target blocks


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradients were not finite; `step` is that step's index, where known."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Guard:
    """The device's record of non-finite steps, kept without waiting on the device: a step whose
    loss or gradient norm is not finite updates no weight, no optimizer moment and no EMA, and
    neither does any step after it, so that the weights stay those from before it. The host
    reads the record (`check`) where it reads the loss anyway: at logged steps and checkpoints."""

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

    def check(self, first_step: int) -> None:
        """Raise NonFiniteLoss naming the first bad step (of those since `first_step`, where
        this guard began) if there was one."""
        if self.bad.item():
            what = "gradient norm" if self.what.item() else "loss"
            raise NonFiniteLoss(f"{what} is {self.value.item()}", step=first_step + int(self.good.item()))


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
    accum_steps: int = 1  # micro-batches a batch is split into (their gradients accumulate)
    stats: dict | None = None  # when a dict, the step leaves what the health metrics need in it
    guard: Guard | None = None
    forward: Callable | None = None  # `loss_and_features` compiled (see `compile_forward`), or None

    def __post_init__(self):
        if self.guard is None:
            self.guard = Guard(next(self.model.parameters()).device)


def train_step(state: TrainState, batch: StepInputs, hp: Hyper) -> torch.Tensor:
    """Run one step; return its loss (averaged over the processes) as a tensor on the device,
    without waiting for it. A non-finite loss or gradient changes nothing (see `Guard`); in
    fp16, whose loss scaler skips steps with overflowing gradients by design, a non-finite loss
    raises NonFiniteLoss at once instead, before any weight changes.

    The batch is split into `accum_steps` micro-batches whose gradients add up (the processes
    average them once, on the last). The context encoder's gradient norm, and only it, is
    clipped (`clip_grad`), as the released StoP loop does.
    """
    set_hyperparams(state.optimizer, hp.lr, hp.wd)
    state.optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(state, batch)
    scaled = state.scaler.is_enabled()
    if scaled and not math.isfinite(loss.item()):
        raise NonFiniteLoss(f"loss is {loss.item()}")
    if state.clip_grad or state.stats is not None:
        state.scaler.unscale_(state.optimizer)
    if not scaled or state.stats is not None:  # (in fp16 the scaler checks the gradients itself)
        norm = grad_norm(p for g in state.optimizer.param_groups for p in g["params"])  # before clipping
        if state.stats is not None:
            state.stats["grad_norm"] = norm
        if not scaled:
            state.guard.record(loss, norm)
    if state.clip_grad:
        torch.nn.utils.clip_grad_norm_(state.model.encoder.parameters(), state.clip_grad)
    skip = None if scaled else state.guard.bad
    optimizer_step(state, skip)
    state.scaler.update()
    ema_update(*state.nets.ema_pairs(), hp.momentum, skip)
    return loss


def accumulate_gradients(state: TrainState, batch: StepInputs) -> torch.Tensor:
    """Forward and backward over `batch` in `accum_steps` equal micro-batches (masks drawn for
    the whole batch, then split), gradients scaled so that they add up to the whole batch's;
    the processes' gradients are averaged on the last micro-batch only. Returns the batch's
    loss, averaged over the processes."""
    n = state.accum_steps
    forward = state.forward or partial(loss_and_features, state.nets, state.autocast, state.a_l1)
    parts = zip(*(t.chunk(n) for t in (batch.images, batch.ctx_idx, batch.tgt_idx)), strict=True)
    total = None
    for i, part in enumerate(parts):
        with state.nets.no_sync() if i < n - 1 else nullcontext():
            loss, features = forward(*part)
            state.scaler.scale(loss / n if n > 1 else loss).backward()
        if state.stats is not None:
            state.stats.setdefault("target_features", []).append(features.detach())
        total = loss.detach() if total is None else total + loss.detach()
    return state.nets.mean(total / n if n > 1 else total)


def optimizer_step(state: TrainState, skip: torch.Tensor | None) -> None:
    """The optimizer's step, left out where `skip` is 1: by the fused kernel itself (as the
    grad scaler has it do), else by reading the flag."""
    opt = state.optimizer
    if skip is None:
        state.scaler.step(opt)
    elif getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale, opt.found_inf = None, skip
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
    elif not skip.item():
        opt.step()


def loss_and_features(nets: Nets, autocast, a_l1: float, images: torch.Tensor, ctx_idx: torch.Tensor,
                      tgt_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`jepa_loss` of one (micro-)batch and its average-pooled target features [B, D]: the
    step's forward as a function of tensors alone, which `compile_forward` compiles whole.
    uint8 images (the loader's) are normalised here, on the device."""
    stats = {}
    loss = jepa_loss(nets, StepInputs(normalize(images), ctx_idx, tgt_idx), autocast, a_l1, stats)
    return loss, stats["target_features"][0]


def compile_forward(state: TrainState, dynamic: bool | None = None) -> None:
    """Compile the step's forward (both encoders, the predictor, the loss) and so its
    backward as one graph each, instead of block by block; `dynamic=False` keeps one graph per
    mask shape (bucketed masks meet few). `train.fit.compile_guard` undoes it on a failure."""
    state.forward = runtime.compiled(partial(loss_and_features, state.nets, state.autocast, state.a_l1),
                                     dynamic=dynamic)


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
    if stats is not None:  # (one entry per micro-batch)
        stats.setdefault("target_features", []).append(h.float().mean(1))
    h = F.layer_norm(h.float(), h.shape[-1:])
    return gather_targets(h, batch.tgt_idx)


def grad_norm(parameters) -> torch.Tensor:
    """The total 2-norm of the gradients of `parameters` (whole, under FSDP too), on the device."""
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return whole(torch.nn.utils.get_total_norm(grads))


def gather_targets(tokens: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], tgt_idx [B, M, K] -> [B, M, K, D]."""
    batch = torch.arange(tokens.size(0), device=tokens.device)[:, None, None]
    return tokens[batch, tgt_idx]


EMA_CHUNK = 2**18  # elements of the online weights copied at a time by a guarded EMA update (1 MiB)


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float,
               skip: torch.Tensor | None = None) -> None:
    """f̄_θ <- m f̄_θ + (1 - m) f_θ, in place and in fp32, over matching lists of weights;
    where `skip` (a flag on the device) is 1, f̄_θ stays as it is. The guarded form computes
    the same bits as the plain one when it does not skip: m f̄_θ, then + (1 - m) (1 · f_θ)."""
    if skip is None:
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)
        return
    torch._foreach_mul_(target, torch.where(skip > 0, 1.0, momentum).to(target[0].dtype))
    keep = (1 - skip).to(online[0].dtype)
    for part in _chunks(online, EMA_CHUNK):  # the copies of f_θ, a few at a time
        torch._foreach_add_(target[part], torch._foreach_mul(online[part], keep), alpha=1.0 - momentum)


def _chunks(tensors: list[torch.Tensor], limit: int):
    """Slices of consecutive `tensors` of at most `limit` elements each (a larger tensor alone)."""
    start, size = 0, 0
    for i, t in enumerate(tensors):
        if i > start and size + t.numel() > limit:
            yield slice(start, i)
            start, size = i, 0
        size += t.numel()
    if start < len(tensors):
        yield slice(start, len(tensors))


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
