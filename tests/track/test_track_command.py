"""`stoptool track` end to end on a DAVIS-layout fixture of synthetic videos: masks written in
DAVIS's layout, the official result files, tracking that beats copying the first mask, scores
averaged over objects, and one-line errors that leave nothing written."""

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, tensors_digest

_spec = importlib.util.spec_from_file_location("davis_fixture", Path(__file__).with_name("davis_fixture.py"))
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)

runner = CliRunner(env={"COLUMNS": "200"})
PALETTE_START = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    return fixture.make_davis(tmp_path_factory.mktemp("davis") / "DAVIS")


@pytest.fixture(scope="module")
def colour_ckpt(tmp_path_factory):
    return fixture.colour_encoder_checkpoint(tmp_path_factory.mktemp("run") / "colour.safetensors")


@pytest.fixture(scope="module")
def tracked(davis, colour_ckpt, tmp_path_factory):
    """`stoptool track` with the colour encoder on the whole fixture (short side 64 px)."""
    out = tmp_path_factory.mktemp("tracked") / "out"
    result = track(str(colour_ckpt), "--davis", str(davis), "--out", str(out), "--short-side", "64")
    assert result.exit_code == 0, result.output
    return out, result


def track(*args):
    return runner.invoke(app, ["track", *args, "--precision", "fp32", "-q"])


def copy_first_mask(davis: Path, out: Path) -> Path:
    """The baseline: each sequence's first annotation, copied to every frame."""
    for seq in sorted((davis / "Annotations" / "480p").iterdir()):
        masks = sorted(seq.glob("*.png"))
        (out / seq.name).mkdir(parents=True)
        for m in masks:
            shutil.copy(masks[0], out / seq.name / m.name)
    return out


def global_results(folder: Path) -> dict[str, float]:
    with open(folder / "global_results-val.csv") as f:
        return {k: float(v) for k, v in next(csv.DictReader(f)).items()}


def test_track_writes_masks_in_davis_layout_and_the_official_result_files(tracked, davis):
    out, result = tracked
    for name, objects in fixture.VIDEOS.items():
        written = sorted(p.name for p in (out / name).glob("*.png"))
        assert written == [f"{t:05d}.png" for t in range(8)]
        img = Image.open(out / name / "00003.png")
        assert img.mode == "P" and img.size == (fixture.WIDTH, fixture.HEIGHT)
        assert img.getpalette()[:12] == PALETTE_START  # DAVIS's colours
        assert set(np.unique(np.array(img))) <= set(range(len(objects) + 1))
        # the first frame's mask is the given one
        given = np.array(Image.open(davis / "Annotations" / "480p" / name / "00000.png"))
        assert np.array_equal(np.array(Image.open(out / name / "00000.png")), given)
    with open(out / "global_results-val.csv") as f:
        assert f.readline().strip() == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    with open(out / "per-sequence_results-val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["Sequence"] for r in rows] == ["one-square_1", "three-shapes_1", "three-shapes_2",
                                             "three-shapes_3", "two-boxes_1", "two-boxes_2"]
    doc = json.loads((out / "results-val.json").read_text())
    assert all(0 <= v <= 1 for k, v in doc["global"].items() if not k.endswith("Decay"))
    assert doc["arch"] == "vit_t8" and doc["which"] == "target" and doc["frames"] == 24
    assert doc["scored_frames"] == 18 and doc["input_sizes"] == {"128×64": 3}
    assert doc["protocol"]["topk"] == 5 and doc["protocol"]["n_last_frames"] == 7
    assert "J&F-Mean" in result.stdout and "one-square_1" in result.stdout


def test_tracking_features_beat_copying_the_first_mask(tracked, davis, tmp_path):
    out, _ = tracked
    baseline = copy_first_mask(davis, tmp_path / "copy")
    result = track("--score-only", str(baseline), "--davis", str(davis))
    assert result.exit_code == 0, result.output
    tracking, copying = global_results(out), global_results(baseline)
    # measured: tracking 0.738, copying 0.206
    assert tracking["J&F-Mean"] > copying["J&F-Mean"] + 0.3
    assert tracking["J-Mean"] > copying["J-Mean"] + 0.3 and tracking["F-Mean"] > copying["F-Mean"] + 0.3
    # the CSVs agree with the JSON written beside them
    doc = json.loads((baseline / "results-val.json").read_text())
    assert round(doc["global"]["J&F-Mean"], 3) == copying["J&F-Mean"]


def test_scores_average_over_objects_not_sequences(davis, tmp_path):
    # one-square (1 object) predicted exactly; three-shapes (3 objects) with only object 1
    # right and objects 2 and 3 missing: J per object 1, 1, 0, 0 -> J-Mean 0.5 (per sequence
    # it would be (1 + 1/3) / 2 = 0.667)
    pred = tmp_path / "pred"
    for name in ("one-square", "three-shapes"):
        (pred / name).mkdir(parents=True)
        for m in sorted((davis / "Annotations" / "480p" / name).glob("*.png")):
            ids = np.array(Image.open(m))
            fixture.write_mask(pred / name / m.name, np.where(ids == 1, 1, 0).astype(np.uint8))
    result = track("--score-only", str(pred), "--davis", str(davis), "--sequence", "one-square",
                   "--sequence", "three-shapes")
    assert result.exit_code == 0, result.output
    scores = global_results(pred)
    assert scores["J-Mean"] == 0.5 and scores["F-Mean"] == 0.5 and scores["J&F-Mean"] == 0.5


