"""Training at scale: gradient accumulation, checkpoints inside an epoch (and runs killed
between them), and the device-side guard against non-finite steps."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from stoptool.config import build_config
from stoptool.data.transforms import normalize
from stoptool.errors import UserError
from stoptool.io.checkpoint import LATEST, load_checkpoint
from stoptool.train import fit as loop
from stoptool.train.pretrain import pretrain

WEIGHTS = ("encoder.", "target_encoder.", "predictor.")


def _tensors(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / LATEST).tensors


def _rows(run) -> list[dict]:
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sigma", [0.0, 0.25])
def test_accumulated_micro_batches_make_the_whole_batch_update(tiny_cfg, tmp_path, sigma):
    """Masks are drawn for the whole batch, then split into 4 micro-batches whose gradients add
    up: after 6 steps the weights (EMA target and AdamW moments too) are the whole batch's,
    with I-JEPA and with StoP noise."""
    runs = {}
    for accum in (1, 4):
        runs[accum] = tmp_path / f"accum{accum}"
        pretrain(tiny_cfg(batch_size=16, steps=6, accum_steps=accum, sigma=sigma, out=str(runs[accum])))
    whole, split = _tensors(runs[1]), _tensors(runs[4])
    assert whole.keys() == split.keys()
    for name, t in whole.items():
        if name.startswith(WEIGHTS) or name.startswith("opt.state"):
            err = ((split[name].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30)).item()
            assert err < 1e-5, (name, err)
    losses = [[r["loss"] for r in _rows(run)] for run in runs.values()]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    # the health metrics see the whole batch's features, not the last micro-batch's
    assert "rankme" in _rows(runs[4])[0]


def test_a_batch_that_does_not_split_into_micro_batches_is_refused(tiny_cfg):
    with pytest.raises(UserError, match="batch_size 8 does not split into accum_steps 3 equal micro-batches"):
        tiny_cfg(accum_steps=3)


def test_latest_is_written_inside_the_epoch_every_n_steps_and_by_the_clock(tiny_cfg, tmp_path, monkeypatch):
    saved = []
    real = loop.Checkpointer.save

    def spy(self, path, step, with_state=True, background=False):
        saved.append((path.name, step, background))
        return real(self, path, step, with_state=with_state, background=background)

    monkeypatch.setattr(loop.Checkpointer, "save", spy)
    run = tmp_path / "every"
    pretrain(tiny_cfg(steps=7, checkpoint_every=3, out=str(run)))  # 168 steps an epoch: all inside it
    assert saved == [(LATEST, 3, True), (LATEST, 6, True), (LATEST, 7, False)]
    assert load_checkpoint(run / LATEST).meta["step"] == 7
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoint_stall_s"] > 0
    saved.clear()
    pretrain(tiny_cfg(steps=3, checkpoint_minutes=1e-9, out=str(tmp_path / "clock")))  # always due
    assert saved == [(LATEST, 1, True), (LATEST, 2, True), (LATEST, 3, False)]


def test_a_nan_between_checks_stops_the_run_with_the_weights_from_before_it(tiny_cfg, tmp_path, monkeypatch):
    """The host reads the guard at logged steps and checkpoints only; the steps after a
    non-finite one change nothing, so the next check still finds the weights of before it."""
    real, calls = loop.train_step, {"n": 0}

    def poisoned(state, batch, hp):
        calls["n"] += 1
        if calls["n"] == 5:  # step 4 (its uint8 images normalised here, to hold a NaN)
            batch.images = normalize(batch.images)
            batch.images[0, 0, 0, 0] = float("nan")
        return real(state, batch, hp)

    monkeypatch.setattr(loop, "train_step", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(UserError, match="training stopped at step 4: loss is nan; the last good checkpoint"):
        pretrain(tiny_cfg(steps=8, log_every=100, checkpoint_every=4, out=str(run)))
    assert calls["n"] == 8  # it went on to the next check, after step 7
    kept = load_checkpoint(run / LATEST)
    assert kept.meta["step"] == 4
    monkeypatch.setattr(loop, "train_step", real)
    pretrain(tiny_cfg(steps=4, out=str(tmp_path / "clean")))
    clean = _tensors(tmp_path / "clean")
    for name in clean:
        if name.startswith(WEIGHTS):
            assert torch.equal(kept.tensors[name], clean[name]), name
    rows = _rows(run)
    assert [(r["step"], r["alarm"]) for r in rows if "alarm" in r] == [(4, "non_finite")]


TINY = ["--arch", "vit_n2", "--img-size", "16", "--pred-width", "48", "--pred-depth", "1",
        "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--workers", "0", "--eval-every", "0",
        "--log", "jsonl", "--log-every", "1", "--checkpoint-every", "1", "-q"]


def _killed_at(args: list[str], run, step: int) -> None:
    """Start the run, and SIGKILL it as soon as it has logged `step` (somewhere in the next
    step, or in the background write of a checkpoint)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and _last_logged(run) < step:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _last_logged(run) -> int:
    metrics, last = run / "metrics.jsonl", 0
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            last = max(last, json.loads(line).get("step", 0))
        except json.JSONDecodeError:  # a line being written
            pass
    return last


