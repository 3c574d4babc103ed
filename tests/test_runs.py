"""Run directories: the lock that keeps one writer per run, the one line a failed write ends
with, run states as sweep and report read them, and KEY=VALUE parsing."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.errors import UserError
from stoptool.io import checkpoint as checkpoint_module
from stoptool.io.checkpoint import LATEST, Checkpoint, read_meta, save_checkpoint
from stoptool.report import read_runs
from stoptool.runs import (
    LOCK,
    RunLock,
    lock_holder,
    parse_assignment,
    run_state,
    schedule_steps,
)

runner = CliRunner(env={"COLUMNS": "400"})
TINY = ["--arch", "vit_n2", "--img-size", "16", "--pred-width", "48", "--pred-depth", "1",
        "--batch-size", "8", "--precision", "fp32", "--eval-every", "0", "--log", "jsonl", "--device", "cpu",
        "-q"]
HOLD = ("import sys, time; from stoptool.runs import RunLock; RunLock(sys.argv[1], 'pretrain').acquire(); "
        "print('held', flush=True); time.sleep(120)")


def holder_process(run_dir):
    """Another process that takes `run_dir` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_live_holder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    proc = holder_process(run)
    try:
        refused = runner.invoke(app, ["pretrain", *TINY, "--steps", "2", "--out", str(run)])
        assert refused.exit_code == 2
        line = refused.stderr.strip()
        assert "\n" not in line and "is being written by" in line
        assert f"pid {proc.pid} on {socket.gethostname()}, stoptool pretrain, since " in line
        assert sorted(p.name for p in run.iterdir()) == [LOCK]  # the refused launch wrote nothing
        assert lock_holder(run).pid == proc.pid and run_state(run).kind == "training"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died without releasing: the next launch takes the lock over, says so, and trains
    taken = runner.invoke(app, ["pretrain", *TINY, "--steps", "2", "--out", str(run)])
    assert taken.exit_code == 0, taken.output
    assert f"took over the lock of '{run}' from pid {proc.pid}" in taken.stderr
    assert "which is no longer running" in taken.stderr
    assert read_meta(run / LATEST)["step"] == 2
    assert lock_holder(run) is None and (run / LOCK).read_text() == ""  # released at the end


def test_a_lock_is_released_when_its_command_fails_and_a_new_directory_it_made_goes(tmp_path):
    lock = RunLock(tmp_path / "fresh", "pretrain")
    with pytest.raises(RuntimeError):
        with lock:
            assert lock_holder(tmp_path / "fresh").pid == os.getpid()
            raise RuntimeError("the command failed")
    assert not (tmp_path / "fresh").exists()
    with RunLock(tmp_path / "fresh", "pretrain"):  # free again
        (tmp_path / "fresh" / "kept.txt").write_text("x")
    assert (tmp_path / "fresh" / "kept.txt").is_file()  # a directory something was written to stays


