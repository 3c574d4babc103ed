"""Output paths checked before any work, so that a bad one costs a line, not a run; and the
JSON reports written beside outputs."""

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from stoptool.errors import UserError, WriteFailed


def asset(name: str) -> Path:
    """A file shipped in `stoptool/assets` (see its README.txt)."""
    return Path(str(resources.files("stoptool") / "assets" / name))


def check_file(path: str | Path, what: str) -> Path:
    """`path` is an existing regular file; else UserError "<what> '<path>' does not exist" (or
    "is not a file", for a directory or a device)."""
    path = Path(path)
    try:
        if not path.is_file():
            state = "is not a file" if path.exists() else "does not exist"
            raise UserError(f"{what} '{path}' {state}")
    except OSError as err:  # a name too long for the filesystem, a path through a file, ...
        raise UserError(f"cannot read {what} '{path}': {err.strerror or err}") from None
    return path


def check_writable(path: str | Path, beside: tuple[str, ...] = ()) -> Path:
    """`path` can be created: its nearest existing ancestor is a writable directory, and its
    names, like the file names in `beside` (files written next to it), fit the filesystem.

    Raises UserError naming the ancestor that is a file or read-only. Says nothing of `path`
    itself (callers decide whether an existing file or directory there is fine).
    """
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write '{path}': '{parent}' is not a directory")
            for target in (path, *(path.with_name(name) for name in beside)):
                _check_name_lengths(target, parent)
            _try_create_in(parent, path)
            break
    return path


def _check_name_lengths(path: Path, directory: Path) -> None:
    """Every name in `path` fits the filesystem (255 bytes on most), so that a long name is
    refused before the work, not when the result is written."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in path.parts:
        if len(os.fsencode(name)) > limit:
            raise UserError(f"cannot write '{path}': the name '{name[:40]}...' is longer than {limit} bytes")


def _try_create_in(directory: Path, path: Path) -> None:
    """Create and remove a file in `directory`: permission bits do not tell (root ignores
    them, and a read-only or virtual filesystem refuses root too)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".stoptool-write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"cannot write '{path}': '{directory}' is not writable ({reason})") from None


def check_checkpoint_out(out: Path, src: Path, kind: str) -> None:
    """A new checkpoint file `out` made from `src`, with its `<stem>.<kind>.json` report beside:
    a .safetensors name (what the printed loaders read), not a directory, not the input."""
    if out.exists() and (out.is_dir() or out.resolve() == src.resolve()):
        raise UserError(f"'{out}' is a directory or the input itself; give a new file name")
    if out.suffix != ".safetensors":
        raise UserError(f"'{out}' must end in .safetensors (the file is written in that format)")
    check_writable(out, beside=(report_path(out, kind).name,))
    if report_path(out, kind).is_dir():
        raise UserError(f"'{report_path(out, kind)}' (the JSON report beside '{out}') is a directory")


def report_path(out: Path, kind: str) -> Path:
    """Where the JSON report of an output goes: `<stem>.<kind>.json` beside it."""
    return out.with_name(f"{out.stem}.{kind}.json")


# What a write can meet that says nothing about the user's input: the machine's state.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.EIO,
                errno.EFBIG, errno.ENOTDIR}


def size_text(n: int) -> str:
    """Bytes for a message: 512 bytes, 86.0 MB, 1.4 GB (decimal units, as `df -H` counts)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (its nearest existing ancestor); None
    where that cannot be told."""
    for parent in (Path(path).absolute(), *Path(path).absolute().parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


@contextmanager
def writing(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn an OSError of the machine's state (no space, no permission, the directory gone)
    met while writing `path` into a WriteFailed naming the file, the bytes it needed (`needed`,
    where known) and the space left."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        free = free_bytes(path)
        sizes = [f"needed {size_text(needed)}" if needed is not None else None,
                 f"{size_text(free)} free" if free is not None and err.errno in (errno.ENOSPC, errno.EDQUOT)
                 else None]
        sizes = [s for s in sizes if s]
        detail = f" ({', '.join(sizes)})" if sizes else ""
        reason = (err.strerror or type(err).__name__).lower()
        raise WriteFailed(f"cannot write '{path}': {reason}{detail}", path, needed, free) from None


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = ".tmp", sync: bool = False,
                 needed: int | None = None) -> Path:
    """Call `write(tmp)` on a new temporary file beside `path`, then rename it over `path`: the
    file is whole or not there. The temporary name starts with a dot and at most 64
    bytes of `path`'s name, so that it fits wherever `path` does; the file gets the permissions a
    plain `open` would give (mkstemp makes it private). `sync` flushes it to disk first. A
    write the machine refuses (no space, ...) raises WriteFailed (see `writing`; `needed` is the
    size it would have taken, where known), the file as it was before."""
    path = Path(path)
    with writing(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        short = os.fsencode(path.name)[:64].decode(errors="ignore")  # 64 bytes, whole characters
        fd, tmp = tempfile.mkstemp(prefix=f".{short}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # after the write: a writer may replace the file
            if sync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` through a temporary file and a rename."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_report(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as JSON, atomically. NaN and infinities become null: JSON has no spelling
    for them (Python's `NaN` and `Infinity` are refused by strict readers)."""
    return write_text_atomic(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
