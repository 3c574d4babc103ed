"""Watching a run: health metrics, alarms, the online k-NN, loggers and progress lines."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.probe.knn import knn_probe
from stoptool.train.pretrain import pretrain
from stoptool.train.watch import Alarms, feature_std, rankme, sample

runner = CliRunner()


def test_rankme_is_the_rank_of_matrices_with_equal_singular_values():
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    for r in (1, 2, 5, 17):
        feats = torch.cat([3.0 * q[:, :r], torch.zeros(64, 64 - r)], dim=1)  # r singular values of 3
        p = np.r_[np.full(r, 1 / r), np.zeros(64 - r)] + 1e-7  # RankMe adds eps to every value
        assert rankme(feats) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
        assert rankme(feats) == pytest.approx(r, rel=1e-3)
    # unequal values: exp of the entropy of σ / Σσ, by hand
    feats = torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    p = np.array([0.75, 0.25, 0.0, 0.0]) + 1e-7
    assert rankme(feats) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)


def test_feature_std_is_the_mean_std_of_the_normalised_rows():
    feats = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    unit = feats.numpy() / np.linalg.norm(feats.numpy(), axis=1, keepdims=True)
    assert feature_std(feats) == pytest.approx(unit.std(axis=0, ddof=1).mean(), rel=1e-9)
    assert feature_std(torch.ones(8, 5)) == 0.0  # every image the same point


def test_a_planted_collapse_fires_once_and_a_steady_run_stays_silent():
    notes = []
    alarms = Alarms(notes.append)
    constant = torch.ones(16, 8)  # an encoder whose output does not depend on the image
    healthy = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    rows = [{"step": s, "loss": 0.5, "rankme": rankme(healthy), "feature_std": feature_std(healthy)}
            for s in range(1, 6)]
    assert [a for r in rows for a in alarms.check(r)] == [] and notes == []
    bad = [{"step": s, "loss": 0.5, "rankme": rankme(constant), "feature_std": feature_std(constant)}
           for s in (6, 7)]
    fired = [a for r in bad for a in alarms.check(r)]
    assert [a["alarm"] for a in fired] == ["collapse"] and fired[0]["step"] == 6
    assert len(notes) == 1 and "collapsing" in notes[0] and "lower lr" in notes[0]


def test_loss_jump_and_data_bound_alarms():
    alarms = Alarms()
    for s in range(1, 8):
        assert alarms.check({"step": s, "loss": 1.0, "step_s": 1.0, "data_s": 0.1}) == []
    jump = alarms.check({"step": 8, "loss": 3.5, "step_s": 1.0, "data_s": 0.6})
    assert [a["alarm"] for a in jump] == ["loss_jump", "data_bound"]
    assert "more workers" in jump[1]["message"]
    assert alarms.check({"step": 9, "loss": 9.0, "step_s": 1.0, "data_s": 0.9}) == []  # once each


def test_the_eval_sample_is_everything_in_order_or_a_seeded_subset():
    assert sample(5, 10, 0).tolist() == [0, 1, 2, 3, 4]
    a, b = sample(1000, 50, 3), sample(1000, 50, 3)
    assert len(a) == 50 and (a == b).all() and (np.diff(a) > 0).all()


def _tiny(tiny_cfg, out, **kw):
    base = dict(dataset="digits", batch_size=8, epochs=1, steps=None, out=str(out), log_every=2)
    return tiny_cfg(**{**base, **kw})


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """An ImageNet-like tree: train/ and val/, 6 classes × 4 random 20-px PNGs each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(6):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    root / split / f"c{c}" / f"{i}.png")
    return root


def test_online_knn_equals_probe_knn_on_the_saved_weights(tiny_cfg, labelled, tmp_path):
    # trains on train/ (24 images, batch 8: 3 steps an epoch), evaluates on train/ and val/
    result = pretrain(_tiny(tiny_cfg, tmp_path / "r", dataset=str(labelled), epochs=2, eval_every=1))
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]  # the initial weights, after each epoch
    assert all("knn_top5" in r for r in evals)  # 6 classes
    args = ["--dataset", str(labelled), "--method", "knn", "--precision", "fp32", "--no-cache", "-q"]
    probed = runner.invoke(app, ["probe", str(result.checkpoint), *args, "--out", str(tmp_path / "p.json")])
    assert probed.exit_code == 0, probed.output
    row = json.loads((tmp_path / "p.json").read_text())["results"][0]
    assert evals[-1]["knn_top1"] == row["top1"] and evals[-1]["knn_top5"] == row["top5"]
    assert row["params"]["features"] == "whitened"  # the probe's k-NN, which the online one is
    assert "knn_features: whitened" in (tmp_path / "r" / "config.yaml").read_text().splitlines()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["alarms"] == []  # a healthy run raises none


