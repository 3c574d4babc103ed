"""`stoptool pretrain`: check the inputs, build or resume the run, fit, report.

Everything a user can get wrong is checked before the run directory is touched. The parts:
`state` builds the model, optimizer and random states (fresh or from `latest`), `fit` runs the
loop, `checkpointer` writes checkpoints and `logs` the metrics; `step` is one training step.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stoptool.config import PretrainConfig
from stoptool.data.datasets import ArrayDataset, ImageDataset, open_dataset
from stoptool.data.device_decode import check_device, pretrain_transform
from stoptool.data.loader import SkipReport, check_readable, pretrain_loader
from stoptool.errors import UserError, WriteFailed, plural
from stoptool.flops import train_step_flops
from stoptool.io.checkpoint import LATEST, read_meta
from stoptool.io.paths import check_writable, write_report, write_text_atomic
from stoptool.masks import MaskSampler
from stoptool.runs import CONFIG, SUMMARY, RunClock, schedule_steps
from stoptool.train.checkpointer import Checkpointer
from stoptool.train.distributed import (
    check_batch,
    check_fsdp_support,
    check_same_step,
    check_shard_group,
    gather_lists,
    init_world,
    leave_world,
    replicas_agree,
    run_lock,
    sum_over_ranks,
    world_from_env,
)
from stoptool.train.fit import Fitted, Plan, Report, compile_guard, fit
from stoptool.train.logs import METRICS, Loggers, check_loggers, first_health
from stoptool.train.runtime import (
    cached_matmul_rate,
    default_workers,
    environment,
    resolve_device,
    resolve_precision,
)
from stoptool.train.schedules import make_schedules
from stoptool.train.state import build_model, build_state, load_resumable, restore_rng
from stoptool.train.watch import Alarms, Watch, online_eval


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    step: int
    epoch: int
    loss: float | None  # the last logged row's: the mean over the steps `loss_steps`
    seconds: float  # wall-clock of this launch, start-up included
    images_per_second: float | None  # over the steps after the launch's first, evaluations left out
    already_done: bool = False
    skipped_images: int = 0  # unreadable images passed over (summed over the processes)
    loss_steps: tuple[int, int] | None = None
    wall_clock: str | None = None  # as the table says it: this launch's, and the whole run's if resumed

    def rows(self) -> dict[str, object]:
        """The closing table, row name -> value."""
        return {
            "run directory": self.run_dir,
            "checkpoint": self.checkpoint,
            "steps": self.step,
            "epochs": self.epoch,
            "final loss": self.final_loss(),
            "wall-clock": self.wall_clock or f"{self.seconds:.1f} s",
            "img/s": self.images_per_second if self.images_per_second is not None else "-",
            **({"skipped images": f"{self.skipped_images} (unreadable), listed in {self.run_dir / SKIPPED}"}
               if self.skipped_images else {}),
            "metrics": self.run_dir / METRICS,
            "summary": self.run_dir / SUMMARY,
        }

    def final_loss(self) -> str:
        """The last logged loss, as the progress line showed it, with the steps it averages."""
        if self.loss is None:
            return "-"
        first, last = self.loss_steps
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        return f"{self.loss:.4f} (mean of {steps})"


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
    check_batch(world, cfg.optim.batch_size, cfg.optim.accum_steps)
    if rt.fsdp and world.distributed:
        check_fsdp_support()
        check_shard_group(world, rt.shard_group)
    device = init_world(world, resolve_device(rt.device))  # before any CUDA work: this rank's GPU
    done = False
    try:
        precision = resolve_precision(rt.precision, device)
        check_device(cfg.data.decode, device)
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
    start = time.perf_counter()
    run_dir = _run_dir(cfg)
    with run_lock(run_dir, "pretrain", world, device, notify), _resumable_on_write_failure(run_dir):
        return _train(cfg, resume, progress, notify, world, device, precision, start)


def _train(cfg: PretrainConfig, resume, progress, notify, world, device, precision,
           start: float) -> RunResult:
    """The launch, in the run directory it holds: check the data, build or resume, fit,
    summarise (a directory it made for a launch refused here goes again with the lock)."""
    data = _training_data(cfg, notify)
    ipe = len(data) // cfg.optim.batch_size
    last_step = _last_step(cfg, ipe, notify)
    run_dir = cfg.run_dir()
    latest = run_dir / LATEST
    saved = load_resumable(latest, cfg) if resume and latest.exists() else None
    clock = RunClock.resuming(saved.meta if saved is not None else None, start)
    model, step = build_model(cfg, device, saved)
    check_same_step(step, world, device)
    restore_rng(saved, world, cfg.runtime.seed, step, device)
    if step >= last_step:
        return RunResult(run_dir, latest, step, step // ipe, None, 0.0, None, already_done=True)
    if saved is not None and notify:
        notify(_resuming(run_dir, step, last_step, ipe))
    state, compiled = build_state(cfg, model, saved, world, device, precision, notify)
    del saved  # the whole checkpoint, in every process's memory until here
    if world.main:
        for torn in run_dir.glob(".*.safetensors.*.tmp"):  # being written when a process was killed
            torn.unlink(missing_ok=True)
        write_text_atomic(run_dir / CONFIG, cfg.to_yaml())
    rt = cfg.runtime
    plan = Plan(make_schedules(cfg.optim, ipe), ipe, last_step, cfg.optim.batch_size, rt.log_every,
                rt.save_every, run_dir, world, device, rt.checkpoint_every, rt.checkpoint_minutes)
    meta = {"kind": "pretrain", **model_meta(cfg), "config": cfg.to_dict(), "data": data.describe(),
            "iterations_per_epoch": ipe, "precision": precision}
    ckpt = Checkpointer(state, meta, ipe, world, device, clock=clock)
    loader, workers = _loader(cfg, data, step, last_step, world, device, notify)
    step_fn = compile_guard(step, notify) if compiled and not world.distributed else None
    report = _report(cfg, plan, data, step, precision, notify, progress)
    if progress:
        progress(step, last_step, None)
    try:
        fitted = fit(plan, state, loader, step, ckpt, report, step_fn)
    except UserError as err:  # a diverged run: what it found goes into the summary too
        if world.main and not isinstance(err, WriteFailed):
            write_report(run_dir / SUMMARY, {"step": step, "stopped": str(err),
                                             "alarms": report.watch.alarms.fired})
        raise
    finally:
        report.log.close()
    _list_skipped(list(loader.names), plan, step)
    facts = {"precision": precision, "workers": workers, "alarms": report.watch.alarms.fired,
             "stall_s": round(ckpt.longest_stall_s, 4)}
    return _finish(cfg, plan, state, fitted, step, clock, facts, notify)


@contextmanager
def _resumable_on_write_failure(run_dir: Path) -> Iterator[None]:
    """A write the machine refused (see `errors.WriteFailed`), completed for the user: the last
    good checkpoint and its step, and the command that resumes once the cause is mended."""
    try:
        yield
    except WriteFailed as err:
        raise _resumable(err, run_dir) from None


def _resumable(err: WriteFailed, run_dir: Path) -> WriteFailed:
    latest = run_dir / LATEST
    try:
        kept = f"the last good checkpoint is '{latest}', at step {read_meta(latest)['step']}"
    except UserError:
        kept = "no checkpoint had been written yet"
    config = run_dir / CONFIG
    again = (f"resume with: stoptool pretrain --config {config}" if config.is_file()
             else "then run the same command again")
    message = f"{err}; {kept}; make room (or mend the permissions), then {again}"
    return WriteFailed(message, err.path, err.needed, err.free)


def _report(cfg: PretrainConfig, plan: Plan, data, step: int, precision: str, notify, progress) -> Report:
    """The run's loggers (process 0's), alarms, online evaluation and MFU."""
    world, device, m = plan.world, plan.device, cfg.model
    names = cfg.watch.loggers() if world.main else ()
    log = Loggers(names, plan.run_dir, step, config=cfg.to_dict())
    evaluate = online_eval(cfg, data, world, device, precision, notify)

    def flops(ctx_idx, tgt_idx) -> float:
        return train_step_flops(m.arch, m.img_size, m.pred_width, m.pred_depth, ctx_idx.shape[1],
                                tgt_idx.shape[2], tgt_idx.shape[1], m.sigma).total

    rate = cached_matmul_rate(device, precision) if world.main else None
    first = first_health(plan.run_dir / METRICS) if step else {}
    watch = Watch(Alarms(notify if world.main else None, first=first), evaluate, flops, rate, world.size)
    return Report(log, watch, progress)


def _last_step(cfg: PretrainConfig, ipe: int, notify) -> int:
    """Where the run stops: the schedule's end (epochs × iterations per epoch), or `steps`
    before it; a `steps` past it gets a note."""
    schedule, steps = schedule_steps(cfg.optim.epochs, ipe), cfg.optim.steps
    if steps is not None and steps > schedule and notify:
        notify(f"--steps {steps} exceeds the schedule's {schedule} steps; stopping at {schedule}")
    return schedule_steps(cfg.optim.epochs, ipe, steps)


def _resuming(run_dir: Path, step: int, last_step: int, ipe: int) -> str:
    """The line a resumed run starts with; its epoch is the epochs completed, as checkpoints say."""
    return f"resuming {run_dir} from step {step} of {last_step} (epoch {step // ipe})"


def _training_data(cfg: PretrainConfig, notify=None) -> ImageDataset:
    # (with --download every process may fetch; each writes its own temporary file and renames it)
    d = cfg.data
    data = open_dataset(d.dataset, "train", d.subset, root=d.data_root, download=d.download)
    if data.subset_note() and notify:
        notify(data.subset_note())
    check_readable(data)
    if len(data) < cfg.optim.batch_size:
        raise UserError(f"the data set has {plural(len(data), 'image')}, "
                        f"fewer than the batch size {cfg.optim.batch_size}", key="batch_size")
    return data


def _run_dir(cfg: PretrainConfig) -> Path:
    run_dir = cfg.run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output path '{run_dir}' exists and is not a directory")
    check_writable(run_dir)
    check_loggers(cfg.watch.loggers())
    return run_dir


def _loader(cfg: PretrainConfig, data, step: int, last_step: int, world, device, notify) -> tuple:
    """The run's batches from `step` on (this process's slice of each), naming the unreadable
    images it skips (see `SkipReport`), and its worker count."""
    d, rt = cfg.data, cfg.runtime
    transform = pretrain_transform(cfg.model.img_size, d)
    workers = (rt.workers if rt.workers is not None
               else default_workers(device, isinstance(data, ArrayDataset), world.local_size))
    loader = pretrain_loader(data, transform, MaskSampler(cfg.mask_config()), cfg.optim.batch_size, rt.seed,
                             step, last_step, workers=workers, pin_memory=device.type == "cuda",
                             rank=world.rank, world=world.size)
    return SkipReport(loader, notify, str(cfg.run_dir() / SKIPPED)), workers


SKIPPED = "skipped.txt"


def _list_skipped(names: list[str], plan: Plan, first_step: int) -> None:
    """Every unreadable image skipped, one per line, in the run directory's skipped.txt:
    process 0 writes what every process met; a resumed run adds to its earlier part's list."""
    names = gather_lists(names, plan.world)
    path = plan.run_dir / SKIPPED
    if not plan.world.main:
        return
    earlier = path.read_text(encoding="utf-8").splitlines() if first_step and path.is_file() else []
    listed = list(dict.fromkeys(earlier + names))
    if listed:
        write_text_atomic(path, "".join(f"{name}\n" for name in listed))
    elif path.exists():  # a fresh run over a directory that held one
        path.unlink()


