"""Every `stoptool viz` command writes a real, non-blank image of the promised size, prints
its path, and turns bad input into one line on stderr with exit code 2."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.viz import curves, heatmap, masks, similarity

runner = CliRunner(env={"COLUMNS": "400"})
DPI = 40


def open_image(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64), img.size


def assert_real_figure(path, inches):
    pixels, size = open_image(path)
    assert size == (round(inches[0] * DPI), round(inches[1] * DPI))
    # a blank or single-colour canvas has (almost) no variance; a drawn figure has plenty
    assert pixels.std() > 20
    # no temporary file is left beside it
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def invoke(*args):
    result = runner.invoke(app, ["viz", *map(str, args)])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return result


def test_similarity_writes_figure_and_numbers(tiny_ckpt, tmp_path):
    out = tmp_path / "sim.png"
    result = invoke("similarity", tiny_ckpt, "--out", out, "--dpi", DPI, "--draws", 16)
    assert f"wrote {out}" in result.stdout
    assert_real_figure(out, similarity.figure_size(9))
    assert out.with_suffix(".json").is_file()


def test_similarity_default_path_is_beside_the_checkpoint(tiny_ckpt):
    result = invoke("similarity", tiny_ckpt, "--dpi", DPI, "--draws", 4, "--queries", "0,0;7,7")
    path = tiny_ckpt.parent / "figures" / "similarity.png"
    assert f"wrote {path}" in result.stdout
    assert_real_figure(path, similarity.figure_size(2))


def test_similarity_of_two_checkpoints_side_by_side(tiny_ckpt, tiny_ckpt_sigma0, tmp_path):
    out = tmp_path / "compare.png"
    result = invoke("similarity", tiny_ckpt_sigma0, tiny_ckpt, "--out", out, "--dpi", DPI, "--draws", 16)
    assert f"wrote {out}" in result.stdout
    assert_real_figure(out, similarity.figure_size(9, checkpoints=2))
    data = json.loads(out.with_suffix(".json").read_text())
    entries = data["checkpoints"]
    assert [e["checkpoint"] for e in entries] == [str(tiny_ckpt_sigma0), str(tiny_ckpt)]
    assert [(e["trained_sigma"], e["sigma"]) for e in entries] == [(0.0, 0.0), (0.25, 0.25)]
    assert entries[0]["peak"] == [1.0] * 9  # σ = 0: the deterministic map peaks at 1 on the query
    assert f"{tiny_ckpt} (σ = 0.25)" in result.stdout and f"{tiny_ckpt_sigma0} (σ = 0)" in result.stdout
    # the default name, beside the first checkpoint, does not overwrite its single-checkpoint figure
    invoke("similarity", tiny_ckpt_sigma0, tiny_ckpt, "--dpi", DPI, "--draws", 4, "--queries", "1")
    assert (tiny_ckpt_sigma0.parent / "figures" / "similarity-compare.png").is_file()


def test_similarity_of_one_checkpoint_reports_the_difference(tiny_ckpt, tmp_path):
    out = tmp_path / "one.png"
    result = invoke("similarity", tiny_ckpt, "--out", out, "--dpi", DPI, "--draws", 16, "--queries", "2")
    data = json.loads(out.with_suffix(".json").read_text())
    delta = np.array(data["stochastic"]) - np.array(data["deterministic"])
    np.testing.assert_allclose(data["difference"], delta, atol=2e-5)
    assert data["largest_difference"] == pytest.approx(np.abs(delta).max(), abs=2e-5)
    assert f"largest |difference| │ {data['largest_difference']:.4f}" in result.stdout


def test_similarity_refuses_checkpoints_of_different_grids(tiny_ckpt, tmp_path):
    other = tmp_path / "r24"
    args = ["pretrain", "--arch", "vit_n2", "--img-size", "24", "--pred-width", "48", "--pred-depth", "1",
            "--batch-size", "8", "--steps", "1", "--precision", "fp32", "--device", "cpu", "-q",
            "--eval-every", "0", "--out", other]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    one_line_error(["similarity", tiny_ckpt, other, "--out", tmp_path / "s.png"],
                   "the checkpoints have different patch grids (8×8 vs 12×12): compare checkpoints of one "
                   "grid")
    assert not (tmp_path / "s.png").exists()


def test_heatmap_writes_one_panel_per_target_block(tiny_ckpt, tmp_path):
    out = tmp_path / "heat.png"
    invoke("heatmap", tiny_ckpt, "--out", out, "--dpi", DPI, "--seed", 3)
    data = json.loads(out.with_suffix(".json").read_text())
    n = len(data["patches"])
    assert 1 <= n <= 4
    assert_real_figure(out, heatmap.figure_size(n))
    for p in data["probs"]:
        assert np.isclose(np.sum(p), 1.0, atol=1e-4)


def test_heatmap_on_a_given_image_and_patch(tiny_ckpt, tmp_path):
    img = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(img)
    ctx, tgt = masks.sample_masks(heatmap.mask_config_from_meta({}, 8), [0])[0]
    r, c = divmod(int(tgt[1, 0]), 8)
    out = tmp_path / "heat.png"
    invoke("heatmap", tiny_ckpt, img, "--patch", f"{r},{c}", "--out", out, "--dpi", DPI)
    assert_real_figure(out, heatmap.figure_size(1))


def test_masks_writes_one_panel_per_seed(tmp_path):
    out = tmp_path / "masks.png"
    result = invoke("masks", "--seeds", "0,1,2", "--img-size", 64, "--patch", 8, "--out", out,
                    "--dpi", DPI)
    assert "8×8" in result.stdout
    assert_real_figure(out, masks.figure_size(3))


def test_masks_take_a_preset_and_flags(tmp_path):
    out = tmp_path / "m.png"
    invoke("masks", "--config", "stop-vitb16-in1k", "--seeds", "5", "--num-targets", 2,
           "--out", out, "--dpi", DPI)
    data = json.loads(out.with_suffix(".json").read_text())
    assert (data["img_size"], data["patch"], data["grid"]) == (224, 16, 14)
    assert len(data["masks"][0]["targets"]) == 2


def test_curves_writes_figure(tiny_run, tmp_path):
    out = tmp_path / "curves.png"
    result = invoke("curves", tiny_run, tiny_run, "--out", out, "--dpi", DPI)
    assert "σ = 0.25" in result.stdout
    assert_real_figure(out, (curves.FIGSIZE[0] * 3 / 2, curves.FIGSIZE[1]))  # 2 × 3: tiny_run logs rankme


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_vector_formats_follow_the_extension(tiny_run, tmp_path, suffix, magic):
    out = tmp_path / f"curves{suffix}"
    invoke("curves", tiny_run, "--out", out)
    assert out.read_bytes().startswith(magic)


def one_line_error(args, message):
    result = runner.invoke(app, ["viz", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "fig.jpg"], "one of .png, .svg, .pdf"),
        (["--dpi", "0"], "dpi must be between 10 and 1200, got 0 (--dpi)"),
        (["--queries", "9,9"], "outside the 8×8 patch grid"),
        (["--queries", "a;b"], "queries takes ROW,COL pairs"),
        (["--sigma", "-1"], "sigma must be >= 0 (it is the noise standard deviation), got -1.0 (--sigma)"),
        (["--sigma", "nan"], "sigma must be a finite number, got nan (--sigma)"),
        (["--draws", "0"], "draws must be between 1 and 1,000,000, got 0 (--draws)"),
        (["--draws", "1000001"], "draws must be between 1 and 1,000,000, got 1000001 (--draws)"),
    ],
)
def test_similarity_bad_input(tiny_ckpt, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in args else ["--out", "s.png"]
    one_line_error(["similarity", tiny_ckpt, *args, *out], message)
    assert not list(tmp_path.iterdir())


def test_similarity_needs_a_checkpoint(tmp_path):
    one_line_error(["similarity", tmp_path / "nope.safetensors"], "does not exist")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "0"], "temperature must be positive, got 0.0 (--temperature)"),
        (["--temperature", "nan"], "temperature must be a finite number, got nan (--temperature)"),
        (["--patch", "8,0"], "outside the 8×8 patch grid"),
    ],
)
def test_heatmap_bad_input(tiny_ckpt, tmp_path, args, message):
    one_line_error(["heatmap", tiny_ckpt, *args, "--out", tmp_path / "h.png"], message)
    assert not (tmp_path / "h.png").exists()


def test_heatmap_patch_outside_the_targets(tiny_ckpt, tmp_path):
    ctx, _ = masks.sample_masks(heatmap.mask_config_from_meta({}, 8), [0])[0]
    r, c = divmod(int(ctx[0]), 8)  # a context patch is never a target
    one_line_error(["heatmap", tiny_ckpt, "--patch", f"{r},{c}", "--out", tmp_path / "h.png"],
                   f"patch {r},{c} is not in a target block")
    assert not (tmp_path / "h.png").exists()


def test_heatmap_unreadable_image(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    one_line_error(["heatmap", tiny_ckpt, bad, "--out", tmp_path / "h.png"], "cannot read image")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--img-size", "30", "--patch", "4"], "not a positive multiple of the patch size 4"),
        (["--seeds", "a,b"], "seeds takes integers separated by commas, got 'a,b' (--seeds)"),
        (["--seeds", "0,-1"], "seeds must each be between 0 and 4294967295, got '0,-1' (--seeds)"),
        (["--seeds", "99999999999999999999"], "seeds must each be between 0 and 4294967295"),
        (["--target-scale", "0.3,0.1"], "target_scale must satisfy"),
        (["--config", "no-such-preset"], "unknown preset"),
    ],
)
def test_masks_bad_input(tmp_path, args, message):
    one_line_error(["masks", *args, "--out", tmp_path / "m.png"], message)
    assert not (tmp_path / "m.png").exists()


def test_an_existing_directory_as_out_is_refused_with_or_without_a_suffix(tmp_path):
    for name in ("fig", "fig.png"):
        folder = tmp_path / name
        folder.mkdir()
        result = runner.invoke(app, ["viz", "masks", "--out", str(folder)])
        assert result.exit_code == 2 and f"out '{folder}' is a directory" in result.stderr, result.output
    assert all(p.is_dir() for p in tmp_path.iterdir())  # the two folders, no figure written beside them
    assert not any((tmp_path / "fig").iterdir())
