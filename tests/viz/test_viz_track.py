"""`stoptool viz track`: a DAVIS sequence's frames with the masks over them above the ground
truth, its numbers as JSON, an optional animated GIF, and one-line errors."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from stoptool.cli import app

_spec = importlib.util.spec_from_file_location(
    "davis_fixture", Path(__file__).parents[1] / "track" / "davis_fixture.py")
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A DAVIS fixture and, as "predictions", its own annotations in a *.davis-val folder of a
    run directory, scored by `stoptool track --score-only` (which records the DAVIS folder)."""
    base = tmp_path_factory.mktemp("viztrack")
    davis = fixture.make_davis(base / "DAVIS", frames=6)
    masks = base / "run" / "latest.davis-val"
    shutil.copytree(davis / "Annotations" / "480p", masks)
    result = runner.invoke(app, ["track", "--score-only", str(masks), "--davis", str(davis), "-q"])
    assert result.exit_code == 0, result.output
    return davis, masks


def test_viz_track_draws_frames_over_the_ground_truth_and_writes_a_gif(scored, tmp_path):
    davis, masks = scored
    out, gif = tmp_path / "fig.png", tmp_path / "anim.gif"
    # the run directory finds its *.davis-* folder, and that folder the DAVIS folder
    result = runner.invoke(app, ["viz", "track", str(masks.parent), "three-shapes", "--frames", "3",
                                 "--out", str(out), "--gif", str(gif)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.size[0] > img.size[1]  # three frames side by side, two rows
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [f["frame"] for f in doc["frames"]] == ["00000", "00002", "00005"]
    # the masks are the ground truth itself: a perfect J&F on every scored frame
    assert all(f["J&F"] == 1.0 for f in doc["frames"][1:]) and "J&F" not in doc["frames"][0]
    assert doc["objects"] == 3
    with Image.open(gif) as anim:
        assert anim.n_frames == 6
        assert anim.size == (2 * 427, round(427 * fixture.HEIGHT / fixture.WIDTH))


def test_viz_track_default_path_and_a_wrong_sequence(scored):
    davis, masks = scored
    result = runner.invoke(app, ["viz", "track", str(masks), "one-square", "--davis", str(davis)])
    assert result.exit_code == 0, result.output
    assert (masks / "figures" / "track-one-square.png").is_file()
    bad = runner.invoke(app, ["viz", "track", str(masks), "no-such-video"])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error:") and "no 'no-such-video/' folder" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
