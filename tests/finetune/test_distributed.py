"""Fine-tuning under torchrun: two gloo processes, each taking half of every global batch, end
where one process ends with the same global batch (here in two micro-batches)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stoptool.cli import app

# Random crops stay on (each image's draws are its own, whichever process loads it); Mixup,
# stochastic depth and the head's BatchNorm (batch statistics) are per process, so they are off.
# (The loggers by --set: torchrun would take --log for an abbreviation of its own options.)
ARGS = ["finetune", "--random-init", "--arch", "vit_t8", "--img-size", "8", "--batch-size", "16",
        "--steps", "4", "--warmup", "0", "--lr", "1e-3", "--drop-path", "0", "--head-norm", "none",
        "--hflip", "0.5", "--precision", "fp32", "--device", "cpu", "--workers", "0", "--set", "log=jsonl",
        "--log-every", "1", "--eval-every", "0", "-q"]


def test_two_processes_train_the_weights_of_one(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "stoptool", *ARGS, "--out", str(ddp)]
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for 600 s:\n{err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    assert out.count("run directory") == 1  # process 0 alone reports
    result = CliRunner().invoke(app, [*ARGS, "--accum-steps", "2", "--out", str(single)])
    assert result.exit_code == 0, result.output
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True and summary["step"] == 4
    got, want = load_file(ddp / "latest.safetensors"), load_file(single / "latest.safetensors")
    weights = [k for k in want if k.startswith(("encoder.", "head."))]
    assert len(weights) > 100 and set(weights) <= got.keys()
    for k in weights:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    assert got["head.weight"].abs().max() > 1e-3  # the head trained (it starts within 1e-4 of zero)
    losses = [[json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (ddp, single)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
