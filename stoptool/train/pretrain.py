"""`stoptool pretrain`: check the inputs, build or resume the run, fit, report.

Everything a user can get wrong is checked before the run directory is touched. The parts:
`state` builds the model, optimizer and random states (fresh or from `latest`), `fit` runs the
loop, `checkpointer` writes checkpoints and `logs` the metrics; `step` is one training step.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from stoptool.config import PretrainConfig
from stoptool.data.datasets import ArrayDataset, ImageDataset, open_dataset
from stoptool.data.loader import check_readable, pretrain_loader
from stoptool.data.transforms import PretrainTransform
from stoptool.errors import UserError, plural
from stoptool.io.checkpoint import LATEST
from stoptool.io.paths import check_writable, write_report, write_text_atomic
from stoptool.masks import MaskSampler
from stoptool.train.checkpointer import Checkpointer
from stoptool.train.distributed import (
    check_batch,
    check_fsdp_support,
    check_same_step,
    check_shard_group,
    init_world,
    leave_world,
    replicas_agree,
    sum_over_ranks,
    world_from_env,
)
from stoptool.train.fit import Fitted, Plan, compile_guard, fit
from stoptool.train.logs import METRICS, MetricsLog, NoLog
from stoptool.train.runtime import default_workers, resolve_device, resolve_precision
from stoptool.train.schedules import make_schedules
from stoptool.train.state import build_model, build_state, load_resumable, restore_rng


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
    """What every checkpoint says of the model it holds."""
    m = cfg.model
    return {"arch": m.arch, "img_size": m.img_size, "patch": m.patch, "sigma": m.sigma,
            "pred_depth": m.pred_depth, "pred_width": m.pred_width, "pred_pos": m.pred_pos,
            "noise_on": m.noise_on, "cov": m.cov, "a_l1": m.a_l1}


def pretrain(cfg: PretrainConfig, resume: bool = True, progress=None, notify=None) -> RunResult:
    """Train per `cfg`.

    `progress`, if given, is called as progress(step, total, row | None); `notify(text)` gets
    one-line notes for the user (e.g. that torch.compile is unavailable here). Under torchrun
    every process calls this; they train one model together (see train/distributed.py).
    """
    cfg.validate()
    rt = cfg.runtime
    world = world_from_env()
    check_batch(world, cfg.optim.batch_size)
    if rt.fsdp and world.distributed:
        check_fsdp_support()
        check_shard_group(world, rt.shard_group)
    device = init_world(world, resolve_device(rt.device))  # before any CUDA work: this rank's GPU
    done = False
    try:
        precision = resolve_precision(rt.precision, device)
        if rt.fsdp and world.distributed and precision == "fp16":
            picked = " (what --precision auto picks on this GPU)" if rt.precision == "auto" else ""
            raise UserError(f"fsdp trains in bf16 or fp32, not fp16{picked}: set precision to fp32",
                            key="precision")
        result = _pretrain(cfg, resume, progress, notify, world, device, precision)
        done = True
        return result
    finally:
        leave_world(world, done)


def _pretrain(cfg: PretrainConfig, resume, progress, notify, world, device, precision) -> RunResult:
    data = _training_data(cfg)
    ipe = len(data) // cfg.optim.batch_size
    last_step = cfg.optim.epochs * ipe
    if cfg.optim.steps is not None:
        last_step = min(last_step, cfg.optim.steps)
    run_dir = _run_dir(cfg)
    latest = run_dir / LATEST
    saved = load_resumable(latest, cfg) if resume and latest.exists() else None
    model, step = build_model(cfg, device, saved)
    check_same_step(step, world, device)
    restore_rng(saved, world, cfg.runtime.seed, step, device)
    if step >= last_step:
        return RunResult(run_dir, latest, step, step // ipe, None, 0.0, None, already_done=True)
    state, compiled = build_state(cfg, model, saved, world, device, precision, notify)
    del saved  # the whole checkpoint, in every process's memory until here
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    plan = Plan(make_schedules(cfg.optim, ipe), ipe, last_step, cfg.optim.batch_size, cfg.runtime.log_every,
                cfg.runtime.save_every, run_dir, world, device)
    meta = {"kind": "pretrain", **model_meta(cfg), "config": cfg.to_dict(), "data": data.describe(),
            "iterations_per_epoch": ipe, "precision": precision}
    ckpt = Checkpointer(state, meta, ipe, world, device)
    loader, workers = _loader(cfg, data, step, last_step, world, device)
    step_fn = compile_guard(step, notify) if compiled and not world.distributed else None
    log = MetricsLog(run_dir / METRICS, step) if world.main else NoLog()
    start = time.perf_counter()
    if progress:
        progress(step, last_step, None)
    try:
        fitted = fit(plan, state, loader, step, ckpt, log, progress, step_fn)
    finally:
        log.close()
    seconds = time.perf_counter() - start
    return _finish(cfg, plan, state, fitted, step, seconds, {"precision": precision, "workers": workers},
                   notify)


def _training_data(cfg: PretrainConfig) -> ImageDataset:
    # (with --download every process may fetch; each writes its own temporary file and renames it)
    d = cfg.data
    data = open_dataset(d.dataset, "train", d.subset, root=d.data_root, download=d.download)
    check_readable(data)
    if len(data) < cfg.optim.batch_size:
        raise UserError(f"the data set has {plural(len(data), 'image')}, "
                        f"fewer than the batch size {cfg.optim.batch_size}")
    return data


def _run_dir(cfg: PretrainConfig) -> Path:
    run_dir = cfg.run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output path '{run_dir}' exists and is not a directory")
    check_writable(run_dir)
    return run_dir


def _loader(cfg: PretrainConfig, data, step: int, last_step: int, world, device) -> tuple:
    """The run's batches from `step` on (this process's slice of each), and its worker count."""
    d, rt = cfg.data, cfg.runtime
    transform = PretrainTransform(cfg.model.img_size, d.crop_scale, d.hflip, d.blur, d.gray)
    workers = (rt.workers if rt.workers is not None
               else default_workers(device, isinstance(data, ArrayDataset), world.local_size))
    loader = pretrain_loader(data, transform, MaskSampler(cfg.mask_config()), cfg.optim.batch_size, rt.seed,
                             step, last_step, workers=workers, pin_memory=device.type == "cuda",
                             rank=world.rank, world=world.size)
    return loader, workers


def _finish(cfg: PretrainConfig, plan: Plan, state, fitted: Fitted, first_step: int, seconds: float,
            facts: dict, notify) -> RunResult:
    """The run's summary (summary.json, by process 0) once every process has finished."""
    world, device, step = plan.world, plan.device, fitted.step
    sharded = state.nets.sharded
    in_sync = sharded or replicas_agree(state.model, world, device)  # shards differ by design
    skipped = round(sum_over_ranks(fitted.skipped, world, device))  # each rank loaded its own slice
    if not in_sync and notify:
        notify("the processes ended with different weights; rank 0's were saved")
    result = RunResult(plan.run_dir, plan.latest, step, step // plan.ipe, fitted.loss, seconds, None,
                       skipped_images=skipped)
    if not world.main:
        return result
    images = (step - first_step) * cfg.optim.batch_size
    result.images_per_second = round(images / seconds, 1) if seconds else None
    summary = {
        "step": step, "epoch": step // plan.ipe, "loss": fitted.loss, "seconds": round(seconds, 2),
        "images_per_second": result.images_per_second, "skipped_images": skipped,
        "checkpoint": str(plan.latest), "precision": facts["precision"], "device": str(device),
        "workers": facts["workers"], "world_size": world.size,
        **({"sharded": True, "shard_group": check_shard_group(world, cfg.runtime.shard_group)} if sharded
           else {"replicas_in_sync": in_sync} if world.distributed else {}),
    }
    write_report(plan.run_dir / "summary.json", summary)
    return result

