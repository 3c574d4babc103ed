"""One I-JEPA/StoP training step, in the order of the paper's Algorithm 1.

masks (from the loader) -> targets from the EMA encoder -> context features -> predictor with
stochastic masked positions -> smooth-L1 loss -> optimizer step -> EMA update.

The step calls the networks through `state.nets` (see `train.distributed.Nets`): the same
code runs in one process and under torchrun, where those wrappers average gradients (DDP) or
gather shards (FSDP). What keeps a non-finite step from changing anything is `train.guard`;
the optimizer and its groups are `train.optim`.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from stoptool.data.transforms import normalize
from stoptool.models.jepa import JEPA
from stoptool.train import runtime
from stoptool.train.distributed import Nets
from stoptool.train.guard import Gradients, Guard, optimizer_step
from stoptool.train.optim import make_optimizer, make_scaler, set_hyperparams
from stoptool.train.schedules import Hyper


@dataclass
class StepInputs:
    images: torch.Tensor  # [B, 3, H, W]: uint8 from the loader, or already normalised floats
    ctx_idx: torch.Tensor  # [B, Nc] context patch indices
    tgt_idx: torch.Tensor  # [B, M, K] patch indices of M target blocks
    measure: bool = False  # a logged step: hand back what the health metrics read


@dataclass
class StepResult:
    """What a step measured, on the device, not waited for."""

    loss: torch.Tensor  # the batch's loss, averaged over the processes
    grad_norm: torch.Tensor | None  # total gradient norm before clipping (in fp16: measured steps only)
    target_features: torch.Tensor | None = None  # measured steps: the batch's pooled f̄_θ features [B, D]


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
    guard: Guard | None = None
    forward: Callable | None = None  # `loss_and_features` compiled (see `compile_forward`), or None

    def __post_init__(self):
        if self.guard is None:
            self.guard = Guard(next(self.model.parameters()).device)


def train_step(state: TrainState, batch: StepInputs, hp: Hyper) -> StepResult:
    """Run one step; return what it measured, without waiting for the device. A non-finite
    loss or gradient changes nothing (see `train.guard`). The batch is split into
    `accum_steps` micro-batches whose gradients add up; the context encoder's gradient norm,
    and only it, is clipped (`clip_grad`), as the released StoP loop does."""
    set_hyperparams(state.optimizer, hp.lr, hp.wd)
    state.optimizer.zero_grad(set_to_none=True)
    loss, features = accumulate_gradients(state, batch)  # targets, context, predictor, loss, backward
    grads = state.guard.inspect(state.optimizer, state.scaler, loss, bool(state.clip_grad), batch.measure)
    if state.clip_grad:
        clip_context_gradients(state, grads)
    skip = state.guard.skip(state.scaler)
    optimizer_step(state.optimizer, state.scaler, skip)
    ema_update(*state.nets.ema_pairs(), hp.momentum, skip)
    return StepResult(loss, grads.norm if grads is not None else None, features)


def clip_context_gradients(state: TrainState, grads: Gradients | None) -> None:
    """The context encoder's gradients cut to a total norm of `clip_grad`, from the norms the
    guard took (where it took them); under FSDP, by torch's clip_grad_norm_ over the shards."""
    encoder = state.model.encoder.parameters()
    if state.nets.sharded:
        torch.nn.utils.clip_grad_norm_(encoder, state.clip_grad)
        return
    (grads or Gradients.of(state.model.encoder.parameters())).clip_(encoder, state.clip_grad)


