"""The messages a first run needs: a data set path that is not there, a resumed run, --steps
past the schedule, --version (and the same facts in summary.json), unreadable images named
as they are met and listed in skipped.txt."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stoptool import __version__
from stoptool.cli import app
from stoptool.train.runtime import cpu_has_fast_bf16

runner = CliRunner(env={"COLUMNS": "400"})
TINY = ["--arch", "vit_n2", "--img-size", "16", "--pred-width", "48", "--pred-depth", "1",
        "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--workers", "0", "-q",
        "--eval-every", "0"]  # the online k-NN has tests of its own (tests/train/test_watch.py)


@pytest.mark.parametrize("command", [["pretrain", *TINY], ["probe", "--random-init", "--arch", "vit_n2"]])
def test_a_dataset_path_that_does_not_exist_is_named_as_a_path(tmp_path, command):
    missing = str(tmp_path / "data" / "imagenet")
    result = runner.invoke(app, [*command, "--dataset", missing, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr == f"error: dataset path does not exist: {missing} (--dataset)\n"
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_name_that_is_not_known_gets_the_list_of_names(tmp_path):
    result = runner.invoke(app, ["pretrain", *TINY, "--dataset", "imagenett", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr == ("error: unknown dataset 'imagenett': use digits, count, cifar10, cifar100 or a "
                             "path to an ImageFolder directory or to a set stoptool prepare wrote "
                             "(--dataset)\n")


def test_a_resumed_run_says_where_it_resumes_even_when_quiet(tmp_path):
    out = tmp_path / "run"
    first = runner.invoke(app, ["pretrain", *TINY, "--steps", "2", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "resuming" not in first.stderr  # a fresh run says nothing of the kind
    again = runner.invoke(app, ["pretrain", *TINY, "--steps", "3", "--out", str(out)])
    assert again.exit_code == 0, again.output
    # digits' 1,347 training images in batches of 8: 168 steps an epoch, 2 epochs
    assert again.stderr.splitlines()[0] == f"note: resuming {out} from step 2 of 3 (epoch 0)"
    assert json.loads((out / "summary.json").read_text())["step"] == 3


def test_steps_past_the_schedule_are_named_with_the_schedule_length(image_folder, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--dataset", str(image_folder), "--epochs", "1", "--steps", "100000",
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # 24 readable images in batches of 8: 3 steps
    assert "note: --steps 100000 exceeds the schedule's 3 steps; stopping at 3\n" in result.stderr
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    within = runner.invoke(app, [*args[:-4], "--steps", "3", "--out", str(tmp_path / "other")])
    assert within.exit_code == 0 and "exceeds" not in within.stderr


def _expected_environment() -> dict:
    import timm

    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return {"auto_device": f"cuda ({torch.cuda.get_device_name()})", "fast_bf16": major >= 8,
                "timm": timm.__version__}
    return {"auto_device": "cpu", "fast_bf16": cpu_has_fast_bf16(), "timm": timm.__version__}


def test_version_prints_versions_device_and_bf16_and_each_summary_records_them(tmp_path):
    env = _expected_environment()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:4] == [f"stoptool {__version__}", f"torch {torch.__version__}", f"timm {env['timm']}",
                         f"device (--device auto): {env['auto_device']}"]
    assert lines[4].startswith(f"fast bf16: {'yes' if env['fast_bf16'] else 'no'} (") and len(lines) == 5
    out = tmp_path / "run"
    assert runner.invoke(app, ["pretrain", *TINY, "--steps", "1", "--out", str(out)]).exit_code == 0
    recorded = json.loads((out / "summary.json").read_text())["environment"]
    assert recorded["stoptool"] == __version__ and recorded["torch"] == torch.__version__
    assert {k: recorded[k] for k in env} == env
    assert lines[4] == f"fast bf16: {'yes' if env['fast_bf16'] else 'no'} ({recorded['fast_bf16_why']})"


def _folder_with_broken_files(root, good: int, broken: int):
    """Two classes of `good` readable PNGs in all, and `broken` unreadable .jpg files in the
    first class: the first a truncated JPEG, the others not images at all."""
    rng = np.random.default_rng(0)
    for i in range(good):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    whole = root / "whole.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, quality=95)
    bad = [root / "a" / "broken00.jpg"]
    bad[0].write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    whole.unlink()
    for i in range(1, broken):
        bad.append(root / "a" / f"broken{i:02d}.jpg")
        bad[-1].write_bytes(b"not a jpeg")
    return bad


def test_unreadable_images_are_named_when_met_and_all_listed_in_skipped_txt(tmp_path):
    data = tmp_path / "data"
    bad = _folder_with_broken_files(data, good=22, broken=2)  # 24 files: one epoch of 3 batches meets each
    out = tmp_path / "run"
    # two loader workers: the names must come back from the worker processes
    result = runner.invoke(app, ["pretrain", *TINY, "--dataset", str(data), "--epochs", "1", "--workers", "2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "unreadable image skipped" in line]
    prefix = "note: unreadable image skipped: "
    by_file = {b: line for line in notes for b in bad if line.startswith(f"{prefix}{b} (")}
    assert len(notes) == 2 and set(by_file) == set(bad)  # each file named once, with the decoder's reason
    assert by_file[bad[0]].startswith(f"note: unreadable image skipped: {bad[0]} (image file is truncated")
    assert by_file[bad[1]] == f"note: unreadable image skipped: {bad[1]} (cannot identify image file)"
    listed = (out / "skipped.txt").read_text().splitlines()
    assert sorted(listed) == sorted(map(str, bad))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] >= 2
    assert (f"skipped images │ {summary['skipped_images']} (unreadable), listed in {out / 'skipped.txt'}"
            in result.stdout)


def test_past_ten_unreadable_images_one_line_says_the_rest_are_in_skipped_txt(tmp_path):
    data = tmp_path / "data"
    bad = _folder_with_broken_files(data, good=12, broken=12)
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--dataset", str(data), "--epochs", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    named = [line for line in result.stderr.splitlines() if "unreadable image skipped" in line]
    assert len(named) == 10
    rest = ("note: further unreadable images are skipped without a note here; "
            f"{out / 'skipped.txt'} lists every one")
    assert result.stderr.splitlines().count(rest) == 1
    assert sorted((out / "skipped.txt").read_text().splitlines()) == sorted(map(str, bad))


def test_a_fresh_run_without_unreadable_images_leaves_no_skipped_txt(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "skipped.txt").write_text("/left/over/by/an/earlier/run.jpg\n")
    result = runner.invoke(app, ["pretrain", *TINY, "--steps", "1", "--no-resume", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not (out / "skipped.txt").exists()


def test_a_resume_with_another_arch_names_the_arch_before_what_the_new_arch_implies(tmp_path, tiny_cfg):
    """vit_t4 at 16 px has a 4×4 grid, too small for the masks: the run's own arch is the first
    thing wrong, and the line says so (as it does for an arch whose sizes fit)."""
    from stoptool.io.checkpoint import LATEST, Checkpoint, save_checkpoint

    run = tmp_path / "run"
    cfg = tiny_cfg(out=str(run))
    meta = {"kind": "pretrain", "arch": "vit_n2", "img_size": 16, "step": 3, "iterations_per_epoch": 168,
            "config": cfg.to_dict()}
    save_checkpoint(run / LATEST, Checkpoint(meta, {"w": torch.zeros(1)}))
    for arch in ("vit_t4", "vit_s2"):
        result = runner.invoke(app, ["pretrain", *TINY, "--arch", arch, "--out", str(run)])
        assert result.exit_code == 2
        assert result.stderr == (f"error: '{run / LATEST}' holds a run with arch='vit_n2', not '{arch}': "
                                 "pass --no-resume to start over there, or --out for a new run directory\n")
    fresh = runner.invoke(app, ["pretrain", *TINY, "--arch", "vit_t4", "--out", str(run), "--no-resume"])
    assert fresh.exit_code == 2 and "patch" in fresh.stderr  # without the run, the sizes are what is wrong


@pytest.mark.parametrize("args, flag", [
    (["probe", "--random-init", "--arch", "vit_t4", "--img-size", "30"], "(--img-size)"),
    (["pretrain", *TINY, "--batch-size", "4096"], "(--batch-size)"),
])
def test_messages_name_the_flag_the_user_typed(tmp_path, args, flag):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.rstrip().endswith(flag), result.stderr
    assert result.stderr.count("\n") == 1
