"""What a run logs, written by process 0 alone: one metrics row every `log_every` steps (and
at every online evaluation), to each logger named by `log`: metrics.jsonl, metrics.csv,
TensorBoard events under tb/, wandb. Alarms go to metrics.jsonl as rows of their own.

On resume every logger drops what an interrupted process wrote after the checkpoint it
resumes from, so no step appears twice and none is missing.
"""

import csv
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch

from stoptool.errors import UserError
from stoptool.io.paths import writing
from stoptool.models.jepa import JEPA
from stoptool.train.distributed import whole

METRICS = "metrics.jsonl"
CSV = "metrics.csv"
# metrics.csv's header, fixed so that the files of different runs line up; a value a row lacks
# (no evaluation at that step, no health metrics on a step before any was logged) stays empty
CSV_COLUMNS = ("step", "epoch", "loss", "lr", "wd", "momentum", "A_norm", "mask_token_norm", "img_per_s",
               "step_s", "data_s", "grad_norm", "rankme", "feature_std", "mfu", "knn_top1", "knn_top5",
               "time")


def _row_step(line: str) -> float:
    """The step of a metrics row; infinity for a blank or torn line (a run killed mid-write)."""
    try:
        row = json.loads(line)
        return row.get("step", 0) if isinstance(row, dict) else math.inf
    except json.JSONDecodeError:
        return math.inf


def _csv_step(line: str) -> float:
    try:
        return float(line.split(",", 1)[0])
    except ValueError:
        return math.inf


def _keep_rows(path: Path, resume_step: int, step_of, header: int = 0) -> None:
    """Drop the rows of `path` past `resume_step` (all of them for a run starting afresh),
    keeping its first `header` lines; the file is replaced whole, so a kill here leaves the
    old one intact."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = lines[:header] + [r for r in lines[header:] if resume_step and step_of(r) <= resume_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in kept))
    os.replace(tmp, path)


def first_health(path: Path) -> dict:
    """The first logged `rankme` and `feature_std` of a run (those of its initial weights), from
    its metrics.jsonl: a resumed run's collapse alarm measures against them too."""
    first = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in ("rankme", "feature_std"):
                if isinstance(row, dict) and key in row:
                    first.setdefault(key, row[key])
    return first


class JsonlLog:
    """metrics.jsonl: one JSON object per row; alarms are rows too."""

    def __init__(self, run_dir: Path, resume_step: int, **_):
        self.path = path = run_dir / METRICS
        _keep_rows(path, resume_step, _row_step)
        self._file = open(path, "a")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def alarm(self, alarm: dict) -> None:
        self.write(alarm)

    def close(self) -> None:
        self._file.close()


class CsvLog:
    """metrics.csv, with a fixed header: `columns` (pretraining's CSV_COLUMNS unless told)."""

    def __init__(self, run_dir: Path, resume_step: int, columns: tuple[str, ...] = CSV_COLUMNS, **_):
        self.path = path = run_dir / CSV
        _keep_rows(path, resume_step, _csv_step, header=1)
        fresh = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, columns, extrasaction="ignore")
        if fresh:
            self._writer.writeheader()

    def write(self, row: dict) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def alarm(self, alarm: dict) -> None:
        pass  # a table of numbers; alarms are in metrics.jsonl and summary.json

    def close(self) -> None:
        self._file.close()


class TensorBoardLog:
    """Scalars under RUN/tb/; alarms as text. On resume, TensorBoard's purge_step hides what an
    interrupted process logged past the resumed step; a fresh start removes earlier events."""

    def __init__(self, run_dir: Path, resume_step: int, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.path = tb = run_dir / "tb"
        if not resume_step:  # a run starting afresh: an earlier attempt's events go, as its rows do
            for old in tb.glob("events.out.tfevents.*"):
                old.unlink()
        self._tb = SummaryWriter(str(tb), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict) -> None:
        for k, v in row.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, row["step"])

    def alarm(self, alarm: dict) -> None:
        self._tb.add_text("alarms", f"{alarm['alarm']}: {alarm['message']}", alarm["step"])

    def close(self) -> None:
        self._tb.close()


class WandbLog:
    """Weights & Biases (optional; WANDB_MODE=offline works). The wandb run's id is kept in the
    run directory, so that a resumed run goes on logging into the same wandb run."""

    def __init__(self, run_dir: Path, resume_step: int, config: dict | None = None):
        import wandb

        self.path = run_dir / "wandb"
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(project="stoptool", name=run_dir.name, id=run_id, resume="allow",
                               dir=str(run_dir), config=config or {})

    def write(self, row: dict) -> None:
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self._run.log(values, step=row["step"])

    def alarm(self, alarm: dict) -> None:
        self._run.log({"alarm": alarm["message"]}, step=alarm["step"])

    def close(self) -> None:
        self._run.finish()


