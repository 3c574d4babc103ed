"""`stoptool finetune`: check the inputs, build or resume the run, fit, evaluate, report.

The engine is pretraining's: `train.fit` (the loop, checkpoints inside and at the end of
epochs, stop signals, loggers, alarms), `train.distributed` (torchrun, the run directory's
lock), `train.runtime` (device, precision, attention), `train.checkpointer` and
`train.schedules`. What is fine-tuning's own: the classifier and its optimizer (`model`), the
input (`data`), the step (`step`) and the evaluation (`evaluation`). Everything a user can get
wrong is checked before the run directory is touched.
"""

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stoptool.config import RESUMABLE_CHANGES
from stoptool.data.datasets import ArrayDataset
from stoptool.data.loader import check_readable
from stoptool.data.transforms import MEAN, STD
from stoptool.errors import UserError, WriteFailed, plural
from stoptool.finetune.config import FinetuneConfig
from stoptool.finetune.data import (
    Skips,
    Splits,
    eval_transform,
    make_loss,
    make_mixup,
    open_splits,
    train_loader,
    train_transform,
)
from stoptool.finetune.evaluation import Evaluation, feature_moments
from stoptool.finetune.model import (
    Source,
    add_head_norm,
    build_classifier,
    build_timm,
    classifier_state,
    classifier_tensors,
    describe_source,
    load_source,
    make_optimizer,
)
from stoptool.finetune.step import Batch, FinetuneState, compile_forward, finetune_step
from stoptool.io.checkpoint import (
    FINETUNE,
    LATEST,
    Checkpoint,
    load_checkpoint,
    optimizer_state,
    resolve_checkpoint,
)
from stoptool.io.paths import check_writable, write_report, write_text_atomic
from stoptool.io.timm_source import is_timm
from stoptool.models.archs import parse_arch
from stoptool.runs import CONFIG, SUMMARY, RunClock, schedule_steps
from stoptool.train.checkpointer import Checkpointer
from stoptool.train.distributed import (
    Nets,
    World,
    check_batch,
    check_same_step,
    data_parallel,
    gather_lists,
    init_world,
    leave_world,
    replicas_agree,
    run_lock,
    sum_over_ranks,
    world_from_env,
)
from stoptool.train.fit import Fitted, Plan, Report, compile_guard, fit
from stoptool.train.logs import METRICS, Loggers, check_loggers, window_row
from stoptool.train.optim import make_scaler, use_fused_like
from stoptool.train.runtime import (
    attention_impl,
    autocast_factory,
    default_workers,
    environment,
    resolve_device,
    resolve_precision,
    set_attention,
)
from stoptool.train.schedules import Schedules
from stoptool.train.state import restore_rng
from stoptool.train.watch import Alarms, Watch, sample

RESULT = "finetune.json"  # the run's result, beside summary.json
SKIPPED = "skipped.txt"
# metrics.csv's header: what a fine-tuning run logs
CSV_COLUMNS = ("step", "epoch", "loss", "lr", "img_per_s", "step_s", "data_s", "grad_norm", "val_top1",
               "val_top5", "val_loss", "time")
RESUMABLE = RESUMABLE_CHANGES | {"eval_every"}  # keys a resumed run may change (pretraining's and these)
STANDARDIZE_IMAGES = 10_000  # training images the head norm's statistics are measured on, at most


@dataclass
class FinetuneResult:
    run_dir: Path
    checkpoint: Path
    step: int
    epoch: int
    loss: float | None  # the last logged row's mean loss
    seconds: float
    images_per_second: float | None
    scores: dict  # the final evaluation: val_top1, val_top5 (None with 5 classes or fewer), val_loss, ...
    info: dict  # what the result JSON says of the run (encoder, data, ...)
    json_path: Path
    already_done: bool = False
    skipped_images: int = 0
    notes: list[str] = field(default_factory=list)
    wall_clock: str | None = None  # as the table says it: this launch's, and the whole run's if resumed

    def rows(self) -> dict[str, object]:
        """The closing table, row name -> value."""
        i, s = self.info, self.scores
        top5 = f"{100 * s['val_top5']:.2f} %" if s.get("val_top5") is not None else "- (5 classes or fewer)"
        train = f"{i['train_images']:,}" + (f" ({i['fraction']:g} of them)" if i["fraction"] < 1 else "")
        if i.get("subset"):
            train += f", subset {i['subset']}"
        return {
            "run directory": self.run_dir,
            "checkpoint": self.checkpoint,
            "encoder": f"{i['encoder']} ({i['which']}, {i['arch']} @ {i['img_size']}px)",
            "data": f"{i['dataset']}: {i['classes']} classes, {train} training images, {s['val_images']:,} "
                    f"evaluated ({i['val_split']})",
            "steps": f"{self.step} ({self.epoch} epochs)",
            "final loss": f"{self.loss:.4f}" if self.loss is not None else "-",
            "top-1": f"{100 * s['val_top1']:.2f} %",
            "top-5": top5,
            "wall-clock": self.wall_clock or f"{self.seconds:.1f} s",
            "img/s": self.images_per_second if self.images_per_second is not None else "-",
            **({"skipped images": f"{self.skipped_images} (unreadable)"} if self.skipped_images else {}),
            "result": self.json_path,
        }


