"""A fine-tuning run killed mid-epoch resumes to the uninterrupted run, bit for bit (CPU, fp32),
with every random draw of MAE's recipe on: RandAugment, erasing, Mixup/CutMix, stochastic depth."""

import json
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stoptool.cli import app

STEPS = 8
# vit_t8 on the 8-px digits: one patch an image, so the steps are quick; MAE's ViT-B values
ARGS = ["finetune", "--random-init", "--arch", "vit_t8", "--img-size", "8", "--config", "finetune-in1k",
        "--dataset", "digits", "--batch-size", "16", "--warmup", "0.1", "--precision", "fp32",
        "--device", "cpu", "--workers", "0", "--log", "jsonl", "--log-every", "1", "--checkpoint-every", "1",
        "--eval-every", "0", "--steps", str(STEPS), "-q"]


def _last_logged(run) -> int:
    metrics, last = run / "metrics.jsonl", 0
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            last = max(last, json.loads(line).get("step", 0))
        except json.JSONDecodeError:  # a line being written
            pass
    return last


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    run, reference = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.Popen([sys.executable, "-m", "stoptool", *ARGS, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and _last_logged(run) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]  # killed, not finished
    killed_at = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 3 <= killed_at < STEPS  # within the first epoch (84 steps)
    resumed = CliRunner().invoke(app, [*ARGS, "--out", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run} from step" in resumed.output
    whole = CliRunner().invoke(app, [*ARGS, "--out", str(reference)])
    assert whole.exit_code == 0, whole.output
    got, want = load_file(run / "latest.safetensors"), load_file(reference / "latest.safetensors")
    assert got.keys() == want.keys() and any(k.startswith("opt.") for k in got) and "head.weight" in got
    changed = [k for k in want if not torch.equal(got[k], want[k])]
    assert not changed, changed[:5]

    def rows(path):
        return [json.loads(r) for r in (path / "metrics.jsonl").read_text().splitlines() if "loss" in r]

    assert [r["step"] for r in rows(run)] == [r["step"] for r in rows(reference)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in rows(reference)]
    assert json.loads((run / "finetune.json").read_text())["top1"] == json.loads(
        (reference / "finetune.json").read_text())["top1"]
