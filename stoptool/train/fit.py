"""The training loop: batches in, steps taken, rows logged, checkpoints written, signals heard.

    for each batch: lr, wd, m from the schedules -> train_step -> log every `log_every` steps
                    -> at a stop signal: save `latest`, stop -> at an epoch's end: save `latest`
                       (and a snapshot every `save_every` epochs)
"""

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from stoptool.errors import UserError
from stoptool.io.checkpoint import LATEST
from stoptool.train.checkpointer import Checkpointer
from stoptool.train.distributed import World, any_rank, barrier
from stoptool.train.logs import Loggers, Window, metrics_row
from stoptool.train.runtime import eager_on_compile_failure
from stoptool.train.schedules import Schedules
from stoptool.train.step import NonFiniteLoss, StepInputs, TrainState, train_step
from stoptool.train.watch import Watch


class Interrupted(Exception):
    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at a step boundary")
        self.signum, self.checkpoint = signum, checkpoint


@dataclass
class Plan:
    """What the loop runs and where it writes."""

    sched: Schedules
    ipe: int  # iterations (steps) per epoch
    last_step: int
    batch_size: int
    log_every: int
    save_every: int  # epochs between snapshots
    run_dir: Path
    world: World
    device: torch.device

    @property
    def latest(self) -> Path:
        return self.run_dir / LATEST


@dataclass
class Fitted:
    step: int
    loss: float | None  # of the last step
    skipped: int  # unreadable images passed over by this process's loader


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


@dataclass
class Report:
    """Where a run reports: its loggers, what it watches, and a progress callback
    progress(step, total, row | None)."""

    log: Loggers
    watch: Watch = field(default_factory=Watch)
    progress: Callable | None = None


def fit(plan: Plan, state: TrainState, loader, step: int, ckpt: Checkpointer, report: Report,
        step_fn: Callable | None = None) -> Fitted:
    """Train from `step` over `loader`'s batches; `step_fn(state, batch, hp)` runs each step
    (default `train_step`; `compile_guard` gives it with a fallback from compiled blocks)."""
    step_fn = step_fn or train_step
    evaluate = report.watch.evaluate
    loss, skipped, window = None, 0, Window()
    if step == 0 and evaluate is not None:  # the initial weights
        report.log.write({"step": 0, "epoch": 0.0, **evaluate(state.nets), "time": time.time()})
    with _StopFlag() as stop:
        waited = time.perf_counter()
        for images, ctx_idx, tgt_idx, n_skipped in loader:
            arrived = time.perf_counter()
            batch = StepInputs(*(t.to(plan.device, non_blocking=True) for t in (images, ctx_idx, tgt_idx)))
            hp = plan.sched.at(step)
            eval_now = evaluate is not None and evaluate.due(step + 1, plan.ipe, plan.last_step)
            # the first step of a run is logged too: its target features are the initial weights'
            # the reference against which the collapse alarm measures later ones
            logged = eval_now or step == 0 or (step + 1) % plan.log_every == 0 or step + 1 == plan.last_step
            state.stats = {} if logged else None
            loss = _checked(step_fn, state, batch, hp, step, plan, report)
            step, skipped = step + 1, skipped + n_skipped
            window.add(loss, arrived - waited, time.perf_counter() - waited)
            row = _row(plan, state, report, step, window, hp, batch, eval_now) if logged else None
            if row is not None:
                window = Window()
            if report.progress:
                report.progress(step, plan.last_step, row)
            if any_rank(stop.signum is not None, plan.world, plan.device):
                ckpt.save(plan.latest, step)
                barrier(plan.world)  # no process exits before process 0 has written latest
                raise Interrupted(stop.signum or signal.SIGTERM, plan.latest)
            if step % plan.ipe == 0 and step < plan.last_step:
                _epoch_end(plan, ckpt, step)
            waited = time.perf_counter()
        ckpt.save(plan.latest, step)
    return Fitted(step, loss, skipped)


def _row(plan: Plan, state: TrainState, report: Report, step: int, window: Window, hp, batch,
         eval_now: bool) -> dict:
    """The logged row after `step` (health metrics, and the online k-NN when due), written to
    the loggers, then checked for alarms."""
    row = metrics_row(state.model, step, plan.ipe, window, plan.batch_size, hp)
    row.update(report.watch.health(state.stats or {}, row, batch))
    if eval_now:
        row.update(report.watch.evaluate(state.nets))
    report.log.write(row)
    for alarm in report.watch.alarms.check(row):
        report.log.alarm(alarm)
    return row


def _epoch_end(plan: Plan, ckpt: Checkpointer, step: int) -> None:
    """`latest` after every epoch, and a weight snapshot every `save_every` epochs."""
    ckpt.save(plan.latest, step)
    epoch = step // plan.ipe
    if epoch % plan.save_every == 0:
        ckpt.save(plan.run_dir / f"epoch{epoch:04d}.safetensors", step, with_state=False)


def _checked(step_fn, state, batch, hp, step: int, plan: Plan, report: Report) -> float:
    """One step; a non-finite loss is an alarm, and then the user's one line, naming what is kept."""
    try:
        return step_fn(state, batch, hp)
    except NonFiniteLoss as err:
        alarm = report.watch.alarms.raise_("non_finite", step, value=str(err).removeprefix("loss is "))
        if alarm:
            report.log.alarm(alarm)
        kept = (f"the last good checkpoint is kept in '{plan.latest}'" if plan.latest.exists()
                else "no checkpoint had been written yet")
        hint = "try a lower --lr"
        if state.scaler.is_enabled():
            hint += ", or --precision fp32: fp16 activations overflow past 65504"
        raise UserError(f"training stopped at step {step}: {err}; {kept} ({hint})") from None


def compile_guard(first_step: int, notify=None) -> Callable:
    """`train_step`, falling back to eager blocks (with a note) where torch.compile fails in a
    step: a graph first met there, a broken kernel cache. Steps after a fallback run eagerly.
    `first_step` is the step of the first call (for the note)."""
    run = {"compiled": True, "step": first_step}

    def failed(reason: str) -> None:
        run["compiled"] = False
        if notify:
            notify(f"torch.compile failed at step {run['step']}, running eagerly from here ({reason})")

    def step_fn(state: TrainState, batch: StepInputs, hp) -> float:
        try:
            if not run["compiled"]:
                return train_step(state, batch, hp)
            return eager_on_compile_failure(partial(train_step, state, batch, hp), state.model, failed)
        finally:
            run["step"] += 1

    return step_fn
