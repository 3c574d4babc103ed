"""Output paths checked before any work, so that a bad one costs a line, not a run; and the
JSON reports written beside outputs."""

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stoptool.errors import UserError


def check_writable(path: str | Path) -> Path:
    """`path` can be created: its nearest existing ancestor is a writable directory.

    Raises UserError naming the ancestor that is a file or read-only. Says nothing of `path`
    itself (callers decide whether an existing file or directory there is fine).
    """
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write '{path}': '{parent}' is not a directory")
            if not os.access(parent, os.W_OK):
                raise UserError(f"cannot write '{path}': '{parent}' is not writable")
            break
    return path


def report_path(out: Path, kind: str) -> Path:
    """Where the JSON report of an output goes: `<stem>.<kind>.json` beside it."""
    return out.with_name(f"{out.stem}.{kind}.json")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` through a temporary file and a rename: the file is whole or not there."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_report(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as JSON, atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
