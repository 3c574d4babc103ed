"""The pretraining engine: resume, loop, schedules, checkpoints, logs, signals.

Everything a user can get wrong is checked before the run directory is touched.
"""

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml

from stoptool.config import PretrainConfig
from stoptool.data.datasets import ArrayDataset, open_dataset
from stoptool.data.loader import check_readable, pretrain_loader, stream_seed
from stoptool.data.transforms import PretrainTransform
from stoptool.errors import UserError, plural
from stoptool.io.checkpoint import (
    LATEST,
    Checkpoint,
    load_checkpoint,
    optimizer_state,
    optimizer_tensors,
    save_checkpoint,
)
from stoptool.io.paths import check_writable, write_report, write_text_atomic
from stoptool.masks import MaskSampler
from stoptool.models.jepa import JEPA, build_jepa
from stoptool.train.distributed import (
    OnlineNet,
    World,
    any_rank,
    barrier,
    broadcast_module,
    check_batch,
    check_fsdp_support,
    check_same_step,
    check_shard_group,
    data_parallel,
    fully_sharded,
    init_world,
    leave_world,
    mean_over_ranks,
    own_rng_states,
    replicas_agree,
    rng_states,
    shard_optimizer_state,
    sum_over_ranks,
    whole,
    whole_state,
    world_from_env,
)
from stoptool.train.runtime import (
    attention_impl,
    autocast_factory,
    compile_blocks,
    default_workers,
    eager_on_compile_failure,
    resolve_device,
    resolve_precision,
    set_attention,
)
from stoptool.train.schedules import make_schedules
from stoptool.train.step import NonFiniteLoss, StepInputs, make_optimizer, train_step, use_fused_like

METRICS = "metrics.jsonl"
# Fields that may change when a run is resumed; every other field must match the saved run.
RESUMABLE_CHANGES = {
    "init",  # how fresh weights are drawn: a resumed run loads its own
    "data_root",
    "download",
    "steps",
    "epochs",
    "out",
    "device",
    "precision",
    "attn",
    "workers",
    "log_every",
    "save_every",
    "compile",
    "grad_checkpoint",
    "fsdp",  # checkpoints hold whole tensors either way
    "shard_group",
}


class Interrupted(Exception):
    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at a step boundary")
        self.signum, self.checkpoint = signum, checkpoint


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    step: int
    epoch: int
    loss: float | None
    seconds: float
    images_per_second: float | None
    already_done: bool = False
    skipped_images: int = 0  # unreadable images passed over (summed over the processes)


def model_meta(cfg: PretrainConfig) -> dict:
    return {
        "arch": cfg.arch,
        "img_size": cfg.img_size,
        "patch": cfg.patch,
        "sigma": cfg.sigma,
        "pred_depth": cfg.pred_depth,
        "pred_width": cfg.pred_width,
        "pred_pos": cfg.pred_pos,
        "noise_on": cfg.noise_on,
        "cov": cfg.cov,
        "a_l1": cfg.a_l1,
    }


