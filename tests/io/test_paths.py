"""Output paths are checked before any work; reports are written whole or not at all."""

import json

import numpy as np
import pytest

from stoptool.errors import UserError
from stoptool.io import paths
from stoptool.io.paths import check_writable, report_path, write_report


def test_a_read_only_directory_is_named(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    # os.access, not chmod: the test may run as root, whom permissions do not stop
    monkeypatch.setattr(paths.os, "access", lambda p, mode: str(p) != str(ro))
    with pytest.raises(UserError, match=f"cannot write '{ro / 'a' / 'b.json'}': '{ro}' is not writable"):
        check_writable(ro / "a" / "b.json")
    assert check_writable(tmp_path / "new" / "x.json") == tmp_path / "new" / "x.json"


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