def test_without_locks_in_the_filesystem_a_record_of_a_dead_process_on_this_host_is_taken_over(
        tmp_path, monkeypatch):
    from stoptool import runs

    def no_locks(fd, kind):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runs.fcntl, "flock", no_locks)
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (run / LOCK).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "since": "then",
                                        "command": "stoptool pretrain"}))
    note = RunLock(run, "pretrain").acquire()
    assert note.startswith(f"took over the lock of '{run}' from pid {dead}")
    (run / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then", "command": "x"}))
    with pytest.raises(UserError, match="is being written by pid 1 on elsewhere"):
        RunLock(run, "pretrain").acquire()


def failing_save(monkeypatch, fail_on: int):
    """safetensors' save_file failing with ENOSPC on its `fail_on`-th call (1-based)."""
    real, calls = checkpoint_module.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == fail_on:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    return calls


@pytest.mark.parametrize("fail_on, kept", [(2, 2), (3, 4)], ids=["background", "foreground"])
def test_a_full_disk_ends_the_run_with_one_line_naming_the_file_the_checkpoint_kept_and_the_resume(
        tmp_path, monkeypatch, fail_on, kept):
    # digits at batch 8: 168 steps an epoch; `latest` every 2 steps in the background (steps 2
    # and 4), and in the foreground at the end of the run (step 6)
    run = tmp_path / "run"
    failing_save(monkeypatch, fail_on)
    args = ["pretrain", *TINY, "--steps", "6", "--checkpoint-every", "2", "--out", str(run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.output
    assert message.startswith(f"error: cannot write '{run / LATEST}': no space left on device (needed ")
    assert " free)" in message
    assert f"the last good checkpoint is '{run / LATEST}', at step {kept}" in message
    assert f"resume with: stoptool pretrain --config {run / 'config.yaml'}" in message
    assert read_meta(run / LATEST)["step"] == kept  # kept whole
    assert not list(run.glob(".*.tmp"))  # no temporary file left
    assert not (run / "summary.json").exists()  # the run did not end: no summary says it did
    monkeypatch.undo()
    resumed = runner.invoke(app, ["pretrain", "--config", str(run / "config.yaml")])
    assert resumed.exit_code == 0, resumed.output
    assert read_meta(run / LATEST)["step"] == 6


def test_a_metrics_row_that_cannot_be_written_is_one_line_too(tmp_path, monkeypatch):
    from stoptool.train import logs

    def full(self, row):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logs.JsonlLog, "write", full)
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", *TINY, "--steps", "2", "--out", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: cannot write '{run / 'metrics.jsonl'}': no space left on device")
    assert "no checkpoint had been written yet" in result.stderr


def plant_run(run_dir, step: int | None, epochs: int = 4, probe_step: int | None = None,
              stopped: bool = False):
    """A run directory as pretrain and a probe leave it: `latest` at `step` (one step an
    epoch), config.yaml, a summary when the run ended, probe.json when probed."""
    run_dir.mkdir(parents=True)
    config = {"epochs": epochs, "steps": None, "sigma": 0.25, "seed": 0}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if step is not None:
        meta = {"kind": "pretrain", "arch": "vit_n2", "img_size": 16, "step": step, "iterations_per_epoch": 1,
                "config": config}
        save_checkpoint(run_dir / LATEST, Checkpoint(meta, {"w": torch.zeros(1)}))
    if stopped or (step is not None and step >= epochs):
        summary = {"step": step, **({"stopped": "loss is nan"} if stopped else {})}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if probe_step is not None:
        row = {"method": "logreg", "layers": "last", "fraction": 1.0, "seed": 0, "top1": 0.5, "top5": None}
        (run_dir / "probe.json").write_text(json.dumps({"checkpoint_meta": {"step": probe_step},
                                                        "results": [row]}))


def test_sweep_and_report_read_every_run_state_alike(tmp_path):
    root = tmp_path / "sweep"
    plants = {
        "not-started": dict(step=None),
        "partial": dict(step=2),
        "failed": dict(step=3, stopped=True),
        "trained": dict(step=4),
        "probed": dict(step=4, probe_step=4),
        "probed-earlier": dict(step=4, probe_step=2),  # the probe is of an older checkpoint
    }
    for name, kw in plants.items():
        plant_run(root / name, **kw)
    expected = {"not-started": "not started", "partial": "partial at step 2 of 4",
                "failed": "failed at step 3: loss is nan", "trained": "trained, not probed",
                "probed": "probed", "probed-earlier": "trained, not probed"}
    assert {name: str(run_state(root / name)) for name in plants} == expected
    _, done, excluded = read_runs(root)
    assert [r.name for r in done] == ["probed"]
    assert dict(excluded) == {k: v for k, v in expected.items() if k != "probed"}
    # a sweep asking for more epochs than a run trained finds it partial, as pretrain would resume it
    assert str(run_state(root / "probed", epochs=6, steps=None)) == "partial at step 4 of 6"
    assert str(run_state(root / "probed", epochs=6, steps=4)) == "probed"


def test_schedule_steps_and_key_value_items():
    assert schedule_steps(5, 10) == 50 and schedule_steps(5, 10, 7) == 7 and schedule_steps(5, 10, 80) == 50
    assert parse_assignment("ema=[0.99, 1.0]") == ("ema", [0.99, 1.0])
    assert parse_assignment("steps=") == ("steps", None)
    with pytest.raises(UserError, match="--set takes KEY=VALUE, got 'lr'"):
        parse_assignment("lr")
    with pytest.raises(UserError, match=r"--baseline sigma: '\[0' is not a YAML value"):
        parse_assignment("sigma=[0", "--baseline", "FIELD=VALUE")
