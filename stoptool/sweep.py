"""`stoptool sweep`: a grid of pretraining runs × seeds, each probed when it finishes.

A spec (YAML) has three parts: `base` (config keys shared by every run, as in a preset; a
`config:` key there names a preset or YAML file to start from), `grid` (key -> list of values,
expanded as a product) and `probe` (the `stoptool probe` options: method, dataset, fraction,
layers, ...). Each combination is a run directory under the sweep's directory, named from its
values (`sigma=0.25,seed=1`), holding the run as `stoptool pretrain` writes it and the probe's
results in `probe.json`.

Every run's config is built and validated before anything runs. What is already done is read
back from the run directories, so a sweep started again skips finished runs and probes and
resumes interrupted ones from their `latest` checkpoint.
"""

import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stoptool.config import (
    PretrainConfig,
    build_config,
    preset_names,
    read_config_file,
    unresumable_difference,
)
from stoptool.data.datasets import BUILTIN, has_separator, open_dataset
from stoptool.errors import UserError, plural
from stoptool.io.checkpoint import LATEST, read_meta
from stoptool.io.paths import check_writable, write_text_atomic
from stoptool.options import build, option
from stoptool.probe.config import ProbeConfig, knn_features_of
from stoptool.runs import PROBE_FILE, RunLock, RunState, parse_assignment, read_json, run_state

SECTIONS = ("base", "grid", "probe", "description")
# What a spec's probe section may set; the sweep itself gives the checkpoint and the output.
PROBE_KEYS = ("method", "dataset", "subset", "fraction", "layers", "seed", "data_root", "img_size", "which",
              "batch_size", "device", "precision", "workers", "cache_dir", "cache")
MANIFEST = "sweep.yaml"  # the spec as run, and its runs: what `stoptool report` groups by
LOG_FILE = "sweep.log"  # a run's output when it ran in a subprocess (--parallel)


@dataclass
class SweepOptions:
    """`stoptool sweep`'s options (see `stoptool.options`)."""

    spec: str = option(None, "A sweep spec (YAML: base, grid, probe), or the name of a shipped one: "
                       "table6-pred-pos, table7-noise-on, fig3-cov, sigma-grid (CPU scale on digits) and the "
                       "same names with -in1k (full scale, on the ImageNet presets).", argument=True,
                       required=True)
    out: str | None = option(None, "Directory of the sweep: one run directory per grid point, named from its "
                             "values (e.g. sigma=0.25,seed=1).", default_text="runs/sweeps/<spec name>")
    set: list[str] = option([], "Set a base config key of every run (repeatable; VALUE is YAML), or a "
                            "probe option as probe.KEY=VALUE, e.g. --set dataset=/data/imagenet --set "
                            "probe.dataset=/data/imagenet.", metavar="KEY=VALUE", default_text="none")
    dry_run: bool = option(False, "List the runs and where each stands (probed, trained, partial at step N, "
                           "not started) and exit.", flags=("--dry-run",))
    parallel: int = option(1, "Runs at a time, each a subprocess with cores / N threads.", low=1)
    emit: Literal["slurm", "commands"] | None = option(
        None, "slurm: write DIR/sweep.slurm, an array job with one task per run | commands: write "
        "DIR/commands.txt, one line per run. Nothing runs.", default_text="none")


@dataclass
class Run:
    name: str
    values: dict[str, Any]  # this run's grid values, as the spec writes them
    settings: dict[str, Any]  # every key the spec sets for it (base, --set, grid), as written
    preset: str | None  # base's `config:`, the preset or file the settings apply to
    cfg: PretrainConfig  # resolved and validated
    probe: dict[str, Any]  # probe options by key (ckpt and out excepted)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.runtime.out)

    def probe_config(self) -> ProbeConfig:
        return build(ProbeConfig, {**self.probe, "ckpt": str(self.dir), "out": str(self.dir / PROBE_FILE)})

    def state(self) -> RunState:
        """Where the run stands against this sweep's schedule and probe."""
        probe = self.probe_config()
        wanted = {(m, probe.layers, probe.fraction, probe.seed) for m in probe.methods()}
        return run_state(self.dir, self.cfg.optim.epochs, self.cfg.optim.steps, wanted)


@dataclass
class Sweep:
    label: str  # the spec's name or path
    out: Path
    spec: dict[str, Any]  # as read, with the --set overrides applied
    runs: list[Run]

    @property
    def grid_fields(self) -> list[str]:
        return list(self.spec["grid"])


@dataclass
class Outcome:
    run: Run
    state: RunState
    seconds: float
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    COLUMNS = ("run", "state", "seconds", "probe top-1 (%)")

    def row(self) -> tuple[str, ...]:
        top1 = ", ".join(f"{k} {v:.2f}" for k, v in self.metrics.items() if k.endswith("top1"))
        return (self.run.name, str(self.state), f"{self.seconds:.0f}" if self.seconds else "-", top1 or "-")