def _finish(cfg: PretrainConfig, plan: Plan, state, fitted: Fitted, first_step: int, clock: RunClock,
            facts: dict, notify) -> RunResult:
    """The run's summary (summary.json, by process 0) once every process has finished."""
    world, device, step = plan.world, plan.device, fitted.step
    sharded = state.nets.sharded
    in_sync = sharded or replicas_agree(state.model, world, device)  # shards differ by design
    skipped = round(sum_over_ranks(fitted.skipped, world, device))  # each rank loaded its own slice
    if not in_sync and notify:
        notify("the processes ended with different weights; rank 0's were saved")
    speed = round(fitted.images_per_second, 1) if fitted.images_per_second else None
    seconds, whole = clock.launch(), clock.whole()
    result = RunResult(plan.run_dir, plan.latest, step, step // plan.ipe, fitted.loss, seconds, speed,
                       skipped_images=skipped, loss_steps=fitted.loss_steps, wall_clock=clock.text(seconds))
    if not world.main:
        return result
    summary = {
        "step": step, "epoch": step // plan.ipe, "loss": fitted.loss, "loss_steps": fitted.loss_steps,
        "seconds": round(seconds, 2), "run_seconds": None if whole is None else round(whole, 2),
        "images_per_second": speed, "skipped_images": skipped,
        "checkpoint_stall_s": facts["stall_s"],
        "checkpoint": str(plan.latest), "precision": facts["precision"], "device": str(device),
        "workers": facts["workers"], "world_size": world.size, "alarms": facts["alarms"],
        **({"sharded": True, "shard_group": check_shard_group(world, cfg.runtime.shard_group)} if sharded
           else {"replicas_in_sync": in_sync} if world.distributed else {}),
    }
    summary["environment"] = environment()
    write_report(plan.run_dir / SUMMARY, summary)
    return result

