"""Output paths are checked before any work; reports are written whole or not at all."""

import json
from pathlib import Path

import numpy as np
import pytest

from stoptool.errors import UserError
from stoptool.io.paths import check_file, check_writable, report_path, write_report


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_directory_that_refuses_files_is_named(tmp_path):
    """/proc takes no new files from anyone, root included, whom permission bits do not stop:
    the check tries to create one instead of reading the bits."""
    with pytest.raises(UserError, match=r"cannot write '/proc/a/b.json': '/proc' is not writable \("):
        check_writable("/proc/a/b.json")
    assert check_writable(tmp_path / "new" / "x.json") == tmp_path / "new" / "x.json"
    assert list(tmp_path.iterdir()) == []  # the trial file is gone, nothing was created


def test_a_file_where_a_directory_belongs_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="'.*f' is not a directory"):
        check_writable(tmp_path / "f" / "out.png")


def test_report_is_whole_json_beside_the_output(tmp_path):
    out = tmp_path / "enc.safetensors"
    path = write_report(report_path(out, "export"), {"top1": np.float32(0.5), "file": out})
    assert path == tmp_path / "enc.export.json"
    assert json.loads(path.read_text()) == {"top1": 0.5, "file": str(out)}
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        write_report(path, {"bad": {1, 2}})
    assert json.loads(path.read_text())["top1"] == 0.5  # the old report is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.export.json"]  # no temporary left


def test_input_files_are_named_with_what_is_wrong(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\n")
    assert check_file(tmp_path / "a.yaml", "config file") == tmp_path / "a.yaml"
    with pytest.raises(UserError, match=f"^config file '{tmp_path / 'b.yaml'}' does not exist$"):
        check_file(tmp_path / "b.yaml", "config file")
    with pytest.raises(UserError, match=f"^image '{tmp_path}' is not a file$"):
        check_file(tmp_path, "image")


def test_reports_write_nan_and_infinity_as_null(tmp_path):
    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written into JSON"))

    path = write_report(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf"), np.float32("-inf")],
                                             "c": {"d": np.array([0.5, np.nan])}})
    assert strict(path.read_text()) == {"a": None, "b": [1.0, None, None], "c": {"d": [0.5, None]}}