def test_online_knn_uses_the_configured_features(tiny_cfg, labelled, tmp_path):
    """knn_features=raw: the online k-NN's top-1/top-5 are the probe k-NN's with raw features on
    the encoder's features, not the whitened one's (the default, checked end to end above)."""
    from stoptool.models.jepa import build_jepa
    from stoptool.train.distributed import Nets, World
    from stoptool.train.watch import extract, online_eval

    cfg = _tiny(tiny_cfg, tmp_path / "r", dataset=str(labelled), eval_every=1, knn_features="raw")
    world, cpu = World(), torch.device("cpu")
    ev = online_eval(cfg, None, world, cpu, "fp32")
    torch.manual_seed(0)
    nets = Nets.plain(build_jepa(cfg.model))
    got = ev(nets)
    s = ev.evalset
    x_tr, y_tr = extract(nets, s.train, s.train_idx, ev.img_size, ev.autocast, cpu, world)
    x_te, y_te = extract(nets, s.test, s.test_idx, ev.img_size, ev.autocast, cpu, world)
    same, unlike = (knn_probe(x_tr, y_tr, x_te, y_te, 6, features=f) for f in ("raw", "whitened"))
    assert (got["knn_top1"], got["knn_top5"]) == (same["top1"], same["top5"])
    assert (unlike["top1"], unlike["top5"]) != (same["top1"], same["top5"])  # the two tell apart here


def test_health_metrics_are_logged_with_their_names(tiny_cfg, tmp_path):
    pretrain(_tiny(tiny_cfg, tmp_path / "r", batch_size=16, steps=4, eval_every=0, clip_grad=0.5))
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("knn_top1" not in r for r in rows)  # eval_every 0: off
    for r in rows:
        assert {"rankme", "feature_std", "grad_norm", "mfu", "data_s", "step_s", "A_norm",
                "mask_token_norm"} <= r.keys()
        assert 1.0 <= r["rankme"] <= 16 and 0 < r["feature_std"] < 1 and r["grad_norm"] > 0
        assert 0 <= r["data_s"] <= r["step_s"] and 0 < r["mfu"] < 1


