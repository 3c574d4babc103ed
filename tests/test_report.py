"""`stoptool report`: statistics on planted probe files against a hand computation, paired
t-intervals, the t quantile, grouping, the written files, and one-line refusals."""

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.config import config_from_dict
from stoptool.io.checkpoint import LATEST, Checkpoint, save_checkpoint
from stoptool.report import make_report, paired_difference, t_quantile

runner = CliRunner(env={"COLUMNS": "400"})
# top-1 of seeds 0, 1, 2 by σ; σ = 0.5 has no seed 2
TOP1 = {0.0: [0.90, 0.92, 0.94], 0.25: [0.93, 0.96, 0.96], 0.5: [0.91, 0.95]}


def plant(root, name: str, sigma: float, seed: int, top1: float | None, step: int = 2, **summary) -> None:
    """A run directory as a finished, probed sweep run leaves it: latest (its metadata: a run of
    `step` steps, one an epoch), config.yaml, summary.json and probe.json (no probe.json when
    `top1` is None)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = config_from_dict({"sigma": sigma, "seed": seed, "out": str(run), "epochs": 2})
    meta = {"kind": "pretrain", "arch": "vit_t4", "img_size": 32, "step": step, "iterations_per_epoch": 1,
            "config": cfg.to_dict()}
    save_checkpoint(run / LATEST, Checkpoint(meta, {"w": torch.zeros(1)}))
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "summary.json").write_text(json.dumps({"step": step, **summary}))
    if top1 is not None:
        row = {"method": "logreg", "layers": "last", "fraction": 1.0, "seed": seed, "top1": top1,
               "top5": None}
        (run / "probe.json").write_text(json.dumps({"checkpoint_meta": {"step": step}, "results": [row]}))


@pytest.fixture
def planted(tmp_path):
    root = tmp_path / "sweep"
    names = []
    for sigma, values in TOP1.items():
        for seed, top1 in enumerate(values):
            names.append(f"sigma={sigma:g},seed={seed}")
            plant(root, names[-1], sigma, seed, top1)
    plant(root, "sigma=1,seed=0", 1.0, 0, None, step=1, stopped="the loss is not finite at step 1")
    names += ["sigma=1,seed=0", "sigma=1,seed=1"]  # the last was never started
    manifest = {"grid": {"sigma": [0.0, 0.25, 0.5, 1.0], "seed": [0, 1, 2]}, "runs": names}
    (root / "sweep.yaml").write_text(yaml.safe_dump(manifest))
    return root


def test_the_t_quantile_matches_the_published_table():
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (10, 2.2281),
                  (29, 2.0452), (120, 1.9799), (10000, 1.9602)):
        assert t_quantile(df) == pytest.approx(t, abs=1e-4), df


def test_a_paired_interval_of_a_known_case():
    # differences 3, 4, 2: mean 3, sd 1, half width t(0.975, 2) / √3 = 4.30265 / 1.73205
    d = paired_difference({0: 95.0, 1: 98.0, 2: 96.0}, {0: 92.0, 1: 94.0, 2: 94.0, 3: 50.0})
    assert (d["n"], d["mean"], d["sd"]) == (3, pytest.approx(3.0), pytest.approx(1.0))
    assert (d["low"], d["high"]) == (pytest.approx(3 - 2.484138), pytest.approx(3 + 2.484138))
    one = paired_difference({0: 95.0}, {0: 92.0, 1: 94.0})
    assert (one["n"], one["mean"], one["low"]) == (1, 3.0, None)  # one pair: no interval
    assert paired_difference({5: 1.0}, {0: 2.0}) is None


def test_groups_means_sds_and_paired_differences_match_a_hand_computation(planted, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["report", str(planted), "--baseline", "sigma=0", "--json", str(out),
                                 "--markdown", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    groups = {g["fields"]["sigma"]: g for g in json.loads(out.read_text())["groups"]}
    assert sorted(groups) == [0.0, 0.25, 0.5]  # σ = 1 has no probed run
    base, stop, wide = (groups[s]["logreg_top1"] for s in (0.0, 0.25, 0.5))
    assert [groups[s]["n"] for s in (0.0, 0.25, 0.5)] == [3, 3, 2]
    assert (base["mean"], base["sd"]) == (pytest.approx(92.0), pytest.approx(2.0))
    assert (stop["mean"], stop["sd"]) == (pytest.approx(95.0), pytest.approx(math.sqrt(3)))
    assert (wide["mean"], wide["sd"]) == (pytest.approx(93.0), pytest.approx(math.sqrt(8)))
    assert "diff" not in base
    # σ = 0.25 against σ = 0, seed by seed: 3, 4, 2
    diff = stop["diff"]
    assert (diff["n"], diff["mean"], diff["sd"]) == (3, pytest.approx(3.0), pytest.approx(1.0))
    assert diff["low"] == pytest.approx(0.515862, abs=1e-6)
    assert diff["high"] == pytest.approx(5.484138, abs=1e-6)
    # σ = 0.5 has seeds 0 and 1 only: differences 1, 3 → mean 2, sd √2, t(0.975, 1) = 12.7062
    half = 12.706205 * math.sqrt(2) / math.sqrt(2)
    assert (wide["diff"]["n"], wide["diff"]["low"]) == (2, pytest.approx(2 - half, abs=1e-5))
    md = (tmp_path / "r.md").read_text().splitlines()
    assert md[0] == "| sigma | n | logreg_top1 | Δ logreg_top1 vs sigma=0 (95 % CI) |"
    assert md[2:5] == ["| 0 | 3 | 92.00 ± 2.00 | baseline |",
                       "| 0.25 | 3 | 95.00 ± 1.73 | +3.00 [+0.52, +5.48] (n = 3) |",
                       "| 0.5 | 2 | 93.00 ± 2.83 | +2.00 [-10.71, +14.71] (n = 2) |"]
    # unfinished runs are listed, not dropped
    assert md[-1] == ("Not included (no probe results): sigma=1,seed=0 (failed at step 1: the loss is not "
                      "finite at step 1); sigma=1,seed=1 (not started).")
    assert "not included: sigma=1,seed=1 (not started)" in result.stdout


def test_by_other_fields_without_a_manifest_and_a_plot(planted, tmp_path):
    (planted / "sweep.yaml").unlink()  # run directories alone: the fields are those that differ
    report = make_report(planted)
    assert report.by == ["sigma"] and [len(g.runs) for g in report.groups] == [3, 3, 2]
    by_seed = make_report(planted, by=["seed"])
    assert [(g.fields["seed"], g.stats["logreg_top1"]["mean"]) for g in by_seed.groups] == [
        (0, pytest.approx(91.333333)), (1, pytest.approx(94.333333)), (2, pytest.approx(95.0))]
    figure = tmp_path / "fig.png"
    result = runner.invoke(app, ["report", str(planted), "--plot", str(figure)])
    assert result.exit_code == 0, result.output
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads(figure.with_suffix(".json").read_text())["groups"]) == 3


@pytest.mark.parametrize("args, message", [
    (["--baseline", "sigma"], "--baseline takes FIELD=VALUE"),
    (["--baseline", "lr=0.001"], "--baseline lr: the groups are by sigma"),
    (["--baseline", "sigma=0.7"], "no probed run has sigma=0.7 (it takes 0, 0.25, 0.5)"),
    (["--by", "sigmaa"], "--by sigmaa: not a config key of these runs"),
    (["--json", "."], "is a directory; give a file name"),
    (["--plot", "fig.gif"], "the figure format comes from the extension"),
])
def test_bad_report_options_exit_2_with_one_line_and_write_nothing(planted, tmp_path, monkeypatch, args,
                                                                   message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", str(planted), *args, "--markdown", "r.md"])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.md").exists()


def test_a_directory_without_results_exits_2(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "none")])
    assert result.exit_code == 2 and "is not a directory" in result.stderr
    plant(tmp_path / "s", "sigma=0,seed=0", 0.0, 0, None)
    result = runner.invoke(app, ["report", str(tmp_path / "s")])
    assert result.exit_code == 2 and "no run in" in result.stderr
    assert "sigma=0,seed=0: trained, not probed" in result.stderr


def test_error_bars_stop_at_the_ends_of_the_metrics_range():
    from stoptool.report import error_bars

    stats = [{"mean": 99.0, "sd": 2.5}, {"mean": 1.0, "sd": 3.0}, {"mean": 50.0, "sd": None}]
    assert error_bars("logreg_top1", stats) == [[2.5, 1.0, 0.0], [1.0, 3.0, 0.0]]  # [below, above]
    assert error_bars("loss", [{"mean": 0.2, "sd": 0.5}]) == [[0.2], [0.5]]