KINDS = {"jsonl": JsonlLog, "csv": CsvLog, "tensorboard": TensorBoardLog, "wandb": WandbLog}
FILES = {"jsonl": METRICS, "csv": CSV, "tensorboard": "tb", "wandb": "wandb"}  # what each writes, in the run
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_loggers(names) -> None:
    """Every named logger can run here: one line naming a missing package, before any work."""
    for name in names:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"log names {name}, but the {package} package is not installed: "
                            f"pip install {package}, or drop {name} from log", key="log")


class Loggers:
    """The run's loggers: process 0's; other processes get none (`names` empty). `columns` is
    metrics.csv's header (a fine-tuning run logs other numbers than pretraining)."""

    def __init__(self, names, run_dir: Path, resume_step: int, config: dict | None = None,
                 columns: tuple[str, ...] = CSV_COLUMNS):
        self._logs = []
        for name in names:
            with writing(run_dir / FILES[name]):  # a full disk or a read-only run: one line naming it
                self._logs.append(KINDS[name](run_dir, resume_step, config=config, columns=columns))

    def write(self, row: dict) -> None:
        for log in self._logs:
            with writing(log.path):
                log.write(row)

    def alarm(self, alarm: dict) -> None:
        for log in self._logs:
            with writing(log.path):
                log.alarm(alarm)

    def close(self) -> None:
        for log in self._logs:
            log.close()


class Window:
    """The steps since the last logged row: their count, their summed loss (a tensor on the
    device: adding to it does not wait for the step), the time they waited for the loader, and
    when the window started."""

    def __init__(self):
        self.start, self.steps, self.loss = time.perf_counter(), 0, None
        self.data_s = 0.0
        self.first_step = None

    def add(self, step: int, loss: torch.Tensor, data_s: float) -> None:
        self.first_step = step if self.first_step is None else self.first_step
        self.steps += 1
        self.loss = loss.double() if self.loss is None else self.loss + loss.double()
        self.data_s += data_s


class Speed:
    """img/s over a launch's steps after its first (start-up and compiling left out), and the
    time spent evaluating left out too: what the progress line and the summary both report."""

    def __init__(self, batch: int):
        self.batch, self.paused = batch, 0.0
        self.start: tuple[float, int] | None = None  # (time, step) of the first logged row
        self.now: tuple[float, int] | None = None

    def mark(self, step: int) -> None:
        """A logged row at `step`, once the device has caught up (its loss was read)."""
        self.now = (time.perf_counter(), step)
        self.start = self.start or self.now

    def pause(self, seconds: float) -> None:
        if self.start is not None:
            self.paused += seconds

    @property
    def img_per_s(self) -> float | None:
        if self.start is None or self.now[1] == self.start[1]:
            return None
        elapsed = self.now[0] - self.start[0] - self.paused
        return (self.now[1] - self.start[1]) * self.batch / elapsed if elapsed > 0 else None


def window_row(step: int, ipe: int, window: Window, batch: int, values: dict) -> dict:
    """The row after `step`: the window's mean loss (reading it waits for the device, so the
    window's wall time is the device's), then `values` (the schedules', the model's), then
    speed and timings."""
    n = max(1, window.steps)
    loss = window.loss.item() / n if window.loss is not None else math.nan
    elapsed = time.perf_counter() - window.start
    return {
        "step": step,
        "epoch": round(step / ipe, 3),
        "loss": loss,
        **values,
        "img_per_s": window.steps * batch / elapsed if elapsed > 0 else math.nan,
        "step_s": elapsed / n,
        "data_s": window.data_s / n,
        "time": time.time(),
    }


def metrics_row(model: JEPA, step: int, ipe: int, window: Window, batch: int, hp) -> dict:
    """Pretraining's row after `step` (`window_row`): the schedules' values, and ‖A‖, ‖m̃‖
    (paper Fig. 4)."""
    pred = model.predictor
    return window_row(step, ipe, window, batch, {
        "lr": hp.lr,
        "wd": hp.wd,
        "momentum": hp.momentum,
        "A_norm": whole(pred.A.detach()).float().norm().item(),
        "mask_token_norm": whole(pred.mask_token.detach()).float().norm().item(),
    })
