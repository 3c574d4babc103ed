"""Data-parallel pretraining under `torchrun`: one process per device, gradients averaged.

    torchrun --nproc-per-node 8 -m stoptool pretrain --config stop-vitb16-in1k
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m stoptool pretrain --config stop-vitl16-in1k

The world comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs,
gloo on CPUs. `--batch-size` stays the global batch: each rank takes its own contiguous
slice of every global batch and samples its own masks for it, as each process of the
released code runs its own mask collator. Rank 0 alone writes the run directory.

Two ways to keep the weights: DDP (every rank holds a whole replica) or, with `--fsdp`,
FSDP2's `fully_shard` (every rank holds 1/N of each weight, gradient, AdamW moment and of the
target encoder; a block's weights are gathered just for its forward and backward), within
groups of `--shard-group` processes when given (hybrid sharding: one sharded copy per group).
All average the same gradients; checkpoints hold whole tensors either way.
"""

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from timm.layers import use_reentrant_ckpt
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stoptool.errors import UserError, plural
from stoptool.models.encoder import encode
from stoptool.models.jepa import JEPA, predict
from stoptool.runs import RunLock
from stoptool.train.weight_copies import WeightCopies, add_into_grad, usable

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support: nothing is ever sharded
    DTensor = ()


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
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"process {world.local_rank} of this node has no GPU: the node has "
                            f"{plural(torch.cuda.device_count(), 'GPU')}; launch at most that many "
                            "processes per node (--nproc-per-node)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def leave_world(world: World, done: bool = True) -> None:
    """Leave the process group. After a normal finish (`done`), first wait for every rank: a
    rank that tears the group down while a peer still has a collective in flight with it can
    bring that peer down (a gloo process aborts). After an error, leave at once: a barrier
    would wait for ranks that may never come."""
    if world.distributed and dist.is_initialized():
        if done:
            dist.barrier()
        dist.destroy_process_group()


def check_batch(world: World, batch_size: int, accum_steps: int = 1) -> int:
    """The per-rank batch of a global `batch_size`, which `accum_steps` micro-batches split."""
    if batch_size % world.size:
        raise UserError(
            f"the batch size {batch_size} is not divisible by the {world.size} processes of this launch"
        )
    if (batch_size // world.size) % accum_steps:
        raise UserError(f"each of the {world.size} processes takes {batch_size // world.size} images a step, "
                        f"which do not split into accum_steps {accum_steps} equal micro-batches",
                        key="accum_steps")
    return batch_size // world.size


def any_rank(flags: tuple[bool, ...], world: World, device: torch.device) -> tuple[bool, ...]:
    """Each flag true on every rank if it is true on any (e.g. a stop signal seen by one
    process), in one collective."""
    if not world.distributed:
        return flags
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(x) for x in t.tolist())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextmanager
def run_lock(run_dir: Path, command: str, world: World, device: torch.device, notify=None) -> Iterator[None]:
    """The run directory, held by process 0 for the whole launch of `command` (see
    `runs.RunLock`): a second launch into it is refused at once, in every process of it."""
    lock = RunLock(run_dir, command) if world.main else None
    refused = None
    if lock is not None:
        try:
            note = lock.acquire()
            if note and notify:
                notify(note)
        except UserError as err:
            refused = err
    if any_rank((refused is not None,), world, device)[0]:
        raise refused or UserError(f"process 0 could not take the run directory '{run_dir}' (its message "
                                   "says why)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


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
            f"{hi.item()}): out must be on a filesystem that every node shares", key="out"
        )


