"""Data-parallel pretraining: batch sharding, averaged gradients, and torchrun launches (DDP
and FSDP)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.data.datasets import open_dataset
from stoptool.data.loader import epoch_batches, pretrain_loader
from stoptool.data.transforms import PretrainTransform
from stoptool.errors import UserError
from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.distributed import Nets, World, check_fsdp_support, own_rng_states
from stoptool.train.logs import METRICS
from stoptool.train.runtime import autocast_factory
from stoptool.train.step import jepa_loss

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TINY = ["--arch", "vit_n2", "--img-size", "16", "--batch-size", "16", "--pred-width", "48"]
TINY += ["--pred-depth", "1", "--precision", "fp32", "--log-every", "2", "--workers", "0", "-q"]
TINY += ["--device", "cpu"]  # gloo processes, also on a machine with one GPU
TINY += ["--eval-max-images", "128"]  # the online k-NN on a sample of digits, sharded over the processes


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
    transform = PretrainTransform(cfg.model.img_size, cfg.data.crop_scale)
    sampler = MaskSampler(cfg.mask_config())
    ipe = len(data) // 16  # steps 0 .. ipe - 1 are epoch 0

    def first_batch(rank: int, world: int):  # of epoch 1
        return next(iter(pretrain_loader(data, transform, sampler, 16, 0, ipe, ipe + 1, rank=rank,
                                         world=world)))

    whole = first_batch(0, 1)
    halves = [first_batch(r, 2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert not torch.equal(halves[0][1][:4], halves[1][1][:4]) or not torch.equal(halves[0][2], halves[1][2])


def test_a_process_resumes_its_own_noise_stream_only_on_as_many_processes():
    state = {r: torch.full((4,), r, dtype=torch.uint8) for r in range(4)}
    written_by_2 = {"rng.cpu": state[0], "rng.cpu.rank1": state[1]}
    written_by_4 = {**written_by_2, "rng.cpu.rank2": state[2], "rng.cpu.rank3": state[3],
                    **{f"rng.cuda{f'.rank{r}' if r else ''}": state[r] for r in range(4)}}

    def own(saved, rank, size):
        got = own_rng_states(saved, World(rank=rank, size=size, local_rank=rank, local_size=size))
        return None if got is None else {k: int(v[0]) for k, v in got.items()}

    assert own(written_by_2, 1, 2) == {"cpu": 1}
    assert own(written_by_4, 3, 4) == {"cpu": 3, "cuda": 3}
    assert own(written_by_4, 0, 1) == {"cpu": 0, "cuda": 0}  # process 0 keeps its stream
    assert own(written_by_2, 0, 4) == {"cpu": 0}
    assert own(written_by_2, 1, 4) is None  # written by 2, resumed on 4: a fresh stream
    assert own(written_by_4, 1, 2) is None
    assert own({"rng.cpu": state[0]}, 1, 2) is None  # rank 0's only (one process wrote it)


def test_batch_not_divisible_by_the_processes_is_refused(tmp_path):
    runner = CliRunner(env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"})
    result = runner.invoke(app, ["pretrain", *TINY, "--steps", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "not divisible by the 3 processes" in result.output
    assert not (tmp_path / "run").exists()


def test_a_shard_group_that_does_not_divide_the_processes_is_refused(tmp_path):
    runner = CliRunner(env={"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"})
    args = ["pretrain", *TINY, "--fsdp", "--shard-group", "3", "--steps", "1", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "shard_group 3 does not divide the 4 processes of this launch" in result.stderr
    assert not (tmp_path / "run").exists()
    zero = ["pretrain", *TINY, "--fsdp", "--shard-group", "0", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, zero)
    assert result.exit_code == 2 and "shard_group must be >= 1, got 0 (--shard-group)" in result.stderr
    assert not (tmp_path / "b").exists()
    # a config that sets it for a sharded run may be reused without --fsdp: a note, not an error
    result = CliRunner().invoke(app, ["pretrain", *TINY, "--shard-group", "2", "--steps", "1",
                                      "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "shard_group 2 sets how fsdp shards; without fsdp it changes nothing" in result.output


def test_a_torch_without_fsdp2_gets_one_line():
    def old_distribute_tensor(tensor, device_mesh=None, placements=None):
        return tensor

    with pytest.raises(UserError, match=r"fsdp needs a newer torch than .* upgrade torch, or train"):
        check_fsdp_support(old_distribute_tensor)
    check_fsdp_support()  # the torch installed here has both


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    # The timeout only guards against a hang (a busy 2-core machine may be slow); on a hang the
    # whole process group goes, workers included, and the test fails with what they printed.
    launcher = [*TORCHRUN[:-1], str(nproc)]
    proc = subprocess.Popen([*launcher, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for 600 s:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@dataclass
class Job:
    """One job of a shared launch, as every process ran it: its exit codes and its output (all
    processes', as torchrun would show them)."""
    codes: list[int]
    stdout: str
    stderr: str


def _launch(spec: Path, jobs: list[dict], nproc: int) -> list[Job]:
    """`jobs` in one torchrun launch of `nproc` processes (tests/train/torchrun_jobs.py)."""
    spec.write_text(json.dumps(jobs))
    proc = _torchrun(str(HERE / "torchrun_jobs.py"), str(spec), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def each_rank(i: int, ext: str) -> list[str]:
        return [Path(f"{spec}.{i}.rank{r}.{ext}").read_text() for r in range(nproc)]

    return [Job([int(c) for c in each_rank(i, "code")], "".join(each_rank(i, "out")),
                "".join(each_rank(i, "err"))) for i in range(len(jobs))]


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory) -> dict:
    """Every torchrun job of this module in two launches, one of 2 processes and one of 4.

    The averaged gradients of each mode (tests/train/ddp_grads.py): DDP and FSDP on 2 processes,
    hybrid FSDP on 4.

    The same tiny run under torchrun: DDP and FSDP on 2 processes, DDP and hybrid FSDP (2 groups
    of 2, a 2-D mesh) on 4. DDP on 2 and hybrid FSDP on 4 run 4 steps, then resume to 6; the two
    others run their 6 steps at once: each resumed run has an uninterrupted one to be compared
    with (every process's noise stream included). Hybrid FSDP takes its batches in 2
    micro-batches, and so does a sixth run, DDP on 2 for 6 steps, to be compared with DDP on 2."""
    root = tmp_path_factory.mktemp("torchrun")
    grads = root / "grads"
    grads.mkdir()
    # the online k-NN (sharded over the processes) where a test reads it: DDP and FSDP on 2
    quiet = ["--eval-every", "0"]
    hsdp = ["--fsdp", "--shard-group", "2", "--accum-steps", "2", *quiet]
    plan = {2: [("ddp", [], ("4", "6")), ("fsdp", ["--fsdp"], ("6",)),
                ("ddp-accum", ["--accum-steps", "2", *quiet], ("6",))],
            4: [("ddp4", quiet, ("6",)), ("hsdp", hsdp, ("4", "6"))]}
    runs = {}
    for nproc, modes in plan.items():
        jobs, names = [{"grads": [str(grads), "ddp,fsdp" if nproc == 2 else "hsdp"]}], ["grads"]
        for mode, flags, stops in modes:
            run = root / mode
            runs[mode] = {"run": run}
            for steps in stops:
                argv = ["pretrain", *TINY, "--a-l1", "1e-4", *flags, "--out", str(run), "--steps", steps]
                at_4 = [str(run / "summary.json"), str(root / f"{mode}.summary_at_4.json")]
                copy = [at_4] if steps == "4" else []
                jobs.append({"argv": argv, "copy": copy})
                names.append(mode)
        for name, job in zip(names, _launch(root / f"jobs{nproc}.json", jobs, nproc)):
            assert job.codes == [0] * nproc, (name, job.stderr[-2000:])
            if name != "grads":
                runs[name].setdefault("first", job)
    for mode in ("ddp", "hsdp"):
        runs[mode]["summary_at_4"] = json.loads((root / f"{mode}.summary_at_4.json").read_text())
    return {"grads": grads, "runs": runs}


@pytest.fixture(scope="module")
def averaged(torchrun_runs) -> Path:
    return torchrun_runs["grads"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "hsdp"])