def finetune(cfg: FinetuneConfig, resume: bool = True, progress=None, notify=None) -> FinetuneResult:
    """Fine-tune per `cfg` (`by_size` is applied here, once the encoder's arch is known).

    `progress(step, total, row | None)` and `notify(text)` as for `pretrain`. Under torchrun
    every process calls this; they train one classifier together, the batch being global."""
    arch, _ = describe_source(cfg)
    cfg = cfg.for_arch(arch).validate()
    if not cfg.random_init and not is_timm(cfg.ckpt):  # where it is, whatever the working directory
        cfg = dataclasses.replace(cfg, ckpt=str(resolve_checkpoint(cfg.ckpt).resolve()))
    world = world_from_env()
    check_batch(world, cfg.batch_size, cfg.accum_steps)
    device = init_world(world, resolve_device(cfg.device))
    done = False
    try:
        run = Launch(cfg, world, device, resolve_precision(cfg.precision, device), progress,
                     notify if world.main else None)
        result = _finetune(run, resume)
        done = True
        return result
    finally:
        leave_world(world, done)


@dataclass
class Launch:
    """One launch of a run: its config, its process's place and device, and whom it tells."""

    cfg: FinetuneConfig
    world: World
    device: torch.device
    precision: str
    progress: Callable | None = None
    notify: Callable | None = None  # process 0's notes; None elsewhere
    start: float = field(default_factory=time.perf_counter)


def _finetune(run: Launch, resume: bool) -> FinetuneResult:
    cfg = run.cfg
    splits = _splits(cfg, run)
    run_dir = _run_dir(cfg)
    resuming = resume and (run_dir / LATEST).exists()
    source = None if resuming else load_source(cfg)  # (a resumed run's weights are its own)
    shape = describe_source(cfg)
    with run_lock(run_dir, "finetune", run.world, run.device, run.notify):
        saved = _load_resumable(run_dir / LATEST, cfg, shape, splits) if resuming else None
        return _train(run, splits, shape, source, saved)


def _splits(cfg: FinetuneConfig, run: Launch) -> Splits:
    splits = open_splits(cfg)
    for note in splits.notes:
        if run.notify:
            run.notify(note)
    check_readable(splits.train)
    if len(splits.indices) < cfg.batch_size:
        raise UserError(f"the training split has {plural(len(splits.indices), 'image')} to use, fewer than "
                        f"the batch size {cfg.batch_size}", key="batch_size")
    share = cfg.batch_size // run.world.size
    if cfg.mixing() and share % 2:
        raise UserError(f"mixup and cutmix pair each image with another of its process's batch, and {share} "
                        "images a process is odd: make each process's batch even", key="batch_size")
    return splits


def _run_dir(cfg: FinetuneConfig) -> Path:
    run_dir = cfg.run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output path '{run_dir}' exists and is not a directory", key="out")
    check_writable(run_dir)
    check_loggers(cfg.loggers())
    return run_dir


def _load_resumable(latest: Path, cfg: FinetuneConfig, shape, splits: Splits) -> Checkpoint:
    """The run's `latest`, once it is known to be a checkpoint of this same fine-tuning."""
    saved = load_checkpoint(latest)
    meta = saved.meta
    if meta.get("kind") != FINETUNE:
        raise UserError(f"'{latest}' is a {meta.get('kind', 'pretrain')} checkpoint, not a fine-tuning "
                        "run's: give another out", key="out")
    defaults = FinetuneConfig().to_dict()
    before = {**defaults, **meta.get("config", {})}  # a key its stoptool did not have: the default
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUMABLE and before.get(k) != v]
    if diff:
        k = diff[0]
        raise UserError(f"'{latest}' holds a run with {k}={before.get(k)!r}, not {cfg.to_dict()[k]!r}: pass "
                        "--no-resume to start over there, or --out for a new run directory")
    held, want = (meta["arch"], meta["img_size"], meta["num_classes"]), (*shape, len(splits.classes))
    if held != want:
        raise UserError(f"'{latest}' holds a {held[0]} classifier of {held[2]} classes at {held[1]} px, not "
                        f"a {want[0]} of {want[2]} at {want[1]} px: pass --no-resume or --out")
    return saved