def sum_over_ranks(value: float, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def summed(t: torch.Tensor, world: World) -> torch.Tensor:
    """`t` summed over the processes, on every process (itself in one process)."""
    if not world.distributed:
        return t
    total = t.clone()
    dist.all_reduce(total)
    return total


def gather_lists(items: list, world: World) -> list:
    """Every rank's `items`, one list in rank order, on every rank (small lists of strings:
    they travel pickled)."""
    if not world.distributed:
        return list(items)
    parts = [None] * world.size
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def rng_states(world: World, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's random states, on every process: rank 0's under `rng.cpu` and
    `rng.cuda` (the one-process names), rank r's under `rng.cpu.rank<r>`, `rng.cuda.rank<r>`."""
    own = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        own["rng.cuda"] = torch.cuda.get_rng_state(device)
    if not world.distributed:
        return own
    states = {}
    for name, state in own.items():
        parts = [torch.empty_like(state, device=device) for _ in range(world.size)]
        dist.all_gather(parts, state.to(device))  # states have one size: a uint8 vector per kind
        states[name] = parts[0].cpu()
        states.update({f"{name}.rank{r}": parts[r].cpu() for r in range(1, world.size)})
    return states


def own_rng_states(saved: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor] | None:
    """This process's random states (`cpu`, `cuda` if saved) in a checkpoint's tensors: rank
    0's always; another rank's if the checkpoint was written by as many processes (see
    `rng_states`), else None."""
    if world.rank:
        as_many = f"rng.cpu.rank{world.size - 1}" in saved and f"rng.cpu.rank{world.size}" not in saved
        if not as_many:
            return None
    suffix = f".rank{world.rank}" if world.rank else ""
    return {kind: saved[f"rng.{kind}{suffix}"] for kind in ("cpu", "cuda") if f"rng.{kind}{suffix}" in saved}


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
    """Context encoder then predictor as one module, so that DistributedDataParallel (or
    FSDP) sees, and averages the gradients of, every trainable weight in one forward.

    Returns the prediction and ‖A‖₁: under FSDP the predictor's A is whole only inside this
    forward, so the l1 penalty on it is taken here."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, images: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor):
        pred = predict(self.encoder, self.predictor, images, ctx_idx, tgt_idx)
        return pred, self.predictor.A.float().abs().sum()


class TargetNet(nn.Module):
    """The target encoder on whole images, as a module whose forward FSDP can hook."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.encoder, images)


class Nets:
    """The networks as a training step calls them, and the little it needs to know of the
    processes: plain modules in one process; under torchrun the online network wrapped by DDP
    or FSDP and, under FSDP, the sharded target encoder. The step is the same either way."""

    def __init__(self, model: JEPA, online: nn.Module, target: nn.Module, world: World = World(),
                 sharded: bool = False):
        self.model, self.world, self.sharded = model, world, sharded
        self.online = online  # (images, ctx_idx, tgt_idx) -> (prediction, ‖A‖₁)
        self._target = target
        self.copies: WeightCopies | None = None  # see `keep_weight_copies`

    @classmethod
    def plain(cls, model: JEPA) -> "Nets":
        return cls(model, OnlineNet(model.encoder, model.predictor), TargetNet(model.target_encoder))

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """f̄_θ's tokens of whole images."""
        tokens = self._target(images)
        if self.sharded:
            self._target.reshard()  # FSDP keeps a root's weights gathered after a forward without backward
        return tokens

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """A scalar tensor averaged over the processes (every process gets the same number),
        without waiting for it."""
        if not self.world.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world.size

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`: each trainable weight's gradient added into its `.grad`. In one
        process the gradients are taken by `torch.autograd.grad` and added in one foreach
        operator, which spares the engine's per-weight AccumulateGrad (a `detach` each, a
        tenth of a step's operators at ViT-B's depth); the same numbers land in `.grad`. Under
        torchrun DDP and FSDP reduce the gradients from hooks on those AccumulateGrads, so there
        it is `loss.backward()` itself, and so it is with timm's reentrant recomputation
        (`TIMM_REENTRANT_CKPT=1`), which `autograd.grad` cannot run through."""
        if self.world.distributed or self._recomputes_reentrant():
            loss.backward()
            return
        params = [p for p in self.model.parameters() if p.requires_grad]  # (in `weights_for_step`, copies)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        add_into_grad(params, grads, self.copies)

    def _recomputes_reentrant(self) -> bool:
        """timm's reentrant recomputation of the encoder's blocks, which `autograd.grad` cannot
        run through."""
        return use_reentrant_ckpt() and self.model.encoder.grad_checkpointing

    def keep_weight_copies(self, dtype: torch.dtype) -> bool:
        """Run each step's networks on `dtype` copies of the weights autocast would cast,
        cast once a step (`train.weight_copies`), where that is autocast's arithmetic and the
        gradients come back through `backward` above; whether they do. `compile_forward`
        drops them: a compiled step fuses the casts itself."""
        if not usable(dtype, self.world.distributed, self._recomputes_reentrant()):
            return False
        m = self.model  # (A is read outside its layer too: OnlineNet's l1 penalty takes it in fp32)
        self.copies = WeightCopies((m.encoder, m.predictor, m.target_encoder), dtype, keep=(m.predictor.A,))
        return True

    def weights_for_step(self) -> AbstractContextManager:
        """The context a step's forward and backward run in: on the low-precision copies,
        cast from the weights once, where they are kept; else as the weights are."""
        if self.copies is None:
            return nullcontext()
        self.copies.refresh()
        return self.copies.swapped()

    def no_sync(self) -> AbstractContextManager:
        """Backward passes inside keep their gradients in this process (micro-batches before a
        batch's last): DDP's no_sync, FSDP's gradient sync turned off for the while."""
        if isinstance(self.online, DistributedDataParallel):
            return self.online.no_sync()
        if hasattr(self.online, "set_requires_gradient_sync"):
            return _fsdp_no_sync(self.online)
        return nullcontext()

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The target encoder's weights and the context encoder's, as this process holds them
        (its shards under FSDP, where both encoders are sharded alike): the EMA's operands.
        The context encoder's weights are read through `.data`, which dispatches nothing (a
        `detach` would be one operator per weight and step)."""
        target = [local(p) for p in self.model.target_encoder.parameters()]
        online = [local(p.data) for p in self.model.encoder.parameters()]
        return target, online


@contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def wrap_networks(model: JEPA, world: World, device: torch.device, fsdp: bool = False,
                  shard_group: int | None = None) -> Nets:
    """`model`'s networks for this launch: plain in one process, DDP or (with `fsdp`) FSDP
    under torchrun. Every process starts from rank 0's weights."""
    if not world.distributed:
        return Nets.plain(model)
    if fsdp:
        online, target = fully_sharded(model, world, device, shard_group)
        return Nets(model, online, target, world, sharded=True)
    broadcast_module(model.target_encoder, world)  # DDP keeps the rest in sync
    online = data_parallel(OnlineNet(model.encoder, model.predictor), world, device)
    return Nets(model, online, TargetNet(model.target_encoder), world)


def data_parallel(online: nn.Module, world: World, device: torch.device) -> nn.Module:
    """`online` wrapped for gradient averaging across ranks (itself when there is one rank)."""
    if not world.distributed:
        return online
    ids = [device.index] if device.type == "cuda" else None
    # gradients live in DDP's buckets instead of beside them: no second copy of them in memory
    return DistributedDataParallel(online, device_ids=ids, gradient_as_bucket_view=True)


def check_fsdp_support(distribute=None) -> None:
    """--fsdp needs FSDP2 (`fully_shard`) and `distribute_tensor(..., src_data_rank=None)`: a
    torch without them gets one line saying so, before any process group is made."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        distribute = distribute or distribute_tensor
        supported = "src_data_rank" in inspect.signature(distribute).parameters
    except (ImportError, NameError):
        supported = False
    if not supported:
        raise UserError(f"fsdp needs a newer torch than {torch.__version__} (FSDP2's fully_shard and "
                        "distribute_tensor's src_data_rank): upgrade torch, or train without fsdp",
                        key="fsdp")


def check_shard_group(world: World, shard_group: int | None) -> int:
    """The number of processes that share one copy of the weights: all of them by default."""
    group = world.size if shard_group is None else shard_group
    if group < 1 or world.size % group:
        raise UserError(f"shard_group {group} does not divide the {plural(world.size, 'process')} of "
                        "this launch: give a divisor, e.g. the processes per node", key="shard_group")
    return group


def fully_sharded(model: JEPA, world: World, device: torch.device,
                  shard_group: int | None = None) -> tuple[nn.Module, nn.Module]:
    """Shard `model` across the ranks in place (FSDP2): every transformer block is a unit of
    its own, the rest of the online network (patch embedding, norms, the predictor's A, b, m̃)
    and of the target encoder form one unit each. Returns the online and the target network
    to call in the step. Weights are taken from rank 0 first, as DDP does.

    With `shard_group` G below the world size (hybrid sharding), consecutive groups of G ranks
    (a node, with G = processes per node) each hold one sharded copy: gradients are
    reduce-scattered inside a group and all-reduced between groups, so the gathers that every
    block's forward and backward need stay inside the group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The prediction comes back as a reshaped view; the step never changes it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPOnlineNet\) returned a view")
    group = check_shard_group(world, shard_group)
    broadcast_module(model, world)
    if group == world.size:
        mesh = init_device_mesh(device.type, (world.size,))
    else:  # a 2-D mesh: FSDP2 replicates along the first dimension and shards along the second
        mesh = init_device_mesh(device.type, (world.size // group, group),
                                mesh_dim_names=("replicate", "shard"))
    online, target = OnlineNet(model.encoder, model.predictor), TargetNet(model.target_encoder)
    for blocks in (model.encoder.blocks, model.predictor.predictor_blocks, model.target_encoder.blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(online, mesh=mesh)
    fully_shard(target, mesh=mesh)
    return online, target


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a view: in-place updates reach the weight);
    any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must ask, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_state(tensors: dict, keep: bool = True) -> dict:
    """A state dict (model or optimizer, nested) with every shard gathered into a whole tensor,
    one tensor at a time and moved to the CPU, so that a device never holds more than one
    whole tensor beside its shards. Every rank must call it (the gathers are collectives); only
    a rank with `keep` holds the result (the others get None in place of each gathered tensor)."""
    out = {}
    for k, v in tensors.items():
        if isinstance(v, dict):
            out[k] = whole_state(v, keep)
        elif isinstance(v, DTensor):
            gathered = v.full_tensor()  # on every rank: it is a collective
            out[k] = gathered.cpu() if keep else None
            del gathered
        else:
            out[k] = v
    return out


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state dict (whole AdamW moments, as the checkpoint holds them) with each
    moment cut to this rank's shard of its weight, before it is loaded into an optimizer over
    sharded weights: a device holds one whole moment at most, briefly, while its shard is cut.
    Each rank cuts its own chunk from its own copy (the checkpoint is the same everywhere), with
    no communication."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for idx, values in state["state"].items():
        p = params[idx]
        if isinstance(p, DTensor):
            values = {
                key: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                if torch.is_tensor(v) and v.shape == p.shape else v
                for key, v in values.items()
            }
        sharded[idx] = values
    return {**state, "state": sharded}