def test_processes_average_to_the_one_process_gradient(averaged, mode):
    """Each rank's part of a batch, gradients averaged by DDP (or reduce-scattered by FSDP and
    gathered back; with hybrid sharding, 2 groups of 2, reduce-scattered in a group and
    all-reduced between them) = the whole batch in one process (σ = 0, the same masks: the
    loss is a mean over equal parts)."""
    out = averaged / f"{mode}.safetensors"
    sys.path.insert(0, str(HERE))
    try:
        from ddp_grads import config, fixed_batch
    finally:
        sys.path.remove(str(HERE))
    cfg = config()
    torch.manual_seed(0)
    model = build_jepa(cfg.model).train()
    fp32 = autocast_factory(torch.device("cpu"), "fp32")
    jepa_loss(Nets.plain(model), fixed_batch(cfg, 8), fp32).backward()
    ddp = load_file(str(out))
    ref = {f"{part}.{name}": p.grad for part in ("encoder", "predictor")
           for name, p in getattr(model, part).named_parameters() if p.grad is not None}
    assert ddp.keys() == ref.keys() and len(ref) > 50
    for name, g in ref.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def launches(torchrun_runs):
    return torchrun_runs["runs"]


def test_torchrun_pretrain_writes_one_run_and_resumes(launches):
    run, first = launches["ddp"]["run"], launches["ddp"]["first"]
    summary = launches["ddp"]["summary_at_4"]
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True
    assert summary["step"] == 4
    assert first.stdout.count("run directory") == 1  # rank 0 alone reports
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["replicas_in_sync"] is True
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    # every 2 steps and the first; the online k-NN (sharded over the 2 processes) on the initial
    # weights and at the end of each launch
    assert [r["step"] for r in rows] == [0, 1, 2, 4, 6]
    assert [r["step"] for r in rows if "knn_top1" in r] == [0, 4, 6]
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["latest.safetensors"]