# -- the spec --------------------------------------------------------------------------------


def sweep_names() -> list[str]:
    return preset_names("sweeps")


def read_spec(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(label, spec) of a shipped spec by name (see `sweep_names`) or a YAML file by path."""
    return name_or_path, read_config_file(name_or_path, "sweeps", what="sweep")


def load_sweep(name_or_path: str, out: str | Path | None = None, overrides: list[str] = ()) -> Sweep:
    """The sweep of a spec with `--set` overrides (`KEY=VALUE` for base, `probe.KEY=VALUE` for
    the probe), every run's config built and validated: a bad spec fails here, before any run."""
    label, spec = read_spec(name_or_path)
    where = f"sweep spec '{label}'"
    unknown = [k for k in spec if k not in SECTIONS]
    if unknown:
        raise UserError(f"{where}: unknown section '{unknown[0]}' (a spec has base, grid, probe and an "
                        "optional description)")
    spec = {"base": _mapping(spec, "base", where), "grid": _mapping(spec, "grid", where),
            "probe": _mapping(spec, "probe", where), "description": spec.get("description", "")}
    _apply_overrides(spec, overrides, where)
    grid = _check_grid(spec["grid"], where)
    out = (Path(out) if out is not None else Path("runs") / "sweeps" / Path(label).stem).absolute()
    base = dict(spec["base"])
    preset = base.pop("config", None)
    runs = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        runs.append(_make_run(values, base, preset, spec["probe"], out, where))
    names = [r.name for r in runs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise UserError(f"{where}: two runs would share the directory name '{twice}': give distinct values")
    return Sweep(label, out, spec, runs)


def _mapping(spec: dict, section: str, where: str) -> dict:
    value = spec.get(section) or {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: {section} must be a mapping of keys to values")
    return dict(value)


def _apply_overrides(spec: dict, items: list[str], where: str) -> None:
    for item in items:
        key, value = parse_assignment(item, example="KEY=VALUE (or probe.KEY=VALUE)")
        section, _, name = key.rpartition(".")
        if section not in ("", "probe"):
            raise UserError(f"--set {key}: set a base key (KEY=VALUE) or a probe option (probe.KEY=VALUE)")
        if name in spec["grid"] and not section:
            raise UserError(f"--set {name}: {name} is a grid field of {where}; it takes the grid's values")
        spec["probe" if section else "base"][name] = value


def _check_grid(grid: dict, where: str) -> dict[str, list]:
    if not grid:
        raise UserError(f"{where}: the grid is empty: give at least one field and its values")
    for key, values in grid.items():
        if key in ("out", "config"):
            raise UserError(f"{where}: grid field '{key}' cannot vary: the sweep sets each run's directory, "
                            "and base's config names one preset")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid field '{key}' takes a non-empty list of values, got {values!r}")
        names = [_name_part(v) for v in values]
        twice = next((v for v, n in zip(values, names) if names.count(n) > 1), None)
        if twice is not None:
            raise UserError(f"{where}: grid field '{key}' lists {twice!r} twice (or two values that "
                            "read alike)")
    return grid


def _make_run(values: dict, base: dict, preset: str | None, probe: dict, out: Path, where: str) -> Run:
    name = run_name(values)
    settings = {**base, **values}
    try:
        if "out" in settings:
            raise UserError("out is set by the sweep (each run's directory under --out); leave it out")
        cfg = build_config(preset, {**settings, "out": str(out / name)})
    except UserError as err:
        raise UserError(f"{where}, run {name}: {err}") from None
    return Run(name, values, settings, preset, cfg, _probe_options(probe, cfg, where))


def _probe_options(probe: dict, cfg: PretrainConfig, where: str) -> dict[str, Any]:
    """The spec's probe options, completed from the run: its data set (and data_root), seed,
    device, precision and workers, unless the spec gives them."""
    unknown = [k for k in probe if k not in PROBE_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown probe option '{unknown[0]}': use {', '.join(PROBE_KEYS)}")
    rt = cfg.runtime
    inherited = {"dataset": cfg.data.dataset, "data_root": cfg.data.data_root, "seed": rt.seed,
                 "device": rt.device, "precision": "auto" if rt.precision == "fp16" else rt.precision,
                 "workers": rt.workers}
    options = {**{k: v for k, v in inherited.items() if v is not None}, **probe}
    try:
        build(ProbeConfig, options).validate()
    except UserError as err:
        raise UserError(f"{where}, probe: {err}") from None
    return options


def run_name(values: dict[str, Any]) -> str:
    """`sigma=0.25,seed=1`: the grid values in the spec's order, safe in any file system."""
    return ",".join(f"{_safe(k)}={_name_part(v)}" for k, v in values.items())


def _name_part(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_name_part(v) for v in value)
    return _safe(str(value)) if value is not None else "none"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text).strip("_.") or "_"


# -- what is done ----------------------------------------------------------------------------


def probe_metrics(run_dir: Path) -> dict[str, float]:
    """The probe's results of a run as metrics in percent: `logreg_top1`, `knn_top5`, ...
    (`_last4` and `_f0.1` mark other layers and label fractions, `knn_raw` DINO's k-NN)."""
    found = read_json(run_dir / PROBE_FILE) or {}
    out = {}
    for r in found.get("results", []):
        name = r["method"] + ("_raw" if knn_features_of(r) == "raw" else "")
        name += "" if r.get("layers", "last") == "last" else f"_{r['layers']}"
        name += "" if r.get("fraction", 1) >= 1 else f"_f{r['fraction']:g}"
        for top in ("top1", "top5"):
            if r.get(top) is not None:
                out[f"{name}_{top}"] = 100 * r[top]
    return out


def states(sweep: Sweep) -> list[RunState]:
    """Every run's state; a run directory that holds a run of another config is an error."""
    found = []
    for run in sweep.runs:
        _check_same_run(run)
        found.append(run.state())
    return found


def _check_same_run(run: Run) -> None:
    latest = run.dir / LATEST
    if not latest.is_file():
        return
    diff = unresumable_difference(read_meta(latest).get("config", {}), run.cfg.to_dict())
    if diff:
        key, was, now = diff
        raise UserError(f"'{run.dir}' holds a run with {key}={was!r}, not the spec's {now!r}: "
                        "remove that directory or give the sweep another --out")


def check_data(sweep: Sweep, paths: bool = True) -> None:
    """Every data set the runs and probes read is a name stoptool knows or, unless `paths` is
    False (commands run elsewhere), an existing path: the presets' `imagenet` is neither."""
    seen = set()
    for run in sweep.runs:
        for name, root in ((run.cfg.data.dataset, run.cfg.data.data_root),
                           (run.probe["dataset"], run.probe.get("data_root"))):
            if name in seen or name in BUILTIN or (not paths and has_separator(name)):
                continue
            seen.add(name)
            if not Path(name).expanduser().exists():
                try:
                    open_dataset(name, root=root)  # its message: what is missing and what to give
                except UserError as err:
                    raise UserError(f"{err} (for every run of the sweep: --set dataset=PATH; for its probes: "
                                    "--set probe.dataset=PATH)") from None


# -- running ---------------------------------------------------------------------------------


def write_manifest(sweep: Sweep) -> Path:
    data = {"spec": sweep.label, **sweep.spec, "runs": [r.name for r in sweep.runs]}
    return write_text_atomic(sweep.out / MANIFEST, yaml.safe_dump(data, sort_keys=False))


def run_sweep(sweep: Sweep, parallel: int = 1, notify: Callable[[str], None] | None = None) -> list[Outcome]:
    """Run what is not done yet: pretrain (resuming a partial run) and probe each run, in this
    process, or `parallel` at a time in subprocesses that split the cores between them."""
    found = states(sweep)
    check_data(sweep)
    check_writable(sweep.out / MANIFEST)
    with RunLock(sweep.out, "sweep"):  # one sweep at a time in a directory
        write_manifest(sweep)
        return _run_all(sweep, found, parallel, notify or (lambda text: None))


def _run_all(sweep: Sweep, found: list[RunState], parallel: int, say: Callable[[str], None]) -> list[Outcome]:
    todo = [(run, st) for run, st in zip(sweep.runs, found) if st.kind not in ("probed", "training")]
    busy = [run.name for run, st in zip(sweep.runs, found) if st.kind == "training"]
    say(f"{sweep.label}: {plural(len(sweep.runs), 'run')}, {len(sweep.runs) - len(todo) - len(busy)} done, "
        f"{len(todo)} to run" + (f", {parallel} at a time" if parallel > 1 and todo else "")
        + (f", {len(busy)} being trained by another process (left alone: {', '.join(busy)})" if busy else ""))
    if parallel > 1:
        threads = max(1, (os.cpu_count() or 1) // parallel)
        with ThreadPoolExecutor(parallel) as pool:
            done = list(pool.map(lambda job: _in_subprocess(*job, threads, say), todo))
    else:
        done = [_in_process(run, st, say) for run, st in todo]
    by_name = {o.run.name: o for o in done}
    outcomes = []
    for run, st in zip(sweep.runs, found):
        outcome = by_name.get(run.name) or Outcome(run, st, 0.0)
        outcome.metrics = probe_metrics(run.dir) if outcome.state.kind == "probed" else {}
        outcomes.append(outcome)
    return outcomes


def _in_process(run: Run, state: RunState, say: Callable[[str], None]) -> Outcome:
    from stoptool.probe.run import run_probe  # (heavy: timm, scikit-learn; `stoptool --help` needs neither)
    from stoptool.train.pretrain import pretrain

    start = time.perf_counter()
    try:
        if state.kind != "trained":
            say(f"{run.name}: pretraining" + (f" from step {state.step}" if state.kind == "partial" else ""))
            pretrain(run.cfg, resume=True, notify=lambda text: say(f"{run.name}: {text}"))
        say(f"{run.name}: probing")
        run_probe(run.probe_config())
    except UserError as err:
        say(f"{run.name}: failed: {err}")
        return Outcome(run, run.state(), time.perf_counter() - start,
                       str(err))
    seconds = time.perf_counter() - start
    say(f"{run.name}: done in {seconds:.0f} s")
    return Outcome(run, run.state(), seconds)


def _in_subprocess(run: Run, state: RunState, threads: int, say: Callable[[str], None]) -> Outcome:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    steps = commands(run, [sys.executable, "-m", "stoptool"])
    if state.kind == "trained":
        steps = steps[1:]
    start = time.perf_counter()
    run.dir.mkdir(parents=True, exist_ok=True)
    say(f"{run.name}: started ({plural(threads, 'thread')}; output in {run.dir / LOG_FILE})")
    error = None
    with open(run.dir / LOG_FILE, "a", encoding="utf-8") as log:
        for argv in steps:
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            code = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                error = f"{argv[3]} exited with {code}: {_last_line(run.dir / LOG_FILE)}"
                break
    seconds = time.perf_counter() - start
    say(f"{run.name}: " + (f"failed: {error}" if error else f"done in {seconds:.0f} s"))
    return Outcome(run, run.state(), seconds, error)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


# -- commands for a scheduler ----------------------------------------------------------------


def commands(run: Run, stoptool: list[str] = ("stoptool",)) -> list[list[str]]:
    """The two commands that make a run, as argument lists: `stoptool pretrain` with the run's
    settings as `--set KEY=VALUE` (resuming when interrupted), then `stoptool probe`."""
    pretrain = [*stoptool, "pretrain", *(["--config", run.preset] if run.preset else [])]
    for key, value in run.settings.items():
        pretrain += ["--set", f"{key}={_yaml_value(value)}"]
    pretrain += ["--out", str(run.dir), "-q"]
    probe = [*stoptool, "probe", str(run.dir)]
    for key, value in run.probe.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            probe += [flag if value else "--no-" + flag[2:]]
        else:
            probe += [flag, str(value)]
    probe += ["--out", str(run.dir / PROBE_FILE), "-q"]
    return [pretrain, probe]


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def emit(sweep: Sweep, kind: str) -> Path:
    """Write the sweep's commands for a scheduler: `slurm`, an array job (one task per run), or
    `commands`, one line per run (pretrain && probe). Returns the file written."""
    lines = [" && ".join(shlex.join(c) for c in commands(r)) for r in sweep.runs]
    if kind == "commands":
        path = sweep.out / "commands.txt"
        text = "".join(line + "\n" for line in lines)
    elif kind == "slurm":
        path = sweep.out / "sweep.slurm"
        text = _slurm_script(sweep)
    else:
        raise UserError(f"--emit takes slurm or commands, got '{kind}'")
    check_data(sweep, paths=False)
    check_writable(path)
    write_manifest(sweep)
    write_text_atomic(path, text)
    if kind == "slurm":
        path.chmod(0o755)
    return path


def _slurm_script(sweep: Sweep) -> str:
    out = shlex.quote(str(sweep.out))
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={_safe(Path(sweep.label).stem)}",
        f"#SBATCH --array=0-{len(sweep.runs) - 1}",
        f"#SBATCH --output={out}/slurm-%A_%a.out",
        f"# {plural(len(sweep.runs), 'run')} of the sweep {sweep.label}, one array task each: pretrain "
        "(resumed from latest when a task is requeued), then probe.",
        "# Add the --partition, --time, --gres and --cpus-per-task lines your cluster needs; submit with:",
        f"#   sbatch {shlex.quote(str(sweep.out / 'sweep.slurm'))}",
        "set -euo pipefail",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    body = []
    for i, run in enumerate(sweep.runs):
        body.append(f"  {i})  # {run.name}")
        body += [f"    {shlex.join(c)}" for c in commands(run)]
        body.append("    ;;")
    tail = ['  *) echo "no run for task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac"]
    return "\n".join(head + body + tail) + "\n"
