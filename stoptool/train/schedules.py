"""Learning-rate, weight-decay and EMA-momentum schedules, as closed forms of the step.

All run over `total = ipe_scale × epochs × iterations_per_epoch` steps (I-JEPA's convention);
with `ipe_scale > 1` training stops before the schedules reach their ends. `at(step)` gives
what training step `step` (counted from 0) runs with, as the released I-JEPA and StoP loops
do: their lr and wd schedulers advance once *before* each step, so step 0 already runs at
position 1 of the warmup and the last step at position `total`, while the momentum generator
yields its first value, 0.996, for step 0.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple


class Hyper(NamedTuple):
    """One step's values of the schedules."""

    lr: float
    wd: float
    momentum: float  # of the EMA


@dataclass(frozen=True)
class Schedules:
    total: int
    warmup: int
    lr: float
    start_lr: float
    final_lr: float
    wd: float
    final_wd: float
    ema: tuple[float, float]
    freeze_at: int | None = None  # lr and wd stay at their value from this step on

    def _frozen(self, step: int) -> int:
        return step if self.freeze_at is None else min(step, self.freeze_at)

    def lr_at(self, step: int) -> float:
        """Linear warmup start_lr -> lr, then cosine lr -> final_lr."""
        step = self._frozen(step)
        if step < self.warmup:
            return self.start_lr + (step / self.warmup) * (self.lr - self.start_lr)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.final_lr + (self.lr - self.final_lr) * cos

    def wd_at(self, step: int) -> float:
        """Cosine wd -> final_wd over the whole run."""
        progress = min(self._frozen(step) / max(1, self.total), 1.0)
        return self.final_wd + (self.wd - self.final_wd) * 0.5 * (1 + math.cos(math.pi * progress))

    def momentum_at(self, step: int) -> float:
        """EMA momentum rising linearly from ema[0] to ema[1]."""
        start, end = self.ema
        return start + (end - start) * min(step / max(1, self.total), 1.0)

    def at(self, step: int) -> Hyper:
        """(lr, wd, momentum) for training step `step` (0-based), aligned as described above."""
        return Hyper(self.lr_at(step + 1), self.wd_at(step + 1), self.momentum_at(step))


def make_schedules(cfg, iterations_per_epoch: int) -> Schedules:
    """The schedules of an optimization config (`PretrainConfig.optim`)."""
    ipe = iterations_per_epoch
    freeze = None if cfg.const_after_epoch is None else int(cfg.const_after_epoch * ipe)
    return Schedules(
        total=max(1, int(cfg.ipe_scale * cfg.epochs * ipe)),
        warmup=int(cfg.warmup * ipe),
        lr=cfg.lr,
        start_lr=cfg.start_lr,
        final_lr=cfg.final_lr,
        wd=cfg.wd,
        final_wd=cfg.final_wd,
        ema=tuple(cfg.ema),
        freeze_at=freeze,
    )
