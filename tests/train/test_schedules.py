"""Schedules equal their closed forms at the start, end of warmup, middle and end."""

import math

import pytest

from stoptool.config import config_from_dict
from stoptool.train.schedules import Schedules, make_schedules

S = Schedules(
    total=1000, warmup=100, lr=1e-3, start_lr=2e-4, final_lr=1e-6, wd=0.04, final_wd=0.4, ema=(0.996, 1.0)
)


def test_lr():
    assert S.lr_at(0) == pytest.approx(2e-4)
    assert S.lr_at(50) == pytest.approx(2e-4 + 0.5 * 8e-4)
    assert S.lr_at(100) == pytest.approx(1e-3)
    assert S.lr_at(550) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert S.lr_at(1000) == pytest.approx(1e-6)
    assert S.lr_at(1500) == pytest.approx(1e-6)


def test_wd_cosine_over_whole_run():
    assert S.wd_at(0) == pytest.approx(0.04)
    assert S.wd_at(500) == pytest.approx(0.22)
    assert S.wd_at(250) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert S.wd_at(1000) == pytest.approx(0.4)


def test_momentum_linear():
    assert S.momentum_at(0) == pytest.approx(0.996)
    assert S.momentum_at(500) == pytest.approx(0.998)
    assert S.momentum_at(1000) == pytest.approx(1.0)


def test_schedules_span_ipe_scale_epochs_and_freeze():
    cfg = config_from_dict(dict(epochs=10, warmup=2, ipe_scale=1.25, const_after_epoch=6))
    s = make_schedules(cfg.optim, iterations_per_epoch=20)
    assert s.total == 250 and s.warmup == 40 and s.freeze_at == 120
    assert s.lr_at(200) == s.lr_at(120) and s.wd_at(199) == s.wd_at(120)
    assert s.momentum_at(125) == pytest.approx(0.996 + 0.004 * 125 / 250)


def _released_loop_values(warmup, start_lr, lr, final_lr, wd, final_wd, total, hold_from=None):
    """What the released I-JEPA/StoP loops set for each step, written the way they run: the lr
    and wd schedulers count a step *before* it is taken (holding their value from `hold_from`
    on, the ViT-H setting), and the momentum generator yields from i = 0."""
    k, values = 0, []
    for i in range(total):
        k += 1
        at = k if hold_from is None or k < hold_from else hold_from
        if at < warmup:
            lr_k = start_lr + at / max(1, warmup) * (lr - start_lr)
        else:
            progress = (at - warmup) / max(1, total - warmup)
            lr_k = max(final_lr, final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
        wd_k = final_wd + (wd - final_wd) * 0.5 * (1 + math.cos(math.pi * at / total))
        wd_k = max(final_wd, wd_k) if final_wd <= wd else min(final_wd, wd_k)
        values.append((lr_k, wd_k, 0.996 + i * (1.0 - 0.996) / total))
    return values


@pytest.mark.parametrize("hold", [None, 6])
def test_each_step_runs_with_the_released_loops_values(hold):
    cfg = config_from_dict(dict(epochs=10, warmup=2, lr=1e-3, start_lr=2e-4, final_lr=1e-6, wd=0.04,
                                final_wd=0.4, const_after_epoch=hold))
    s = make_schedules(cfg.optim, iterations_per_epoch=20)
    ref = _released_loop_values(40, 2e-4, 1e-3, 1e-6, 0.04, 0.4, 200, None if hold is None else 120)
    assert [s.at(step) for step in range(200)] == [pytest.approx(v, rel=1e-12) for v in ref]
    # step 0 is one warmup step in; the last step runs at the end of the cosine
    assert s.at(0)[0] == pytest.approx(2e-4 + 8e-4 / 40) and s.at(0)[2] == 0.996
    if hold is None:
        assert s.at(199)[:2] == pytest.approx((1e-6, 0.4))
