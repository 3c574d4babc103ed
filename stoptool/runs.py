"""Run directories: what one says about its run, and who may write it.

A run directory (`pretrain --out`) holds `latest.safetensors` (weights and everything a resume
needs), `config.yaml` (the resolved config), `summary.json` (written when a launch ends:
finished, or stopped by a non-finite loss), the metrics, and `probe.json` once a sweep has
probed it. Every command that asks where a run stands asks this module:

- `schedule_steps`: how long a run is, `min(epochs × iterations per epoch, steps)`;
- `run_state`: not started, training (a live process holds the directory), partial, failed,
  trained or probed, read from the files alone (no data set is opened);
- `RunLock`: one writer per run directory at a time;
- `parse_assignment`: the `KEY=VALUE` items of `--set` and `--baseline`;
- `RunClock`: a run's wall-clock, this launch's and the whole run's over its launches.
"""

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stoptool.errors import UserError
from stoptool.io.checkpoint import LATEST, read_meta

SUMMARY = "summary.json"
CONFIG = "config.yaml"
PROBE_FILE = "probe.json"  # a sweep's probe results of the run
LOCK = ".stoptool.lock"
RUN_SECONDS = "run_seconds"  # a checkpoint's record of the run's wall-clock up to it, all launches


def schedule_steps(epochs: int, iterations_per_epoch: int, steps: int | None = None) -> int:
    """The step a run ends at: its schedule's `epochs × iterations_per_epoch`, or `steps`
    before that."""
    schedule = epochs * iterations_per_epoch
    return schedule if steps is None else min(schedule, steps)


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None where there is none (missing, unreadable, not an object)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(run_dir: Path) -> dict | None:
    """The run's resolved config (`config.yaml`) as flat keys; None where there is none."""
    try:
        data = yaml.safe_load((Path(run_dir) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


# -- where a run stands -----------------------------------------------------------------------


@dataclass
class RunState:
    kind: str  # not started | training | partial | failed | trained | probed
    step: int | None = None
    last_step: int | None = None
    note: str = ""  # failed: the reason; training: the process

    def __str__(self) -> str:
        if self.kind == "trained":
            return "trained, not probed"
        if self.kind == "partial":
            return f"partial at step {self.step} of {self.last_step}"
        if self.kind == "failed":
            return f"failed at step {self.step}: {self.note}"
        if self.kind == "training":
            return f"training ({self.note})"
        return self.kind


def run_state(run_dir: Path, epochs: int | None = None, steps: int | None = None,
              probe: set[tuple] | None = None) -> RunState:
    """Where the run in `run_dir` stands, from its files.

    Its length is `schedule_steps` of the iterations per epoch its checkpoint records and of
    `epochs` and `steps` (None: the run's own, from its checkpoint), so a sweep asking for more
    epochs finds the run partial. It is probed when `probe.json` holds results for the
    checkpoint's step: with every (method, layers, fraction, seed) of `probe`, or any when
    `probe` is None."""
    run_dir = Path(run_dir)
    holder = lock_holder(run_dir)
    latest = run_dir / LATEST
    meta = _latest_meta(latest)
    step = meta.get("step", 0) if meta is not None else None
    if holder is not None:
        return RunState("training", step, note=str(holder))
    summary = read_json(run_dir / SUMMARY) or {}
    if "stopped" in summary and (step is None or summary.get("step", 0) >= step):
        return RunState("failed", summary.get("step"), note=str(summary["stopped"]).splitlines()[0])
    if meta is None:
        return RunState("not started")
    own = meta.get("config", {})
    last = schedule_steps(epochs if epochs is not None else own.get("epochs", 0),
                          meta.get("iterations_per_epoch", 1),
                          steps if epochs is not None else own.get("steps"))
    if step < last:
        return RunState("partial", step, last)
    return RunState("probed" if probed(run_dir, step, probe) else "trained", step, last)


def _latest_meta(latest: Path) -> dict | None:
    if not latest.is_file():
        return None
    try:
        return read_meta(latest)
    except UserError:  # damaged: as good as none
        return None


def probed(run_dir: Path, step: int, wanted: set[tuple] | None = None) -> bool:
    """Whether `probe.json` holds results of the checkpoint at `step` (with each of `wanted`,
    rows keyed (method, layers, fraction, seed), where given)."""
    found = read_json(Path(run_dir) / PROBE_FILE)
    if not found or found.get("checkpoint_meta", {}).get("step") != step:
        return False
    rows = found.get("results", [])
    if wanted is None:
        return bool(rows)
    have = {(r.get("method"), r.get("layers"), r.get("fraction"), r.get("seed")) for r in rows}
    return wanted <= have


# -- KEY=VALUE ------------------------------------------------------------------------------------


def parse_assignment(item: str, flag: str = "--set", example: str = "KEY=VALUE") -> tuple[str, Any]:
    """(key, value) of a `KEY=VALUE` item, the value read as YAML (`[0.99, 1.0]`, `null`, `1e-3`;
    nothing after `=` is null). A malformed item is one line naming `flag`."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"{flag} takes {example}, got '{item}'")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise UserError(f"{flag} {key}: '{text}' is not a YAML value") from None
    return key, value


# -- one writer at a time -------------------------------------------------------------------------


@dataclass
class Holder:
    """Who holds a run directory: from its lock file."""

    pid: int | None
    host: str
    since: str
    command: str

    def __str__(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "a process"
        return f"{pid} on {self.host}, {self.command}, since {self.since}"

    @classmethod
    def read(cls, text: str) -> "Holder | None":
        try:
            data = json.loads(text)
            return cls(data.get("pid"), str(data.get("host", "?")), str(data.get("since", "?")),
                       str(data.get("command", "stoptool")))
        except (ValueError, AttributeError):
            return None if not text.strip() else cls(None, "?", "?", "stoptool")


class RunLock:
    """The run directory's lock, held while a command writes it: a second writer is refused with
    one line naming the holder; a lock left by a process that died (SIGKILL, a lost node) is
    taken over with a note.

    The lock is an advisory `flock` on `RUN/.stoptool.lock`, which the kernel (or, on a network
    filesystem, the server, once the node's lease ends) releases when its process dies however
    it ends; the file names the holder for the message. Where the filesystem offers no locks,
    the file alone decides: a holder on this host that is no longer running is taken over, one
    on another host is refused (remove the file once that process is gone)."""

    def __init__(self, run_dir: Path, command: str):
        self.run_dir, self.command = Path(run_dir), command
        self.path = self.run_dir / LOCK
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> str | None:
        """Take the lock, or raise UserError naming its holder. Returns a note when it was
        taken over from a process that died."""
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            locked = _try_flock(fd, fcntl.LOCK_EX, tries=5)
            previous = Holder.read(_read_fd(fd))
            mine = previous is not None and previous.pid == os.getpid() and previous.host == _host()
            if locked is False or (locked is None and previous is not None and not mine
                                   and _alive(previous)):
                raise UserError(f"'{self.run_dir}' is being written by {previous or 'another process'}: "
                                "wait for it to end, stop it, or write elsewhere (--out)")
        except BaseException:
            os.close(fd)
            self._forget_created_dir()
            raise
        self._fd = fd
        record = {"pid": os.getpid(), "host": _host(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": f"stoptool {self.command}"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        if previous is not None and not mine:
            return (f"took over the lock of '{self.run_dir}' from {previous}, which is no longer running "
                    "(killed, or its node lost)")
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file: nobody holds it
        except OSError:
            pass  # (the directory was removed under the run)
        os.close(self._fd)  # (closing drops the flock)
        self._fd = None
        self._forget_created_dir()

    def _forget_created_dir(self) -> None:
        """A directory this lock made and nothing else wrote to goes again: a refused command
        leaves nothing behind."""
        if self._created_dir and self.run_dir.is_dir() and {p.name for p in self.run_dir.iterdir()} <= {LOCK}:
            self.path.unlink(missing_ok=True)
            self.run_dir.rmdir()
        self._created_dir = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: Path) -> Holder | None:
    """The live process that holds `run_dir`, or None."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        holder = Holder.read(_read_fd(fd))
        if holder is None:  # an empty file: released (a holder writes itself in as it locks)
            return None
        locked = _try_flock(fd, fcntl.LOCK_SH)
        if locked is None:  # no locks here: the file decides
            return holder if _alive(holder) else None
        return holder if locked is False else None
    finally:
        os.close(fd)


def _try_flock(fd: int, kind: int, tries: int = 1) -> bool | None:
    """True: locked (until `fd` closes); False: another process holds it (after `tries`
    attempts 50 ms apart: a reader's brief look, see `lock_holder`, is waited out); None: this
    filesystem offers no locks."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if attempt + 1 < tries:
            time.sleep(0.05)
    return False


def _read_fd(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", errors="replace")


def _host() -> str:
    return socket.gethostname()


def _alive(holder: Holder) -> bool:
    """Whether the holder may still run: on this host, its pid is alive; on another, it cannot
    be told here, so it counts as alive."""
    if holder.host != _host() or holder.pid is None:
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclass
class RunClock:
    """A run's wall-clock over its launches: this launch's seconds since `start`, and the whole
    run's, `before` (the launches before this one, as the checkpoint resumed from recorded it;
    None where it did not) plus this launch's."""

    before: float | None = 0.0
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def resuming(cls, meta: dict | None, start: float) -> "RunClock":
        """The clock of a launch that started at `start` from a checkpoint's metadata (None: fresh)."""
        return cls(0.0 if meta is None else meta.get(RUN_SECONDS), start)

    def launch(self) -> float:
        return time.perf_counter() - self.start

    def whole(self) -> float | None:
        return None if self.before is None else self.before + self.launch()

    def text(self, launch: float | None = None) -> str:
        """The closing table's wall-clock: one figure for a run of one launch, else both, labelled."""
        launch = self.launch() if launch is None else launch
        if self.before == 0.0:
            return f"{launch:.1f} s"
        whole = "not recorded by the checkpoint resumed from" if self.before is None else \
            f"{self.before + launch:.1f} s"
        return f"{launch:.1f} s this launch, whole run {whole}"
