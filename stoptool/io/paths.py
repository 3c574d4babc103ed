"""Output paths checked before any work, so that a bad one costs a line, not a run."""

import os
from pathlib import Path

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