def _train(run: Launch, splits: Splits, shape, source: Source | None,
           saved: Checkpoint | None) -> FinetuneResult:
    """The launch, in the run directory it holds: build or resume, fit, evaluate, summarise."""
    cfg, world, device = run.cfg, run.world, run.device
    clock = RunClock.resuming(saved.meta if saved is not None else None, run.start)
    model, step = _classifier(cfg, shape, len(splits.classes), source, saved)
    model.to(device).train()
    check_same_step(step, world, device)
    restore_rng(saved, world, cfg.seed, step, device)
    ipe = len(splits.indices) // cfg.batch_size
    last_step = _last_step(cfg, ipe, run.notify)
    workers = (cfg.workers if cfg.workers is not None
               else default_workers(device, isinstance(splits.train, ArrayDataset), world.local_size))
    norm = _normalisation(source, saved)
    evaluation = _evaluation(run, splits, eval_transform(cfg, shape[1], *norm), workers)
    if saved is None and cfg.head_norm == "standardize":
        _standardize(run, model, splits, evaluation)
    nets = Nets(model, data_parallel(model, world, device), None, world)
    if step >= last_step:  # nothing left to train: the result is the weights' evaluation
        evaluation(nets)
        untrained = Fitted(step, None, 0)
        return _finish(run, splits, shape, model, ipe, untrained, evaluation, {"workers": workers},
                       already_done=True)
    if saved is not None and run.notify:
        run.notify(f"resuming {cfg.run_dir()} from step {step} of {last_step} (epoch {step // ipe})")
    state = _state(run, model, nets, saved)
    started = source.facts if source is not None else saved.meta
    del saved  # the whole checkpoint, in every process's memory until here
    plan = _plan(cfg, ipe, last_step, world, device)
    if world.main:
        for torn in plan.run_dir.glob(".*.safetensors.*.tmp"):  # being written when a process was killed
            torn.unlink(missing_ok=True)
        write_text_atomic(plan.run_dir / CONFIG, cfg.to_yaml())
    meta = _meta(cfg, splits, shape, started, norm, ipe, run.precision)
    ckpt = Checkpointer(state, meta, ipe, world, device, tensors=classifier_tensors, clock=clock)
    batches = train_loader(splits.train, splits.indices, train_transform(cfg, shape[1], *norm),
                           make_mixup(cfg, len(splits.classes)), cfg.batch_size, cfg.seed, step, last_step,
                           workers=workers, pin_memory=device.type == "cuda", rank=world.rank,
                           world=world.size)
    loader = Skips(batches, run.notify, str(plan.run_dir / SKIPPED))
    compiled = cfg.compile and not world.distributed
    step_fn = compile_guard(step, run.notify, finetune_step) if compiled else finetune_step
    log = Loggers(cfg.loggers() if world.main else (), plan.run_dir, step, config=cfg.to_dict(),
                  columns=CSV_COLUMNS)
    report = Report(log, Watch(Alarms(run.notify), evaluation), run.progress, row=finetune_row)
    if run.progress:
        run.progress(step, last_step, None)
    try:
        fitted = fit(plan, state, loader, step, ckpt, report, step_fn, inputs=Batch)
    except UserError as err:  # a diverged run: what it found goes into the summary too
        if world.main and not isinstance(err, WriteFailed):
            write_report(plan.run_dir / SUMMARY, {"step": step, "stopped": str(err),
                                                  "alarms": report.watch.alarms.fired})
        raise
    finally:
        log.close()
    _list_skipped(list(loader.names), plan.run_dir, world, step)
    facts = {"workers": workers, "alarms": report.watch.alarms.fired,
             "stall_s": round(ckpt.longest_stall_s, 4)}
    return _finish(run, splits, shape, model, ipe, fitted, evaluation, facts, clock=clock)


def _classifier(cfg: FinetuneConfig, shape, classes: int, source: Source | None, saved: Checkpoint | None):
    """The classifier and its step: the source's encoder with a new head drawn from the run's
    seed, or (resuming) the run's own weights."""
    torch.manual_seed(cfg.seed)
    if saved is None:
        model = source.build(classes, cfg.drop_path)
    elif "timm_model" in saved.meta:  # fine-tuned from timm's model: timm builds it again
        model = build_timm(saved.meta["timm_model"], shape[1], num_classes=classes,
                           drop_path_rate=cfg.drop_path)
    else:  # its weights are loaded below
        model = build_classifier(*shape, None, classes, cfg.drop_path)
    if cfg.head_norm == "standardize":  # (its statistics: measured below, or the run's)
        add_head_norm(model)
    if saved is None:
        return model, 0
    model.load_state_dict(classifier_state(saved.part))
    return model, saved.meta["step"]