def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGKILLed three times at points drawn here, and started again each time, the run ends
    where an uninterrupted one does, bit for bit, with every step logged once."""
    run, steps = tmp_path / "killed", 10
    args = [sys.executable, "-m", "stoptool", "pretrain", *TINY, "--steps", str(steps), "--out", str(run)]
    kills = sorted(random.Random().sample(range(1, steps - 1), 3))
    for step in kills:
        _killed_at(args, run, step)
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (kills, done.stderr[-2000:])
    reference = tmp_path / "reference"
    overrides = {"arch": "vit_n2", "img_size": 16, "pred_width": 48, "pred_depth": 1, "batch_size": 8,
                 "precision": "fp32", "device": "cpu", "workers": 0, "eval_every": 0, "log": "jsonl",
                 "log_every": 1, "steps": steps, "out": str(reference)}
    pretrain(build_config(None, overrides))
    got, want = _tensors(run), _tensors(reference)
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(got[k], want[k])]
    assert not changed, (kills, changed[:5])
    rows, ref_rows = _rows(run), _rows(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, steps + 1)), kills
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows], kills


def test_bucketed_masks_meet_few_shapes_and_keep_nearly_as_many_patches():
    """The ViT-B/16 preset's masks (a 14×14 grid), 200 batches of 64: exact context lengths
    give dozens of shapes; rounded down to multiples of 16 patches, a handful, for a few
    per cent fewer context patches kept."""
    from stoptool.config import build_config
    from stoptool.masks import MaskSampler

    shapes, kept = {}, {}
    for bucket in (0, 16):
        cfg = build_config("stop-vitb16-in1k", {"mask_bucket": bucket})
        sampler, gen = MaskSampler(cfg.mask_config()), torch.Generator().manual_seed(0)
        draws = [sampler(64, gen) for _ in range(200)]
        shapes[bucket] = {(ctx.shape[1], tgt.shape[2]) for ctx, tgt in draws}
        kept[bucket] = sum(ctx.shape[1] for ctx, _ in draws) / len(draws)
    targets = {k for _, k in shapes[0]}
    assert {k for _, k in shapes[16]} == targets  # the target blocks are left as they are
    assert all(n % 16 == 0 for n, _ in shapes[16])
    assert len(shapes[0]) > 20 and len(shapes[16]) <= len(targets) * len(range(16, 197, 16))
    assert 0.85 < kept[16] / kept[0] < 1.0


def test_a_compiled_step_is_compiled_once_per_mask_shape(tiny_cfg, monkeypatch):
    """--compile compiles the step's forward and backward whole (one graph per mask shape with
    bucketing), and computes what the eager step does. (The graph-building backend stands in
    for inductor's code generation, which takes a minute here: the count of graphs is
    dynamo's either way.)"""
    from torch._dynamo.utils import counters

    from stoptool.masks import MaskSampler
    from stoptool.models import archs
    from stoptool.models.jepa import build_jepa
    from stoptool.train import runtime
    from stoptool.train.schedules import Hyper
    from stoptool.train.step import StepInputs, compile_forward, single_process_state, train_step

    monkeypatch.setitem(archs.ARCHS, "n", archs.ArchSpec(48, 1, 3))
    monkeypatch.setattr(runtime, "compiled", lambda fn, dynamic=None, cuda_graphs=False: torch.compile(
        fn, dynamic=dynamic, backend="aot_eager"))
    cfg = tiny_cfg(sigma=0.0, mask_bucket=8)
    losses, graphs, shapes = {}, 0, set()
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = build_jepa(cfg.model).train()
        state = single_process_state(model, runtime.autocast_factory(torch.device("cpu"), "fp32"))
        if compile_:
            torch._dynamo.reset()
            before = counters["stats"]["unique_graphs"]
            compile_forward(state, dynamic=False)
        sampler, gen = MaskSampler(cfg.mask_config()), torch.Generator().manual_seed(0)
        losses[compile_] = []
        for i in range(6):
            ctx, tgt = sampler(8, gen)
            shapes.add((ctx.shape[1], tgt.shape[2]))
            images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i))
            loss = train_step(state, StepInputs(images, ctx, tgt), Hyper(1e-3, 0.04, 0.996)).loss
            losses[compile_].append(loss.item())
        if compile_:
            graphs = counters["stats"]["unique_graphs"] - before
    assert len(shapes) >= 2 and graphs == len(shapes)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
