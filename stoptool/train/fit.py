"""The training loop: batches in, steps taken, rows logged, checkpoints written, signals heard.
Pretraining runs it with `train_step`; fine-tuning (`stoptool.finetune`) with a step of its own.

    for each batch: lr, wd, m from the schedules -> train_step (not waited for)
                    -> every `log_every` steps: read the loss and the guard, log a row
                    -> at a stop signal: save `latest`, stop
                    -> at an epoch's end, every `checkpoint_every` steps, every
                       `checkpoint_minutes`: save `latest` in the background (and a snapshot
                       every `save_every` epochs)
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
from stoptool.train.guard import NonFiniteLoss
from stoptool.train.logs import Loggers, Speed, Window, metrics_row
from stoptool.train.runtime import eager_on_compile_failure
from stoptool.train.schedules import Schedules
from stoptool.train.step import StepInputs, StepResult, TrainState, train_step
from stoptool.train.watch import Watch


class Interrupted(Exception):
    """A stop signal, honoured at a step boundary once `latest` holds step `step` of `total`."""

    def __init__(self, signum: int, checkpoint: Path, step: int | None = None, total: int | None = None):
        super().__init__(f"stopped by {signal.Signals(signum).name} at a step boundary")
        self.signum, self.checkpoint, self.step, self.total = signum, checkpoint, step, total

    def line(self, command: str) -> str:
        """What the user reads: where the run stopped, what was saved, how it goes on
        (`command`: the stoptool command that wrote the run, e.g. "pretrain")."""
        where = f" at step {self.step} of {self.total}" if self.step is not None else ""
        config = self.checkpoint.parent / "config.yaml"
        return (f"interrupted{where}: checkpoint saved to {self.checkpoint}; resume with the same command, "
                f"or: stoptool {command} --config {config}")


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
    checkpoint_every: int = 0  # steps between writes of `latest` inside an epoch (0: none)
    checkpoint_minutes: float = 0.0  # wall-clock minutes between them (0: none)

    @property
    def latest(self) -> Path:
        return self.run_dir / LATEST


@dataclass
class Fitted:
    step: int
    loss: float | None  # the last logged row's: the mean over the steps `loss_steps`
    skipped: int  # unreadable images passed over by this process's loader
    loss_steps: tuple[int, int] | None = None  # first and last (1-based) step of that mean
    images_per_second: float | None = None  # see `Speed`


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
    """Where a run reports: its loggers, what it watches, a progress callback
    progress(step, total, row | None), and the row a logged step writes,
    row(model, step, ipe, window, batch_size, hp) (pretraining's `metrics_row` by default)."""

    log: Loggers
    watch: Watch = field(default_factory=Watch)
    progress: Callable | None = None
    row: Callable[..., dict] = metrics_row


def fit(plan: Plan, state: TrainState, loader, step: int, ckpt: Checkpointer, report: Report,
        step_fn: Callable | None = None, inputs: Callable = StepInputs) -> Fitted:
    """Train from `step` over `loader`'s batches: each is its tensors, then the number of images
    skipped on the way; `inputs(*tensors)`, once they are on the device, is what the step takes
    (default: images, context and target indices). `step_fn(state, batch, hp)` runs each step
    (default `train_step`; `compile_guard` gives it with a fallback to the eager forward)."""
    run = _Launch(plan, state, ckpt, report, step, step_fn or train_step)
    evaluate = report.watch.evaluate
    # the initial weights, where the evaluation means something for them (fine-tuning's
    # untrained head does not)
    if step == 0 and evaluate is not None and getattr(evaluate, "at_start", True):
        report.log.write({"step": 0, "epoch": 0.0, **evaluate(state.nets), "time": time.time()})
    try:
        with _StopFlag() as stop:
            waited = time.perf_counter()
            for *tensors, n_skipped in loader:
                data_s = time.perf_counter() - waited
                moved = (t.to(plan.device, non_blocking=True) for t in tensors)
                run.step_once(inputs(*moved), data_s, n_skipped)
                run.after_step(stop.signum)
                waited = time.perf_counter()
            run.save(plan.latest)  # in the foreground: the run is over once it has landed
    except NonFiniteLoss as err:
        run.diverged(err)
    return Fitted(run.step, run.last_loss, run.skipped, run.loss_steps, run.speed.img_per_s)


class _Launch:
    """The loop's state between steps: this launch's step count, the logging window, speed,
    and the host's decisions (log, evaluate, checkpoint, stop) after each step."""

    def __init__(self, plan: Plan, state: TrainState, ckpt: Checkpointer, report: Report, step: int,
                 step_fn: Callable):
        self.plan, self.state, self.ckpt, self.report, self.step_fn = plan, state, ckpt, report, step_fn
        self.first_step = self.step = step
        self.skipped, self.window, self.speed = 0, Window(), Speed(plan.batch_size)
        self.last_loss, self.loss_steps, self.row = None, None, None
        self.last_save = time.monotonic()

    def step_once(self, batch: StepInputs, data_s: float, n_skipped: int) -> None:
        plan, step, evaluate = self.plan, self.step, self.report.watch.evaluate
        hp = plan.sched.at(step)
        eval_now = evaluate is not None and evaluate.due(step + 1, plan.ipe, plan.last_step)
        # the first step of a run is logged too: its target features are the initial weights'
        # the reference against which the collapse alarm measures later ones
        last = step + 1 == plan.last_step
        batch.measure = eval_now or step == 0 or (step + 1) % plan.log_every == 0 or last
        result = self.step_fn(self.state, batch, hp)  # (a NonFiniteLoss raised at once is this step's)
        self.step, self.skipped = step + 1, self.skipped + n_skipped
        self.window.add(self.step, result.loss, data_s)
        self.row = self._row(hp, batch, result, eval_now) if batch.measure else None
        if self.report.progress:
            shown = None if self.row is None else {**self.row, "avg_img_per_s": self.speed.img_per_s}
            self.report.progress(self.step, plan.last_step, shown)

    def _row(self, hp, batch: StepInputs, result: StepResult, eval_now: bool) -> dict:
        """The logged row after this step (health metrics, and the online k-NN when due),
        written to the loggers, then checked for alarms. Reading its loss waits for the
        device, so the guard is read here too."""
        plan, state, report = self.plan, self.state, self.report
        row = report.row(state.model, self.step, plan.ipe, self.window, plan.batch_size, hp)
        state.guard.check(self.first_step)
        self.last_loss, self.loss_steps = row["loss"], (self.window.first_step, self.step)
        self.window = Window()
        row.update(report.watch.health(result, row, batch))
        if eval_now:
            began = time.perf_counter()
            row.update(report.watch.evaluate(state.nets))
            self.speed.pause(time.perf_counter() - began)
        self.speed.mark(self.step)  # after the evaluation, whose time `pause` takes out
        report.log.write(row)
        for alarm in report.watch.alarms.check(row):
            report.log.alarm(alarm)
        return row

    def after_step(self, signum: int | None) -> None:
        """Checkpoints due after this step; at a stop signal, `latest` and Interrupted. Under
        torchrun the processes agree on the signal and the clock at logged steps only (one
        small collective there, none between)."""
        plan, step = self.plan, self.step
        self.ckpt.check()  # a background write that failed ends the run here
        stop = signum is not None
        minutes = plan.checkpoint_minutes
        due = bool(minutes) and time.monotonic() - self.last_save >= 60 * minutes
        if plan.world.distributed:  # agreed on at logged steps, else left for later
            logged = self.row is not None
            stop, due = any_rank((stop, due), plan.world, plan.device) if logged else (False, False)
        if stop:
            self.save(plan.latest)  # (in the foreground)
            barrier(plan.world)  # no process exits before process 0 has written latest
            raise Interrupted(signum or signal.SIGTERM, plan.latest, self.step, plan.last_step)
        if step >= plan.last_step:
            return
        if step % plan.ipe == 0:
            self.save(plan.latest, background=True)
            epoch = step // plan.ipe
            if epoch % plan.save_every == 0:
                self.save(plan.run_dir / f"epoch{epoch:04d}.safetensors", background=True, with_state=False)
        elif due or (plan.checkpoint_every and step % plan.checkpoint_every == 0):
            self.save(plan.latest, background=True)

    def save(self, path: Path, background: bool = False, with_state: bool = True) -> None:
        """A checkpoint at this step, once the guard says every step so far was finite."""
        self.state.guard.check(self.first_step)
        self.ckpt.save(path, self.step, with_state=with_state, background=background)
        if with_state:
            self.last_save = time.monotonic()

    def diverged(self, err: NonFiniteLoss):
        """A non-finite loss or gradient: an alarm, then the user's one line, naming what is kept."""
        plan, report = self.plan, self.report
        self.ckpt.wait()  # a checkpoint being written is a good one: let it land
        step = err.step if err.step is not None else self.step
        alarm = report.watch.alarms.raise_("non_finite", step, value=str(err).split(" is ", 1)[-1])
        if alarm:
            report.log.alarm(alarm)
        kept = (f"the last good checkpoint is kept in '{plan.latest}'" if plan.latest.exists()
                else "no checkpoint had been written yet")
        hint = "try a lower --lr"
        if self.state.scaler.is_enabled():
            hint += ", or --precision fp32: fp16 activations overflow past 65504"
        raise UserError(f"training stopped at step {step}: {err}; {kept} ({hint})") from None


def compile_guard(first_step: int, notify=None, step: Callable = train_step) -> Callable:
    """`step` (`train_step`, or fine-tuning's), falling back to the eager forward (with a note)
    where torch.compile fails in a step: a graph first met there, a broken kernel cache. Steps
    after a fallback run eagerly. `first_step` is the step of the first call (for the note); the
    state's `forward` is what was compiled."""
    run = {"compiled": True, "step": first_step}

    def failed(reason: str) -> None:
        run["compiled"] = False
        if notify:
            notify(f"torch.compile failed at step {run['step']}, running eagerly from here ({reason})")

    def step_fn(state: TrainState, batch: StepInputs, hp) -> StepResult:
        try:
            if not run["compiled"]:
                return step(state, batch, hp)
            undo = partial(setattr, state, "forward", None)  # (the retried step clears the gradients)
            return eager_on_compile_failure(partial(step, state, batch, hp), undo, failed)
        finally:
            run["step"] += 1

    return step_fn