def test_csv_and_tensorboard_hold_each_step_once_after_a_resume(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "r"
    pretrain(_tiny(tiny_cfg, run, epochs=1, steps=6, log_every=1, eval_every=0))
    # a process killed after step 6 had logged steps 7 and 8 past the checkpoint it left
    with open(run / "metrics.csv", "a") as f:
        f.write("7,0.7,9.9\n8,0.8,9.9\n")
    with SummaryWriter(str(run / "tb")) as tb:
        for step in (7, 8):
            tb.add_scalar("loss", 99.0, step)
    pretrain(_tiny(tiny_cfg, run, epochs=1, steps=10, log_every=1, eval_every=0))
    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == list(range(1, 11))
    assert all(r["loss"] and float(r["loss"]) < 9 for r in table)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == list(range(1, 11))
    assert all(e.value < 9 for e in events.Scalars("loss"))


def test_the_csv_header_is_fixed(tiny_cfg, tmp_path):
    from stoptool.train.logs import CSV_COLUMNS

    pretrain(_tiny(tiny_cfg, tmp_path / "r", epochs=1, steps=2, log=" csv", eval_every=0))
    header = (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == CSV_COLUMNS
    assert not (tmp_path / "r" / "metrics.jsonl").exists() and not (tmp_path / "r" / "tb").exists()


def test_wandb_without_the_package_exits_2_with_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "wandb" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    result = runner.invoke(app, ["pretrain", "--log", "jsonl,wandb", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: log names wandb, but the wandb package is not installed: "
                                     "pip install wandb, or drop wandb from log (--log)")
    assert not (tmp_path / "r").exists()


def test_a_slow_loader_raises_the_data_bound_alarm(tiny_cfg, tmp_path, monkeypatch):
    import time

    from stoptool.data.loader import AugmentedImages

    real = AugmentedImages.__getitem__

    def slow(self, key):
        time.sleep(0.75)  # 2 images a batch: 1.5 s a step spent loading, several times the compute
        return real(self, key)

    monkeypatch.setattr(AugmentedImages, "__getitem__", slow)
    notes = []
    pretrain(_tiny(tiny_cfg, tmp_path / "r", batch_size=2, steps=4, eval_every=0), notify=notes.append)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [a["alarm"] for a in summary["alarms"]] == ["data_bound"]
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["alarm"] for r in rows if "alarm" in r] == ["data_bound"]
    assert any("data loader" in n and "workers" in n for n in notes)


def test_progress_in_a_pipe_is_plain_lines(labelled, tmp_path):
    args = [sys.executable, "-m", "stoptool", "pretrain", "--dataset", str(labelled), "--arch", "vit_n2",
            "--img-size", "16",
            "--pred-width", "48", "--pred-depth", "1", "--batch-size", "16", "--steps", "4",
            "--log-every", "2", "--precision", "fp32", "--device", "cpu", "--out", str(tmp_path / "r")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pretrain step")]
    # the first step, then every --log-every steps
    assert [line.split()[2] for line in lines] == ["1/4", "2/4", "4/4"]
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    assert "knn_top1" in lines[-1] and "ETA" in lines[0] and "img/s" in lines[0]


def test_a_resumed_run_measures_collapse_against_its_initial_weights(tmp_path):
    from stoptool.train.logs import first_health

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0, "knn_top1": 0.5}\n'
                   '{"step": 1, "loss": 0.4, "rankme": 30.0, "feature_std": 0.05}\n'
                   '{"step": 10, "loss": 0.3, "rankme": 12.0, "feature_std": 0.04}\n{"step": 11, "lo')
    first = first_health(log)
    assert first == {"rankme": 30.0, "feature_std": 0.05}
    alarms = Alarms(first=first)
    assert alarms.check({"step": 12, "loss": 0.3, "rankme": 7.0, "feature_std": 0.04}) == []
    fired = alarms.check({"step": 13, "loss": 0.3, "rankme": 5.0, "feature_std": 0.04})  # < 0.2 × 30
    assert [a["alarm"] for a in fired] == ["collapse"] and "rankme 5" in fired[0]["message"]


def test_starting_over_drops_every_row_of_the_earlier_attempt(tiny_cfg, labelled, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    pretrain(_tiny(tiny_cfg, run, dataset=str(labelled), steps=2, log_every=1, eval_every=1))
    pretrain(_tiny(tiny_cfg, run, dataset=str(labelled), steps=1, log_every=1, eval_every=1), resume=False)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # the evaluation of the initial weights once
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("knn_top1")] == [0, 1]


def test_progress_and_summary_report_one_img_per_s_with_evaluations_left_out(tiny_cfg, labelled, tmp_path,
                                                                           monkeypatch):
    """On a clock where every reading advances 1 ms and each online k-NN takes 100 s, the img/s
    that the progress rows show stays the training steps' own (the evaluations are left out,
    before and after them alike), and the summary's is the last row's."""
    import types

    from stoptool.train import fit, logs
    from stoptool.train.watch import OnlineEval

    now = {"t": 0.0}

    def perf_counter() -> float:
        now["t"] += 0.001
        return now["t"]

    clock = types.SimpleNamespace(perf_counter=perf_counter, time=lambda: 0.0, monotonic=perf_counter)
    monkeypatch.setattr(fit, "time", clock)
    monkeypatch.setattr(logs, "time", clock)
    real = OnlineEval.__call__

    def slow(self, nets):
        now["t"] += 100.0
        return real(self, nets)

    monkeypatch.setattr(OnlineEval, "__call__", slow)
    shown = []
    cfg = _tiny(tiny_cfg, tmp_path / "r", dataset=str(labelled), epochs=3, eval_every=1, log_every=1)
    result = pretrain(cfg, progress=lambda step, total, row: row is not None and shown.append(row))
    speeds = [row["avg_img_per_s"] for row in shown[1:]]
    assert any("knn_top1" in row for row in shown[1:-1])  # evaluations inside the run
    assert all(s is not None and s > 0 for s in speeds), speeds
    assert max(speeds) < 3 * min(speeds), speeds  # 100 s counted anywhere would move it 1000×
    assert result.images_per_second == round(speeds[-1], 1)