@pytest.mark.parametrize("mode, ddp_mode, world, group, exact",
                         [("fsdp", "ddp", 2, 2, True), ("hsdp", "ddp4", 4, 2, False)])
def test_fsdp_trains_the_same_weights_as_ddp_and_writes_whole_tensors(launches, mode, ddp_mode, world,
                                                                     group, exact):
    """Sharded weights, gradients and AdamW moments, gathered for the checkpoint (and scattered
    again on resume), end where the DDP run ends: weights, target encoder, optimizer state and
    every process's random state. On 2 processes FSDP's uninterrupted run and DDP's resumed one
    agree bit for bit; hybrid FSDP (resumed, in 2 micro-batches a step) and DDP on 4 sum the
    gradients in another order, so their floats agree to 1e-5 (the random states exactly)."""
    run, first = launches[mode]["run"], launches[mode]["first"]
    assert first.stdout.count("run directory") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["world_size"] == world and summary["sharded"] is True
    assert summary["shard_group"] == group
    fsdp = load_file(str(run / "latest.safetensors"))
    ddp = load_file(str(launches[ddp_mode]["run"] / "latest.safetensors"))
    assert fsdp.keys() == ddp.keys() and any(k.startswith("opt.") for k in fsdp)
    assert {f"rng.cpu.rank{r}" for r in range(1, world)} <= fsdp.keys()
    for name, t in ddp.items():
        assert fsdp[name].shape == t.shape, name  # whole tensors, not one rank's shard
        if exact or name.startswith("rng."):
            assert torch.equal(fsdp[name], t), name
        else:
            torch.testing.assert_close(fsdp[name], t, rtol=1e-5, atol=1e-7, msg=name)

    def rows(name: str) -> list[dict]:
        return [json.loads(r) for r in (launches[name]["run"] / METRICS).read_text().splitlines()]

    # a resumed run evaluates at the end of each launch, an uninterrupted one at its end alone:
    # the k-NN is compared where both ran it (FSDP and DDP on 2; the 4-process runs leave it off)
    for a, b in zip(rows(mode), rows(ddp_mode), strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "A_norm", "mask_token_norm", "knn_top1"):
            if key in a and key in b:  # (no loss in the rows of the initial weights' online k-NN)
                # a neighbour's vote may flip under 1e-6 changes of the features: one image in the eval set
                near = pytest.approx(b[key], rel=1e-5, abs=0.01 if key == "knn_top1" else 0)
                assert a[key] == (b[key] if exact else near), key
    if exact:
        assert "knn_top1" in rows(mode)[-1] and "knn_top1" in rows(ddp_mode)[-1]


@pytest.mark.parametrize("mode, whole_mode", [("ddp-accum", "ddp"), ("hsdp", "ddp4")])
def test_accumulated_micro_batches_under_torchrun_make_the_whole_batch_update(launches, mode, whole_mode):
    """Each process's share of the batch in 2 micro-batches: DDP averages the gradients on the
    last micro-batch only, hybrid FSDP reduce-scatters (and all-reduces) them then; either way
    the weights after 6 steps are those of whole batches."""
    whole = load_file(str(launches[whole_mode]["run"] / "latest.safetensors"))
    split = load_file(str(launches[mode]["run"] / "latest.safetensors"))
    assert whole.keys() == split.keys()
    for name, t in whole.items():
        if name.startswith(("encoder.", "target_encoder.", "predictor.")):
            err = ((split[name].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30)).item()
            assert err < 1e-5, (name, err)


def test_an_fsdp_checkpoint_resumes_in_one_process(launches, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(launches["fsdp"]["run"], run)
    result = CliRunner().invoke(app, ["pretrain", *TINY, "--a-l1", "1e-4", "--steps", "7", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["step"] == 7


def test_fsdp_refuses_compile_and_notes_a_single_process(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", *TINY, "--fsdp", "--compile", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "fsdp and compile do not go together: drop one of them (--fsdp)" in result.output
    assert not (tmp_path / "a").exists()
    single = ["pretrain", *TINY, "--fsdp", "--steps", "1", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, single)
    assert result.exit_code == 0, result.output
    assert "one process holds them all" in result.output