def model_tensors(model: JEPA, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of the three networks, whole (gathered from the ranks under FSDP; see
    `whole_state` for `keep`)."""
    tensors = {}
    for part in ("encoder", "target_encoder", "predictor"):
        state = whole_state(getattr(model, part).state_dict(), keep)
        tensors.update({f"{part}.{k}": v for k, v in state.items()})
    return tensors


def _check_resumable(saved: dict, cfg: PretrainConfig, path: Path) -> None:
    now = cfg.to_dict()
    diff = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(
            f"'{path}' holds a run with {k}={saved.get(k)!r}, not {now[k]!r}: pass --no-resume "
            "to start over there, or --out for a new run directory"
        )


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves, and exits."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _NoLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _row_step(line: str) -> float:
    """The step of a metrics row; infinity for a blank or torn line (a run killed mid-write)."""
    try:
        row = json.loads(line)
        return row.get("step", 0) if isinstance(row, dict) else math.inf
    except json.JSONDecodeError:
        return math.inf


class MetricsLog:
    """JSON lines, one per logged step; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [r for r in path.read_text().splitlines() if _row_step(r) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in kept))
            os.replace(tmp, path)  # a kill here leaves the old file whole
        self._file = open(path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tb"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def pretrain(cfg: PretrainConfig, resume: bool = True, progress=None, notify=None) -> RunResult:
    """Train per `cfg`.

    `progress`, if given, is called as progress(step, total, row | None); `notify(text)` gets
    one-line notes for the user (e.g. that torch.compile is unavailable here). Under torchrun
    every process calls this; they train one model together (see train/distributed.py).
    """
    cfg.validate()
    world = world_from_env()
    check_batch(world, cfg.batch_size)
    if cfg.fsdp and world.distributed:
        check_fsdp_support()
        check_shard_group(world, cfg.shard_group)
    device = init_world(world, resolve_device(cfg.device))  # before any CUDA work: this rank's GPU
    done = False
    try:
        precision = resolve_precision(cfg.precision, device)
        if cfg.fsdp and world.distributed and precision == "fp16":
            picked = " (what --precision auto picks on this GPU)" if cfg.precision == "auto" else ""
            raise UserError(f"--fsdp trains in bf16 or fp32, not fp16{picked}: pass --precision fp32")
        result = _pretrain(cfg, resume, progress, notify, world, device, precision)
        done = True
        return result
    finally:
        leave_world(world, done)


def _pretrain(cfg: PretrainConfig, resume, progress, notify, world: World, device, precision) -> RunResult:
    # (with --download every process may fetch; each writes its own temporary file and renames it)
    data = open_dataset(cfg.dataset, "train", cfg.subset, root=cfg.data_root, download=cfg.download)
    check_readable(data)
    if len(data) < cfg.batch_size:
        raise UserError(f"the data set has {plural(len(data), 'image')}, "
                        f"fewer than the batch size {cfg.batch_size}")
    ipe = len(data) // cfg.batch_size
    sched = make_schedules(cfg, ipe)
    last_step = cfg.epochs * ipe if cfg.steps is None else min(cfg.epochs * ipe, cfg.steps)
    run_dir = cfg.run_dir()
    latest = run_dir / LATEST
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output path '{run_dir}' exists and is not a directory")
    check_writable(run_dir)
    saved = load_checkpoint(latest) if resume and latest.exists() else None
    if saved is not None:
        _check_resumable(saved.meta.get("config", {}), cfg, latest)

    torch.manual_seed(cfg.seed)
    model = build_jepa(cfg).to(device)
    step = 0
    if saved is not None:
        for part in ("encoder", "target_encoder", "predictor"):
            getattr(model, part).load_state_dict(saved.part(part))
        step = saved.meta["step"]
    check_same_step(step, world, device)
    # Same weights everywhere, but each rank draws its own predictor noise: from the state it
    # saved when resuming on as many processes (bit for bit then), else from a seed of its own.
    own = (own_rng_states(saved.tensors, world) if saved is not None else None) or {}
    noise_seed = stream_seed(cfg.seed, world.rank, step, -3)
    if "cpu" in own:
        torch.set_rng_state(own["cpu"])
    elif not world.main:
        torch.manual_seed(noise_seed)
    if device.type == "cuda":  # (a run may move from CPU to GPUs on resume: no state of theirs)
        if "cuda" in own:
            torch.cuda.set_rng_state(own["cuda"], device)
        elif not world.main:
            torch.cuda.manual_seed(noise_seed)
    if step >= last_step:
        return RunResult(run_dir, latest, step, step // ipe, None, 0.0, None, already_done=True)

    set_attention(model, attention_impl(cfg.attn, device, precision))
    if cfg.grad_checkpoint:
        model.encoder.set_grad_checkpointing(True)
        model.predictor.grad_checkpointing = True
    autocast = autocast_factory(device, precision)
    compiled = False
    if cfg.compile:
        failure = compile_blocks(model, autocast)
        compiled = failure is None
        if failure and notify:
            notify(f"torch.compile is unavailable here, running eagerly ({failure})")
    sharded = cfg.fsdp and world.distributed
    online = target = None
    if sharded:
        online, target = fully_sharded(model, world, device, cfg.shard_group)
    elif world.distributed:
        broadcast_module(model.target_encoder, world)  # DDP keeps the rest in sync
        online = data_parallel(OnlineNet(model.encoder, model.predictor), world, device)
    elif cfg.fsdp and notify:
        notify("--fsdp shards the weights across the processes of a torchrun launch; "
               "one process holds them all")
    if cfg.shard_group is not None and not cfg.fsdp and notify:
        notify(f"--shard-group {cfg.shard_group} sets how --fsdp shards; without --fsdp it changes nothing")
    # built after any sharding, over the parameters the step updates
    optimizer = make_optimizer(model, cfg.start_lr, cfg.wd)
    if saved is not None:
        groups = use_fused_like(optimizer, saved.meta["optimizer_groups"])
        state = optimizer_state(saved.part_raw("opt."), groups)
        optimizer.load_state_dict(shard_optimizer_state(state, optimizer) if sharded else state)
        del state
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if scaler is not None and saved is not None and "grad_scaler" in saved.meta:
        scaler.load_state_dict(saved.meta["grad_scaler"])  # else the scale starts over, and overflows
    del saved  # the whole checkpoint, in every process's memory until here
    reduce = (lambda t: mean_over_ranks(t, world)) if world.distributed else None
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log = MetricsLog(run_dir / METRICS, step) if world.main else _NoLog()
    transform = PretrainTransform(cfg.img_size, cfg.crop_scale, cfg.hflip, cfg.blur, cfg.gray)
    sampler = MaskSampler(cfg.mask_config())
    workers = (
        cfg.workers
        if cfg.workers is not None
        else default_workers(device, isinstance(data, ArrayDataset), world.local_size)
    )
    meta = {
        "kind": "pretrain",
        **model_meta(cfg),
        "config": cfg.to_dict(),
        "data": data.describe(),
        "iterations_per_epoch": ipe,
        "precision": precision,
    }

    def save(path: Path, with_state: bool = True) -> None:
        rng = rng_states(world, device) if with_state else {}  # every rank takes part
        if not world.main and not sharded:
            return
        # under FSDP every rank takes part in gathering the tensors; rank 0 alone keeps them
        tensors = model_tensors(model, keep=world.main)
        state = whole_state(optimizer.state_dict(), keep=world.main) if with_state else None
        if not world.main:
            return
        extra = {"step": step, "epoch": step // ipe}
        if with_state:
            opt_tensors, groups = optimizer_tensors(state)
            tensors.update(opt_tensors)
            tensors.update(rng)
            extra["optimizer_groups"] = groups
            if scaler is not None:  # fp16: the loss scale it has settled on, and its growth count
                extra["grad_scaler"] = scaler.state_dict()
        save_checkpoint(path, Checkpoint({**meta, **extra}, tensors))

    def compile_failed(reason: str) -> None:
        nonlocal compiled
        compiled = False
        if notify:
            notify(f"torch.compile failed at step {step}, running eagerly from here ({reason})")

    model.train()
    start_time = time.perf_counter()
    window = {"t": start_time, "steps": 0, "loss": 0.0}
    first_step, loss, skipped = step, None, 0
    if progress:
        progress(step, last_step, None)
    try:
        with _StopFlag() as stop:
            loader = pretrain_loader(
                data,
                transform,
                sampler,
                cfg.batch_size,
                cfg.seed,
                step,
                last_step,
                workers=workers,
                pin_memory=device.type == "cuda",
                rank=world.rank,
                world=world.size,
            )
            for images, ctx_idx, tgt_idx, n_skipped in loader:
                inputs = StepInputs(
                    images.to(device, non_blocking=True),
                    ctx_idx.to(device, non_blocking=True),
                    tgt_idx.to(device, non_blocking=True),
                )
                lr, wd, m = sched.at(step)
                args = (model, optimizer, inputs, lr, wd, m, autocast, scaler, cfg.a_l1, cfg.clip_grad,
                        online, reduce, target)
                try:
                    if compiled and not world.distributed:
                        loss = eager_on_compile_failure(partial(train_step, *args), model, compile_failed)
                    else:
                        loss = train_step(*args)
                except NonFiniteLoss as err:
                    kept = (f"the last good checkpoint is kept in '{latest}'" if latest.exists()
                            else "no checkpoint had been written yet")
                    hint = "try a lower --lr" + (", or --precision fp32: fp16 activations overflow "
                                                 "past 65504" if precision == "fp16" else "")
                    raise UserError(f"training stopped at step {step}: {err}; {kept} ({hint})") from None
                step += 1
                skipped += n_skipped
                window["steps"] += 1
                window["loss"] += loss
                if step % cfg.log_every == 0 or step == last_step:
                    row = _metrics_row(model, step, ipe, window, cfg.batch_size, lr, wd, m)
                    log.write(row)
                    window = {"t": time.perf_counter(), "steps": 0, "loss": 0.0}
                    if progress:
                        progress(step, last_step, row)
                elif progress:
                    progress(step, last_step, None)
                if any_rank(stop.signum is not None, world, device):
                    save(latest)
                    barrier(world)  # no process exits before process 0 has written latest
                    raise Interrupted(stop.signum or signal.SIGTERM, latest)
                if step % ipe == 0 and step < last_step:  # an epoch ended: latest, and maybe a snapshot
                    save(latest)
                    if (step // ipe) % cfg.save_every == 0:
                        save(run_dir / f"epoch{step // ipe:04d}.safetensors", with_state=False)
            save(latest)
    finally:
        log.close()
    seconds = time.perf_counter() - start_time
    in_sync = sharded or replicas_agree(model, world, device)  # shards differ by design
    skipped = round(sum_over_ranks(skipped, world, device))  # each rank loaded its own slice
    if not in_sync and notify:
        notify("the processes ended with different weights; rank 0's were saved")
    if not world.main:
        return RunResult(run_dir, latest, step, step // ipe, loss, seconds, None)
    images = (step - first_step) * cfg.batch_size
    summary = {
        "step": step,
        "epoch": step // ipe,
        "loss": loss,
        "seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 1) if seconds else None,
        "skipped_images": skipped,
        "checkpoint": str(latest),
        "precision": precision,
        "device": str(device),
        "workers": workers,
        "world_size": world.size,
        **({"sharded": True, "shard_group": check_shard_group(world, cfg.shard_group)} if sharded
           else {"replicas_in_sync": in_sync} if world.distributed else {}),
    }
    write_report(run_dir / "summary.json", summary)
    return RunResult(run_dir, latest, step, step // ipe, loss, seconds, summary["images_per_second"],
                     skipped_images=skipped)


def _metrics_row(model: JEPA, step, ipe, window, batch, lr, wd, m) -> dict:
    elapsed = time.perf_counter() - window["t"]
    n = max(1, window["steps"])
    pred = model.predictor
    return {
        "step": step,
        "epoch": round(step / ipe, 3),
        "loss": window["loss"] / n,
        "lr": lr,
        "wd": wd,
        "momentum": m,
        "A_norm": whole(pred.A.detach()).float().norm().item(),
        "mask_token_norm": whole(pred.mask_token.detach()).float().norm().item(),
        "img_per_s": window["steps"] * batch / elapsed if elapsed > 0 else math.nan,
        "time": time.time(),
    }
