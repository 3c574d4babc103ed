"""`stoptool sweep`: grid expansion and run names, one-line refusals before any run, skip and
resume, the SLURM and command-list output, and parallel runs splitting the cores."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.main import get_command
from typer.testing import CliRunner

from stoptool import sweep as sweep_module
from stoptool.cli import app
from stoptool.errors import UserError
from stoptool.runs import RunLock, lock_holder
from stoptool.sweep import commands, load_sweep, run_sweep, sweep_names

runner = CliRunner(env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A data set both pretrain and probe read: train/ (2 classes × 8) and val/ (2 × 4), 16 px."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def tiny_base(folder: Path) -> dict:
    return dict(arch="vit_n2", img_size=16, pred_width=48, pred_depth=1, batch_size=8, steps=2,
                precision="fp32", device="cpu", workers=0, eval_every=0, log="jsonl", log_every=1,
                dataset=str(folder))


def write_spec(path: Path, grid: dict, base: dict, probe: dict | None = None, **sections) -> Path:
    spec = {"base": base, "grid": grid, "probe": probe or {"method": "logreg", "cache": False}, **sections}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep(*args):
    return runner.invoke(app, ["sweep", *map(str, args)])


def listed(output: str) -> dict[str, str]:
    """run -> state, from the table `sweep --dry-run` prints."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines()
            if line.startswith("│")]
    return {row[0]: row[1] for row in rows}