def broken_copy(davis: Path, tmp_path: Path) -> Path:
    root = tmp_path / "DAVIS"
    shutil.copytree(davis, root)
    return root


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_a_missing_first_annotation_is_one_line(davis, colour_ckpt, tmp_path):
    root = broken_copy(davis, tmp_path)
    (root / "Annotations" / "480p" / "two-boxes" / "00000.png").unlink()
    result = track(str(colour_ckpt), "--davis", str(root), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "two-boxes", "first frame's annotation", "00000.png")
    assert not (tmp_path / "out").exists()


def test_a_frame_count_mismatch_is_one_line(davis, colour_ckpt, tmp_path):
    root = broken_copy(davis, tmp_path)
    (root / "Annotations" / "480p" / "one-square" / "00005.png").unlink()
    result = track(str(colour_ckpt), "--davis", str(root), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "one-square", "8 frames", "7 annotations")
    assert not (tmp_path / "out").exists()


def test_a_predicted_object_id_above_the_first_frames_is_one_line(davis, tmp_path):
    pred = copy_first_mask(davis, tmp_path / "pred")
    ids = np.array(Image.open(pred / "one-square" / "00004.png"))
    ids[0, 0] = 2  # one-square has one object
    fixture.write_mask(pred / "one-square" / "00004.png", ids)
    result = track("--score-only", str(pred), "--davis", str(davis))
    assert_one_line_error(result, "00004.png", "object id 2", "1 object")
    assert not list(pred.glob("*.csv")) and not list(pred.glob("*.json"))


def test_missing_predictions_are_one_line(davis, tmp_path):
    pred = copy_first_mask(davis, tmp_path / "pred")
    (pred / "two-boxes" / "00003.png").unlink()
    result = track("--score-only", str(pred), "--davis", str(davis))
    assert_one_line_error(result, "two-boxes", "00003.png", "missing")


def test_a_missing_davis_folder_says_where_to_get_it(colour_ckpt, tmp_path):
    result = track(str(colour_ckpt), "--davis", str(tmp_path / "nowhere"))
    assert_one_line_error(result, "does not exist", "DAVIS-2017-trainval-480p.zip", "(--davis)")


def test_a_pretrain_checkpoint_tracks_test_dev_style_sequences_unscored(davis, colour_ckpt, tmp_path):
    # A pretrain checkpoint's context encoder on request, from its run directory, on a
    # sequence whose ground truth is the first frame's alone (as in test-dev). Its two encoders
    # differ (the colour encoder and a copy with another colour map): the JSON's digest tells
    # which one ran.
    root = broken_copy(davis, tmp_path)
    for m in sorted((root / "Annotations" / "480p" / "one-square").glob("*.png"))[1:]:
        m.unlink()
    target = load_checkpoint(colour_ckpt).part("target_encoder")
    context = {**target, "patch_embed.proj.weight": target["patch_embed.proj.weight"].flip(0)}
    tensors = {**{f"target_encoder.{k}": v for k, v in target.items()},
               **{f"encoder.{k}": v.clone() for k, v in context.items()}}  # (no shared memory)
    ckpt = tmp_path / "run" / "latest.safetensors"
    save_checkpoint(ckpt, Checkpoint({"kind": "pretrain", "arch": "vit_t8", "img_size": 64, "step": 10,
                                      "epoch": 1}, tensors))
    result = track(str(ckpt.parent), "--davis", str(root), "--sequence", "one-square", "--short-side", "64",
                   "--which", "context")
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "latest.davis-val-context"  # the default, beside the checkpoint
    assert len(list((out / "one-square").glob("*.png"))) == 8
    assert "not scored" in result.output and not list(out.glob("*.csv"))
    doc = json.loads((out / "results-val.json").read_text())
    assert doc["which"] == "context" and doc["global"] is None and doc["frames"] == 8
    assert doc["encoder_sha256"] == tensors_digest(context) != tensors_digest(target)


def test_an_encoder_only_file_has_no_context_encoder(davis, colour_ckpt):
    result = track(str(colour_ckpt), "--davis", str(davis), "--which", "context")
    assert_one_line_error(result, "holds only the target encoder", "(--which)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_in_bf16_the_scores_stay_those_of_the_cpu(tracked, davis, colour_ckpt, tmp_path):
    out = tmp_path / "gpu"
    result = runner.invoke(app, ["track", str(colour_ckpt), "--davis", str(davis), "--out", str(out),
                                 "--short-side", "64", "--device", "cuda", "--precision", "bf16", "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results-val.json").read_text())
    assert doc["device"].startswith("cuda") and doc["precision"] == "bf16"
    assert abs(global_results(out)["J&F-Mean"] - global_results(tracked[0])["J&F-Mean"]) < 0.03
