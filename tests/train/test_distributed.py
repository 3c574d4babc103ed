"""Data-parallel pretraining: batch sharding, averaged gradients, and a torchrun launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.data.datasets import open_dataset
from stoptool.data.loader import epoch_batches, pretrain_loader
from stoptool.data.transforms import PretrainTransform
from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.runtime import autocast_factory
from stoptool.train.step import jepa_loss

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TINY = ["--arch", "vit_t2", "--img-size", "16", "--batch-size", "16", "--pred-width", "48"]
TINY += ["--pred-depth", "1", "--precision", "fp32", "--log-every", "2", "--workers", "0", "-q"]


def test_ranks_split_every_global_batch_without_overlap():
    whole = list(epoch_batches(100, 16, seed=0, epoch=3))
    ranks = [list(epoch_batches(100, 16, seed=0, epoch=3, rank=r, world=4)) for r in range(4)]
    assert all(len(r) == len(whole) == 6 for r in ranks)
    for b, keys in enumerate(whole):
        parts = [r[b] for r in ranks]
        assert all(len(p) == 4 for p in parts)
        assert sum(parts, []) == keys  # rank r holds the r-th quarter of the global batch


def test_each_rank_loads_its_slice_of_the_images_with_its_own_masks(tiny_cfg):
    """What `pretrain` feeds each process: the images of the one-process batch, split in two,
    each half with masks of its own."""
    cfg = tiny_cfg()
    data = open_dataset("digits", "train")
    transform = PretrainTransform(cfg.img_size, cfg.crop_scale)
    sampler = MaskSampler(cfg.mask_config())

    def first_batch(rank: int, world: int):
        return next(iter(pretrain_loader(data, transform, sampler, 16, 0, 1, rank=rank, world=world)))

    whole = first_batch(0, 1)
    halves = [first_batch(r, 2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert not torch.equal(halves[0][1][:4], halves[1][1][:4]) or not torch.equal(halves[0][2], halves[1][2])


def test_batch_not_divisible_by_the_processes_is_refused(tmp_path):
    runner = CliRunner(env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"})
    result = runner.invoke(app, ["pretrain", *TINY, "--steps", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "not divisible by the 3 processes" in result.output
    assert not (tmp_path / "run").exists()


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    # the timeout only guards against a hang: a busy 2-core machine may be slow
    return subprocess.run([*TORCHRUN, *args], env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_average_to_the_one_process_gradient(tmp_path):
    """Each rank's half of a batch, gradients averaged by DDP = the whole batch in one process
    (σ = 0, the same masks: the loss is a mean over equal halves)."""
    out = tmp_path / "grads.safetensors"
    proc = _torchrun(str(HERE / "ddp_grads.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    sys.path.insert(0, str(HERE))
    try:
        from ddp_grads import config, fixed_batch
    finally:
        sys.path.remove(str(HERE))
    cfg = config()
    torch.manual_seed(0)
    model = build_jepa(cfg).train()
    jepa_loss(model, fixed_batch(cfg, 8), autocast_factory(torch.device("cpu"), "fp32")).backward()
    ddp = load_file(str(out))
    ref = {f"{part}.{name}": p.grad for part in ("encoder", "predictor")
           for name, p in getattr(model, part).named_parameters() if p.grad is not None}
    assert ddp.keys() == ref.keys() and len(ref) > 50
    for name, g in ref.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_torchrun_pretrain_writes_one_run_and_resumes(tmp_path):
    run = tmp_path / "run"
    launch = ["-m", "stoptool", "pretrain", *TINY, "--out", str(run)]
    first = _torchrun(*launch, "--steps", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True
    assert summary["step"] == 4
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert first.stdout.count("run directory") == 1  # rank 0 alone reports
    second = _torchrun(*launch, "--steps", "6")
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["replicas_in_sync"] is True
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["latest.safetensors"]
