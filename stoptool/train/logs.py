"""What a run logs: one metrics row every `log_every` steps, as JSON lines (and TensorBoard
events where tensorboard is installed), written by process 0 alone."""

import json
import math
import os
import time
from pathlib import Path

from stoptool.models.jepa import JEPA
from stoptool.train.distributed import whole

METRICS = "metrics.jsonl"


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


class NoLog:
    """What processes other than 0 log to: nothing."""

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


class Window:
    """The steps since the last logged row: their count, summed loss and start time."""

    def __init__(self):
        self.start, self.steps, self.loss = time.perf_counter(), 0, 0.0

    def add(self, loss: float) -> None:
        self.steps += 1
        self.loss += loss


def metrics_row(model: JEPA, step: int, ipe: int, window: Window, batch: int, hp) -> dict:
    """The logged row after `step`: the window's mean loss and speed, the schedules' values,
    and ‖A‖, ‖m̃‖ (paper Fig. 4)."""
    elapsed = time.perf_counter() - window.start
    pred = model.predictor
    return {
        "step": step,
        "epoch": round(step / ipe, 3),
        "loss": window.loss / max(1, window.steps),
        "lr": hp.lr,
        "wd": hp.wd,
        "momentum": hp.momentum,
        "A_norm": whole(pred.A.detach()).float().norm().item(),
        "mask_token_norm": whole(pred.mask_token.detach()).float().norm().item(),
        "img_per_s": window.steps * batch / elapsed if elapsed > 0 else math.nan,
        "time": time.time(),
    }
