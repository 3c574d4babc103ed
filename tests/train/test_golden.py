"""The engine against runs recorded before it was restructured (benchmarks/golden_run.py).

On a machine with an entry in the fixture (same torch, same CPU kernels) every tensor and
every per-step loss must be the same bit for bit; elsewhere fp32 kernels may sum in another
order, so losses and tensor sums are compared within a tolerance that a changed step would
still exceed by orders of magnitude.
"""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.config import build_config
from stoptool.models import archs

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("golden_run", ROOT / "benchmarks" / "golden_run.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)
RECORDED = json.loads(golden.FIXTURE.read_text())
LEGACY = golden.FIXTURE.parent / "legacy-run"


def _compare(got: dict, want: dict) -> None:
    if golden.fingerprint() in RECORDED:
        assert got["losses"] == want["losses"]
        changed = [k for k in want["sha256"] if got["sha256"].get(k) != want["sha256"][k]]
        assert not changed and got["sha256"].keys() == want["sha256"].keys(), changed[:5]
        return
    losses = [float.fromhex(x) for x in got["losses"]]
    assert losses == pytest.approx([float.fromhex(x) for x in want["losses"]], rel=1e-4)
    assert got["sums"].keys() == want["sums"].keys()
    for k, v in want["sums"].items():
        assert math.isclose(got["sums"][k], v, rel_tol=1e-3, abs_tol=1e-3), k


def _want(name: str) -> dict:
    return RECORDED.get(golden.fingerprint(), next(iter(RECORDED.values())))[name]


@pytest.mark.parametrize("name", list(golden.RUNS))
def test_fixed_runs_match_the_recorded_engine(name, tmp_path):
    _compare(golden.run(name, tmp_path / name), _want(name))


def test_a_run_directory_written_before_the_restructuring_resumes_and_reads(tmp_path, monkeypatch):
    monkeypatch.setitem(archs.ARCHS, "t", golden.SHRUNK)
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    # its config.yaml loads as a config file
    assert build_config(str(run / "config.yaml")).to_dict()["steps"] == 3
    # resumed to the end, it is the uninterrupted run recorded before the restructuring
    _compare(golden.run("stop", run), _want("legacy-full"))
    rows = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(LEGACY / "latest.safetensors"), "--json"])
    assert info.exit_code == 0, info.output
    meta = json.loads(info.stdout)
    assert meta["step"] == 3 and meta["config"]["arch"] == "vit_t2"
    out = tmp_path / "enc.safetensors"
    exported = runner.invoke(app, ["export", str(LEGACY), str(out)])
    assert exported.exit_code == 0 and out.exists(), exported.output
    probed = runner.invoke(app, ["probe", str(LEGACY), "--method", "knn", "--no-cache", "-q",
                                 "--out", str(tmp_path / "p.json")])
    assert probed.exit_code == 0, probed.output
    assert 0.1 < json.loads((tmp_path / "p.json").read_text())["results"][0]["top1"] <= 1


def test_a_run_from_before_the_bilinear_crops_resumes_only_when_told_they_were_bicubic(tmp_path, monkeypatch):
    from stoptool.errors import UserError

    monkeypatch.setitem(archs.ARCHS, "t", golden.SHRUNK)
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    with pytest.raises(UserError, match="holds a run with interpolation='bicubic', not 'bilinear'"):
        golden.run("stop", run, interpolation="bilinear")
    assert (run / "latest.safetensors").read_bytes() == (LEGACY / "latest.safetensors").read_bytes()