def test_the_grid_expands_as_a_product_into_named_run_directories(tmp_path, folder):
    grid = {"pred_pos": ["sincos", "learned"], "sigma": [0, 0.25], "seed": [0, 1, 2]}
    spec = write_spec(tmp_path / "s.yaml", grid, tiny_base(folder))
    plan = load_sweep(str(spec), tmp_path / "out")
    names = [r.name for r in plan.runs]
    assert len(names) == 12 and len(set(names)) == 12
    assert names[:4] == ["pred_pos=sincos,sigma=0,seed=0", "pred_pos=sincos,sigma=0,seed=1",
                         "pred_pos=sincos,sigma=0,seed=2", "pred_pos=sincos,sigma=0.25,seed=0"]
    assert names[-1] == "pred_pos=learned,sigma=0.25,seed=2"
    last = plan.runs[-1].cfg
    assert (last.model.pred_pos, last.model.sigma, last.runtime.seed) == ("learned", 0.25, 2)
    assert (last.model.arch, last.model.pred_width) == ("vit_n2", 48)  # from base
    assert Path(last.runtime.out) == tmp_path / "out" / names[-1]
    # lists, paths and other characters become a name any file system takes
    grid = {"crop_scale": [[0.5, 1.0]], "dataset": [str(folder)]}
    odd = write_spec(tmp_path / "odd.yaml", grid, tiny_base(folder))
    (name,) = [r.name for r in load_sweep(str(odd), tmp_path / "o").runs]
    assert name.startswith("crop_scale=0.5-1,dataset=") and "/" not in name
    assert re.fullmatch(r"[\w.,=+-]+", name)
    # --dry-run lists every run and its state, and writes nothing
    dry = sweep(spec, "--out", tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert listed(dry.stdout) == {n: "not started" for n in names}
    assert not (tmp_path / "out").exists()


def test_every_shipped_spec_loads_and_the_cpu_ones_have_three_seeds():
    names = sweep_names()
    for paper in ("table6-pred-pos", "table7-noise-on", "fig3-cov", "sigma-grid"):
        assert paper in names and f"{paper}-in1k" in names
        cpu = load_sweep(paper)
        assert len(cpu.spec["grid"]["seed"]) >= 3 and cpu.runs[0].cfg.data.dataset == "digits"
        full = load_sweep(f"{paper}-in1k", "runs/x", ["dataset=/data/imagenet"])
        assert full.runs[0].cfg.model.arch == "vit_b16" and full.runs[0].cfg.optim.batch_size == 2048
    # the ImageNet variants need the data set's path before they emit anything runnable
    result = sweep("table7-noise-on-in1k", "--emit", "slurm", "--out", "/nonexistent/x")
    assert result.exit_code == 2 and "ImageNet is not bundled" in result.stderr
    assert "--set dataset=PATH" in result.stderr


@pytest.mark.parametrize("change, message", [
    ({"grid": {"sigmaa": [0.1]}}, "unknown config key 'sigmaa' (did you mean 'sigma'?)"),
    ({"grid": {}}, "the grid is empty"),
    ({"grid": {"sigma": []}}, "grid field 'sigma' takes a non-empty list of values"),
    ({"grid": {"sigma": 0.25}}, "grid field 'sigma' takes a non-empty list of values"),
    ({"grid": {"sigma": [0.25, -1]}}, "run sigma=-1: sigma must be >= 0, got -1"),
    ({"grid": {"sigma": [0.25, 0.25]}}, "grid field 'sigma' lists 0.25 twice"),
    ({"grid": {"pred_width": [48, 50]}}, "run pred_width=50: pred_width 50 must be a multiple of 4"),
    ({"grid": {"out": ["a", "b"]}}, "grid field 'out' cannot vary"),
    ({"probes": {"method": "knn"}}, "unknown section 'probes'"),
    ({"probe": {"metod": "knn"}}, "unknown probe option 'metod'"),
    ({"probe": {"fraction": 2}}, "probe: fraction must be in (0, 1], got 2"),
    ({"probe": {"method": "svm"}}, "probe: method must be one of logreg, linear, knn, all"),
])
def test_a_bad_spec_exits_2_with_one_line_before_anything_runs(tmp_path, folder, change, message):
    spec = {"base": tiny_base(folder), "grid": {"sigma": [0.0]}, "probe": {"method": "logreg"}, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = sweep(path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_spec_name_or_a_bad_set_exits_2(tmp_path):
    result = sweep("table5", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "unknown sweep 'table5': choose one of fig3-cov" in result.stderr
    result = sweep("sigma-grid", "--out", tmp_path / "out", "--set", "sigma=0.1", "--dry-run")
    assert result.exit_code == 2 and "sigma is a grid field" in result.stderr
    result = sweep("sigma-grid", "--out", tmp_path / "out", "--emit", "pbs")
    said = "emit must be one of slurm, commands, got 'pbs' (--emit)"
    assert result.exit_code == 2 and said in result.stderr
    assert not (tmp_path / "out").exists()


def _files(run_dir: Path) -> dict[str, bytes]:
    return {n: (run_dir / n).read_bytes() for n in ("latest.safetensors", "metrics.jsonl", "probe.json")}


def test_a_killed_sweep_resumes_and_a_finished_one_does_no_work(tmp_path, folder):
    spec = write_spec(tmp_path / "s.yaml", {"sigma": [0.25], "seed": [3]}, tiny_base(folder))
    out = tmp_path / "out"
    (run,) = load_sweep(str(spec), out).runs
    # the run was stopped after step 1 of 2, as a killed sweep leaves it
    killed = runner.invoke(app, [*commands(run)[0][1:], "--set", "steps=1"])
    assert killed.exit_code == 0, killed.output
    dry = sweep(spec, "--out", out, "--dry-run")
    assert listed(dry.stdout) == {"sigma=0.25,seed=3": "partial at step 1 of 2"}

    ran = sweep(spec, "--out", out)
    assert ran.exit_code == 0, ran.output
    assert "1 run, 0 done, 1 to run" in ran.stderr and f"{run.name}: resuming" in ran.stderr
    probe = json.loads((run.dir / "probe.json").read_text())
    assert probe["checkpoint_meta"]["step"] == 2
    assert [(r["method"], r["seed"]) for r in probe["results"]] == [("logreg", 3)]
    steps = [json.loads(line)["step"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # step 1 was not trained again
    assert listed(ran.stdout)[run.name] == "probed" and (out / "sweep.yaml").is_file()

    before = _files(run.dir)
    again = sweep(spec, "--out", out)
    assert again.exit_code == 0 and "1 run, 1 done, 0 to run" in again.stderr
    assert _files(run.dir) == before  # no step trained, nothing probed again

    (run.dir / "probe.json").unlink()  # trained, not probed: only the probe runs
    assert listed(sweep(spec, "--out", out, "--dry-run").stdout)[run.name] == "trained, not probed"
    probed = sweep(spec, "--out", out)
    assert probed.exit_code == 0 and f"{run.name}: probing" in probed.stderr
    assert f"{run.name}: pretraining" not in probed.stderr
    after = _files(run.dir)
    assert [after[n] == before[n] for n in ("latest.safetensors", "metrics.jsonl")] == [True, True]
    top1 = [json.loads(files["probe.json"])["results"][0]["top1"] for files in (before, after)]
    assert top1[0] == top1[1]  # the same encoder, probed again


def test_the_slurm_script_holds_one_correct_command_pair_per_task(tmp_path, folder):
    spec = write_spec(tmp_path / "s.yaml", {"sigma": [0.0, 0.25], "pred_pos": ["sincos", "learned"]},
                      tiny_base(folder), probe={"method": "knn", "layers": "last4"})
    out = tmp_path / "out"
    result = sweep(spec, "--out", out, "--emit", "slurm")
    assert result.exit_code == 0, result.output
    plan = load_sweep(str(spec), out)
    script = (out / "sweep.slurm").read_text()
    assert script.startswith("#!/bin/bash\n") and "#SBATCH --array=0-3\n" in script
    tasks = re.findall(r"^  (\d+)\)  # (\S+)\n    (.+)\n    (.+)\n    ;;$", script, flags=re.M)
    assert [(int(i), name) for i, name, _, _ in tasks] == list(enumerate(r.name for r in plan.runs))
    probe_cmd = get_command(app).commands["probe"]
    for (_, _, pre, probe), run in zip(tasks, plan.runs):
        pre, probe = shlex.split(pre), shlex.split(probe)
        assert pre[:2] == ["stoptool", "pretrain"] and pre[pre.index("--out") + 1] == str(run.dir)
        # the task's pretrain resolves to exactly the config the sweep validated for that run
        shown = runner.invoke(app, [*pre[1:], "--print-config"])
        assert shown.exit_code == 0 and shown.stdout == run.cfg.to_yaml()
        params = probe_cmd.make_context("probe", probe[2:]).params
        assert probe[:2] == ["stoptool", "probe"] and params["ckpt"] == str(run.dir)
        probe_out = str(run.dir / "probe.json")
        assert (params["method"], params["layers"], params["out"]) == ("knn", "last4", probe_out)
        assert params["seed"] == run.cfg.runtime.seed and params["dataset"] == str(folder)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.slurm", "sweep.yaml"]  # no run started

    emitted = sweep(spec, "--out", out, "--emit", "commands")
    lines = (out / "commands.txt").read_text().splitlines()
    assert emitted.exit_code == 0 and len(lines) == 4
    assert all(line.startswith("stoptool pretrain ") and " && stoptool probe " in line for line in lines)


def test_parallel_runs_are_subprocesses_that_split_the_cores(tmp_path, folder, monkeypatch):
    spec = write_spec(tmp_path / "s.yaml", {"sigma": [0.0, 0.25]}, tiny_base(folder))
    plan = load_sweep(str(spec), tmp_path / "out")
    calls = []

    def fake_run(argv, env, stdout, stderr):
        calls.append((argv, env["OMP_NUM_THREADS"]))
        failing = "sigma=0.25" in argv[argv.index("--out") + 1] and argv[3] == "pretrain"
        if failing:
            stdout.write("error: the data set has 2 images\n")
            stdout.flush()
        return subprocess.CompletedProcess(argv, 2 if failing else 0)

    monkeypatch.setattr(sweep_module.subprocess, "run", fake_run)
    monkeypatch.setattr(sweep_module.os, "cpu_count", lambda: 4)
    outcomes = run_sweep(plan, parallel=2)
    assert {threads for _, threads in calls} == {"2"}  # 4 cores, 2 runs at a time
    ok, bad = outcomes
    argvs = [[sys.executable, "-m", "stoptool", *c[1:]] for c in commands(ok.run)]
    assert [a for a, _ in calls if str(ok.run.dir) in a] == argvs  # pretrain, then probe
    assert [a[3] for a, _ in calls if str(bad.run.dir) in a] == ["pretrain"]  # no probe after a failure
    assert ok.error is None and bad.error == "pretrain exited with 2: error: the data set has 2 images"


def test_a_parallel_sweep_gives_each_run_a_directory_of_its_own_and_holds_its_own(tmp_path, folder):
    spec = write_spec(tmp_path / "s.yaml", {"sigma": [0.0, 0.25]}, tiny_base(folder))
    plan = load_sweep(str(spec), tmp_path / "out")
    outcomes = run_sweep(plan, parallel=2)
    assert [o.error for o in outcomes] == [None, None]
    assert [o.state.kind for o in outcomes] == ["probed", "probed"]
    dirs = [o.run.dir for o in outcomes]
    assert len(set(dirs)) == 2
    for d in dirs:  # each run's metrics are its own two steps, not interleaved with another's
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert lock_holder(d) is None
    assert lock_holder(plan.out) is None
    # a second sweep into a directory a live one holds is refused at once
    with RunLock(plan.out, "sweep"):
        with pytest.raises(UserError, match=f"is being written by pid {os.getpid()}"):
            run_sweep(plan)


def test_probe_metrics_name_the_raw_knn_apart(tmp_path):
    """A run's probe file with both k-NN rows: the default (whitened) is `knn`, DINO's raw
    cosine `knn_raw`; a k-NN row from before the choice existed was raw."""
    rows = [{"method": "knn", "layers": "last", "fraction": 1.0, "top1": 0.97, "top5": None,
             "params": {"features": "whitened"}},
            {"method": "knn", "layers": "last", "fraction": 1.0, "top1": 0.55, "top5": None,
             "params": {"features": "raw"}},
            {"method": "knn", "layers": "last4", "fraction": 1.0, "top1": 0.50, "top5": None, "params": {}},
            {"method": "logreg", "layers": "last", "fraction": 1.0, "top1": 0.95, "top5": None, "params": {}}]
    (tmp_path / sweep_module.PROBE_FILE).write_text(json.dumps({"results": rows}))
    assert sweep_module.probe_metrics(tmp_path) == pytest.approx(
        {"knn_top1": 97.0, "knn_raw_top1": 55.0, "knn_raw_last4_top1": 50.0, "logreg_top1": 95.0})