def _standardize(run: Launch, model, splits: Splits, evaluation: Evaluation) -> None:
    """The head norm's statistics: the averaged tokens of the starting encoder over the training
    images (a seeded sample of at most STANDARDIZE_IMAGES), through the evaluation transform."""
    cfg = run.cfg
    chosen = splits.indices[sample(len(splits.indices), STANDARDIZE_IMAGES, cfg.seed)]
    mean, std = feature_moments(model, splits.train, chosen, evaluation.transform, evaluation.batch_size,
                                evaluation.autocast, run.device, run.world, evaluation.workers)
    model.fc_norm.mean.copy_(mean)
    model.fc_norm.std.copy_(std)


def _last_step(cfg: FinetuneConfig, ipe: int, notify) -> int:
    schedule = schedule_steps(cfg.epochs, ipe)
    if cfg.steps is not None and cfg.steps > schedule and notify:
        notify(f"--steps {cfg.steps} exceeds the schedule's {schedule} steps; stopping at {schedule}")
    return schedule_steps(cfg.epochs, ipe, cfg.steps)


def _plan(cfg: FinetuneConfig, ipe: int, last_step: int, world: World, device) -> Plan:
    """The loop's plan: a linear warmup from 0 and a cosine to min_lr over every epoch (weight
    decay constant), `train.schedules`' closed forms."""
    sched = Schedules(total=max(1, cfg.epochs * ipe), warmup=int(cfg.warmup * ipe), lr=cfg.peak_lr(),
                      start_lr=0.0, final_lr=cfg.min_lr, wd=cfg.wd, final_wd=cfg.wd, ema=(0.0, 0.0))
    return Plan(sched, ipe, last_step, cfg.batch_size, cfg.log_every, cfg.save_every, cfg.run_dir(), world,
                device, cfg.checkpoint_every, cfg.checkpoint_minutes)


