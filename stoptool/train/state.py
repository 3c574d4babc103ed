"""Building a run's state, fresh or from its `latest` checkpoint: the model's weights, every
process's random state, the prepared and wrapped networks, the optimizer and the loss scaler.

The order is part of the result: the model is drawn from the run's seed before anything else
touches the global random state, and the random states are restored before the first step.
"""

from pathlib import Path

import torch

from stoptool.config import PretrainConfig, check_same_run
from stoptool.data.loader import stream_seed
from stoptool.io.checkpoint import Checkpoint, load_checkpoint, optimizer_state
from stoptool.models.jepa import JEPA, build_jepa
from stoptool.train.distributed import World, own_rng_states, shard_optimizer_state, wrap_networks
from stoptool.train.optim import make_optimizer, make_scaler, use_fused_like
from stoptool.train.runtime import DTYPES, prepare_model
from stoptool.train.step import TrainState, compile_forward


def load_resumable(latest: Path, cfg: PretrainConfig) -> Checkpoint:
    """The run's `latest`, once it is known to be a checkpoint of this same run."""
    saved = load_checkpoint(latest)
    check_same_run(latest, saved.meta.get("config", {}), cfg.to_dict())
    return saved


def build_model(cfg: PretrainConfig, device: torch.device, saved: Checkpoint | None) -> tuple[JEPA, int]:
    """The model drawn from the run's seed, with the saved weights if resuming; and its step."""
    torch.manual_seed(cfg.runtime.seed)
    model = build_jepa(cfg.model, drawn=saved is None).to(device)
    if saved is None:
        return model, 0
    for part in ("encoder", "target_encoder", "predictor"):
        getattr(model, part).load_state_dict(saved.part(part))
    return model, saved.meta["step"]


def restore_rng(saved: Checkpoint | None, world: World, seed: int, step: int, device: torch.device) -> None:
    """Same weights everywhere, but each process draws its own predictor noise: from the state
    it saved when resuming on as many processes (bit for bit then), else from a seed of its own
    (process 0 keeps the stream the run's seed started)."""
    own = (own_rng_states(saved.tensors, world) if saved is not None else None) or {}
    noise_seed = stream_seed(seed, world.rank, step, -3)
    if "cpu" in own:
        torch.set_rng_state(own["cpu"])
    elif not world.main:
        torch.manual_seed(noise_seed)
    if device.type == "cuda":  # (a run may move from CPU to GPUs on resume: no state of theirs)
        if "cuda" in own:
            torch.cuda.set_rng_state(own["cuda"], device)
        elif not world.main:
            torch.cuda.manual_seed(noise_seed)


def build_state(cfg: PretrainConfig, model: JEPA, saved: Checkpoint | None, world: World,
                device: torch.device, precision: str, notify=None) -> tuple[TrainState, bool]:
    """The TrainState of `model`, prepared and wrapped for this launch, with the optimizer and
    loss scaler restored from `saved`; and whether its step runs compiled."""
    rt = cfg.runtime
    prepared = prepare_model(model, device, precision, rt.attn, rt.grad_checkpoint, rt.compile)
    if prepared.compile_failure and notify:
        notify(f"torch.compile is unavailable here, running eagerly ({prepared.compile_failure})")
    nets = wrap_networks(model, world, device, rt.fsdp, rt.shard_group)
    nets.keep_weight_copies(DTYPES[precision])  # where it is autocast's arithmetic, cast once a step
    if rt.fsdp and not world.distributed and notify:
        notify("fsdp shards the weights across the processes of a torchrun launch; "
               "one process holds them all")
    if rt.shard_group is not None and not rt.fsdp and notify:
        notify(f"shard_group {rt.shard_group} sets how fsdp shards; without fsdp it changes nothing")
    # built after any sharding, over the parameters the step updates
    optimizer = make_optimizer(model, cfg.optim.start_lr, cfg.optim.wd)
    scaler = make_scaler(device, precision)
    if saved is not None:
        groups = use_fused_like(optimizer, saved.meta["optimizer_groups"])
        whole = optimizer_state(saved.part_raw("opt."), groups)
        optimizer.load_state_dict(shard_optimizer_state(whole, optimizer) if nets.sharded else whole)
        del whole  # the AdamW moments, whole, in every process's memory until here
        if scaler.is_enabled() and "grad_scaler" in saved.meta:
            scaler.load_state_dict(saved.meta["grad_scaler"])  # else the scale starts over, and overflows
    state = TrainState(model, optimizer, scaler, nets, prepared.autocast, cfg.model.a_l1, cfg.optim.clip_grad,
                       cfg.optim.accum_steps)
    if rt.cuda_graphs and device.type != "cuda" and notify:
        notify(f"cuda_graphs replays a step on a GPU; on {device.type} the step is compiled without them")
    if rt.compile:  # the whole forward and backward; bucketed masks: one graph per shape
        compile_forward(state, dynamic=False if cfg.masks.bucket else None,
                        cuda_graphs=rt.cuda_graphs and device.type == "cuda")
    return state, rt.compile