def accumulate_gradients(state: TrainState, batch: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward over `batch` in `accum_steps` equal micro-batches (masks drawn for
    the whole batch, then split), gradients scaled so that they add up to the whole batch's;
    the processes' gradients are averaged on the last micro-batch only. Returns the batch's
    loss, averaged over the processes, and (on measured steps) its pooled target features."""
    n = state.accum_steps
    forward = state.forward or partial(loss_and_features, state.nets, state.autocast, state.a_l1)
    parts = zip(*(t.chunk(n) for t in (batch.images, batch.ctx_idx, batch.tgt_idx)), strict=True)
    total, pooled = None, []
    with state.nets.weights_for_step():  # (in bf16 and fp16, in one process: cast once for all parts)
        for i, part in enumerate(parts):
            with state.nets.no_sync() if i < n - 1 else nullcontext():
                loss, features = forward(*part)
                state.nets.backward(state.scaler.scale(loss / n if n > 1 else loss))
            if batch.measure:
                pooled.append(features.detach())
            total = loss.detach() if total is None else total + loss.detach()
    features = (pooled[0] if n == 1 else torch.cat(pooled)) if batch.measure else None
    return state.nets.mean(total / n if n > 1 else total), features


def loss_and_features(nets: Nets, autocast, a_l1: float, images: torch.Tensor, ctx_idx: torch.Tensor,
                      tgt_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`jepa_loss` of one (micro-)batch and its average-pooled target features [B, D]: the
    step's forward as a function of tensors alone, which `compile_forward` compiles whole.
    uint8 images (the loader's) are normalised here, on the device."""
    stats = {}
    loss = jepa_loss(nets, StepInputs(normalize(images), ctx_idx, tgt_idx), autocast, a_l1, stats)
    return loss, stats["target_features"][0]


def compile_forward(state: TrainState, dynamic: bool | None = None, cuda_graphs: bool = False) -> None:
    """Compile the step's forward (both encoders, the predictor, the loss) and so its
    backward as one graph each, instead of block by block; `dynamic=False` keeps one graph per
    mask shape (bucketed masks meet few); `cuda_graphs` replays them as CUDA graphs (see
    `runtime.compiled`). `train.fit.compile_guard` undoes it on a failure."""
    state.nets.copies = None  # the compiled step fuses autocast's casts into its kernels
    state.forward = runtime.compiled(partial(loss_and_features, state.nets, state.autocast, state.a_l1),
                                     dynamic=dynamic, cuda_graphs=cuda_graphs)


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
        stats.setdefault("target_features", []).append(h.float().mean(1))
    h = F.layer_norm(h.float(), h.shape[-1:])
    return gather_targets(h, batch.tgt_idx)


def gather_targets(tokens: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], tgt_idx [B, M, K] -> [B, M, K, D]."""
    batch = torch.arange(tokens.size(0), device=tokens.device)[:, None, None]
    return tokens[batch, tgt_idx]


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float,
               skip: torch.Tensor | None = None) -> None:
    """f̄_θ <- m f̄_θ + (1 - m) f_θ, in place and in fp32, over matching lists of weights, in a
    few foreach operators whatever the number of weights; where `skip` (a flag on the device)
    is 1, f̄_θ stays as it is: m becomes 1 and the added weight 0. The guarded form adds
    f_θ · ((1 - m) · (1 - skip)) in one fused multiply-add: the bits of the plain form when it
    does not skip (tests/train/test_step.py checks both on this machine's kernels)."""
    if skip is None:
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)
        return
    torch._foreach_mul_(target, torch.where(skip > 0, 1.0, momentum).to(target[0].dtype))
    weight = ((1 - skip) * (1.0 - momentum)).to(online[0].dtype)
    torch._foreach_addcmul_(target, online, [weight] * len(online))


def single_process_state(model: JEPA, autocast, precision: str = "fp32", lr: float = 1e-3,
                         wd: float = 0.04, **options) -> TrainState:
    """A TrainState for `model` in this process alone (bench, tests): plain networks, a fresh
    AdamW; `options` are TrainState's a_l1 and clip_grad."""
    device = next(model.parameters()).device
    nets = Nets.plain(model)
    nets.keep_weight_copies(runtime.DTYPES[precision])
    return TrainState(model, make_optimizer(model, lr, wd), make_scaler(device, precision), nets, autocast,
                      **options)