def _evaluation(run: Launch, splits: Splits, transform, workers: int) -> Evaluation:
    """The run's evaluation on the val split: in `probe`'s precision (no fp16: nothing guards a
    forward pass against its overflow), with the attention kernel `auto` picks for it."""
    cfg, device = run.cfg, run.device
    precision = resolve_precision(cfg.precision, device, fp16=False)
    attn = (attention_impl(cfg.attn, device, precision, training=False),
            attention_impl(cfg.attn, device, run.precision, training=True))
    batch = max(1, cfg.batch_size // run.world.size // cfg.accum_steps)
    return Evaluation(splits.val, transform, batch, cfg.eval_every, autocast_factory(device, precision), attn,
                      device, run.world, workers)


def _state(run: Launch, model, nets: Nets, saved: Checkpoint | None) -> FinetuneState:
    """The classifier set up for training (attention kernel, recomputation), its layer-decay
    AdamW and loss scaler, restored from `saved` when resuming."""
    cfg, device = run.cfg, run.device
    set_attention(model, attention_impl(cfg.attn, device, run.precision, training=True))
    if cfg.grad_checkpoint:
        model.set_grad_checkpointing(True)
    optimizer = make_optimizer(model, cfg.wd, cfg.layer_decay)
    scaler = make_scaler(device, run.precision)
    if saved is not None:
        groups = use_fused_like(optimizer, saved.meta["optimizer_groups"])
        optimizer.load_state_dict(optimizer_state(saved.part_raw("opt."), groups))
        if scaler.is_enabled() and "grad_scaler" in saved.meta:
            scaler.load_state_dict(saved.meta["grad_scaler"])
    state = FinetuneState(model, optimizer, scaler, nets, autocast_factory(device, run.precision),
                          make_loss(cfg), cfg.clip_grad or None, cfg.accum_steps)
    if cfg.compile:
        compile_forward(state)
    return state


def _normalisation(source: Source | None, saved: Checkpoint | None) -> tuple[tuple, tuple]:
    """The input's mean and std: the source's, or (resuming) those the run recorded."""
    if source is not None:
        return source.mean, source.std
    return tuple(saved.meta.get("mean", MEAN)), tuple(saved.meta.get("std", STD))


def _meta(cfg: FinetuneConfig, splits: Splits, shape, start: dict, norm, ipe: int, precision: str) -> dict:
    """What every checkpoint of the run says: the classifier's shape, classes and input
    normalisation, the encoder it started from (`start`: the source's facts, or resuming, the
    run's own metadata), the data, the config."""
    arch, img_size = shape
    done = {"from": cfg.ckpt or "random-init", "dataset": splits.tag,
            "train_images": int(len(splits.indices)), "fraction": cfg.fraction,
            **({"subset": cfg.subset} if cfg.subset else {})}
    return {"kind": FINETUNE, "arch": arch, "img_size": img_size, "patch": parse_arch(arch)[1],
            "num_classes": len(splits.classes), "classes": splits.classes, "which": cfg.which,
            "mean": list(norm[0]), "std": list(norm[1]),
            "head_norm": cfg.head_norm,
            **{k: start[k] for k in ("sigma", "method", "timm_model") if k in start}, "finetuned": done,
            "config": cfg.to_dict(), "data": splits.describe(), "iterations_per_epoch": ipe,
            "precision": precision}


def finetune_row(model, step: int, ipe: int, window, batch: int, hp) -> dict:
    """A logged step's row: the loss, the lr (the head's; earlier layers get it scaled), speed."""
    return window_row(step, ipe, window, batch, {"lr": hp.lr})


def _list_skipped(names: list[str], run_dir: Path, world: World, first_step: int) -> None:
    """Every unreadable training image skipped, one per line, in skipped.txt (process 0 writes
    what every process met; a resumed run adds to its earlier part's list)."""
    names = gather_lists(names, world)
    path = run_dir / SKIPPED
    if not world.main:
        return
    earlier = path.read_text(encoding="utf-8").splitlines() if first_step and path.is_file() else []
    listed = list(dict.fromkeys(earlier + names))
    if listed:
        write_text_atomic(path, "".join(f"{name}\n" for name in listed))
    elif path.exists():
        path.unlink()


def _finish(run: Launch, splits: Splits, shape, model, ipe: int, fitted: Fitted, evaluation: Evaluation,
            facts: dict, already_done: bool = False, clock: RunClock | None = None) -> FinetuneResult:
    """summary.json and the result (finetune.json), by process 0, once every process has finished."""
    cfg, world, device = run.cfg, run.world, run.device
    run_dir, step, seconds = cfg.run_dir(), fitted.step, time.perf_counter() - run.start
    whole = clock.whole() if clock is not None else None
    in_sync = replicas_agree(model, world, device)
    skipped = round(sum_over_ranks(fitted.skipped, world, device))
    if not in_sync and run.notify:
        run.notify("the processes ended with different weights; rank 0's were saved")
    speed = round(fitted.images_per_second, 1) if fitted.images_per_second else None
    scores = evaluation.last
    which = "random-init" if cfg.random_init else "timm" if is_timm(cfg.ckpt) else cfg.which
    info = {"encoder": cfg.ckpt or "random-init", "which": which,
            "arch": shape[0], "img_size": shape[1], "dataset": splits.tag, "classes": len(splits.classes),
            "train_images": int(len(splits.indices)), "fraction": cfg.fraction, "val_split": splits.val.name,
            "subset": cfg.subset}
    if cfg.subset:
        info.update(subset_lines=splits.train.subset_lines,
                    subset_unmatched=len(splits.train.subset_unmatched))
    json_path = run_dir / RESULT
    result = FinetuneResult(run_dir, run_dir / LATEST, step, step // ipe, fitted.loss, seconds, speed, scores,
                            info, json_path, already_done, skipped,
                            wall_clock=clock.text(seconds) if clock is not None else None)
    if not world.main:
        return result
    where = {"precision": run.precision, "device": str(device), "world_size": world.size}
    if not already_done:
        write_report(run_dir / SUMMARY, {
            "step": step, "epoch": step // ipe, "loss": fitted.loss, "loss_steps": fitted.loss_steps,
            "seconds": round(seconds, 2), "run_seconds": None if whole is None else round(whole, 2),
            "images_per_second": speed, "skipped_images": skipped, **scores,
            "checkpoint": str(run_dir / LATEST), **where, **facts,
            **({"replicas_in_sync": in_sync} if world.distributed else {}), "environment": environment()})
    write_report(json_path, {**info, "step": step, "epoch": step // ipe, "top1": scores["val_top1"],
                             "top5": scores["val_top5"], "val_loss": scores["val_loss"],
                             "val_images": scores["val_images"], "val_skipped": scores["val_skipped"],
                             **where, "seed": cfg.seed, "metrics": str(run_dir / METRICS),
                             "config": cfg.to_dict()})
    return result
