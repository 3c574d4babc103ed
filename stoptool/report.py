"""`stoptool report`: a sweep's probe results as mean ± sd per group, and paired differences.

Runs are grouped by the sweep's grid fields other than `seed` (or by the fields asked for).
Per group and metric: n, mean and the sample standard deviation. Against a baseline
(`FIELD=VALUE`), each group is paired with the group that differs from it in that field
alone, run by run over the seeds both have; the mean of the paired differences gets a 95 %
t-interval, mean ± t(0.975, n − 1) · sd / √n, with the t quantile computed here (the exact
Student-t distribution function for whole degrees of freedom, inverted by bisection).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stoptool.errors import UserError, plural
from stoptool.io.paths import check_writable, write_report, write_text_atomic
from stoptool.options import option
from stoptool.runs import CONFIG, SUMMARY, parse_assignment, read_config, read_json, run_state
from stoptool.sweep import MANIFEST, probe_metrics

LOSS = "loss"  # the final pretraining loss, from summary.json, reported beside the probe metrics


@dataclass
class ReportOptions:
    """`stoptool report`'s options (see `stoptool.options`)."""

    sweep_dir: str = option(None, "A sweep's directory (its --out), or any directory of run directories.",
                            argument=True, required=True, metavar="DIR")
    by: list[str] = option([], "Group by this config key (repeatable).", metavar="FIELD",
                           default_text="the grid's fields other than seed")
    baseline: str | None = option(None, "Also give each group's paired difference from the group with "
                                  "FIELD=VALUE (its other fields equal), over the seeds both have, with a "
                                  "95 % t-interval.", metavar="FIELD=VALUE")
    json: str | None = option(None, "Write the groups and statistics as JSON.", metavar="FILE")
    markdown: str | None = option(None, "Write the table as Markdown.", metavar="FILE")
    plot: str | None = option(None, "Draw each metric's group means with ± sd error bars (.png, .svg or "
                              ".pdf; the numbers go beside it as .json).", metavar="FILE")


@dataclass
class RunResult:
    name: str
    config: dict[str, Any]
    metrics: dict[str, float]


@dataclass
class Group:
    fields: dict[str, Any]
    runs: list[RunResult]
    stats: dict[str, dict] = field(default_factory=dict)  # metric -> n, mean, sd (, diff)


@dataclass
class Report:
    root: Path
    by: list[str]
    metrics: list[str]
    groups: list[Group]
    excluded: list[tuple[str, str]]  # (run, its state) of runs with no probe results
    baseline: tuple[str, Any] | None = None

    def to_dict(self) -> dict:
        return {
            "dir": str(self.root), "by": self.by, "unit": "% (probe top-1/top-5); loss as logged",
            "baseline": {"field": self.baseline[0], "value": self.baseline[1]} if self.baseline else None,
            "interval": "95 % Student-t interval of the mean paired difference over matching seeds",
            "groups": [{"fields": g.fields, "n": len(g.runs), "runs": [r.name for r in g.runs],
                        **{m: g.stats[m] for m in self.metrics if m in g.stats}} for g in self.groups],
            "excluded": [{"run": name, "state": state} for name, state in self.excluded],
        }


# -- statistics ------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n − 1 in the denominator; None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (a whole number ≥ 1) degrees of freedom: the closed
    forms of Abramowitz & Stegun 26.7.3 and 26.7.4, in θ = atan(t / √df)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2/π)(θ + sin θ (cos θ + 2/3 cos³θ + ... ))
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total) if df > 1 else 2 / math.pi * theta
    total, term = 0.0, 1.0  # even: sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t: t with P(|T| < t) = level (t(0.975, df)
    for 95 %), by bisection on `t_cdf_two_sided` to 1e-12."""
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < level:
        hi *= 2
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def paired_difference(values: dict[Any, float], baseline: dict[Any, float]) -> dict | None:
    """Mean, sd and 95 % t-interval of values[s] − baseline[s] over the seeds s both have."""
    seeds = [s for s in values if s in baseline]
    if not seeds:
        return None
    diffs = [values[s] - baseline[s] for s in seeds]
    mean, sd = mean_sd(diffs)
    out = {"n": len(diffs), "mean": mean, "sd": sd, "seeds": seeds, "low": None, "high": None, "t": None}
    if sd is not None:
        t = t_quantile(len(diffs) - 1)
        half = t * sd / math.sqrt(len(diffs))
        out.update(low=mean - half, high=mean + half, t=t)
    return out


# -- reading a sweep -------------------------------------------------------------------------


def read_runs(root: Path) -> tuple[list[str], list[RunResult], list[tuple[str, str]]]:
    """(grid fields, runs with probe results, (name, state) of the others) of a sweep directory:
    the runs its sweep.yaml lists, or, without one, every run directory under it (the fields are
    then the config keys whose values differ between them)."""
    if not root.is_dir():
        raise UserError(f"'{root}' is not a directory: give the --out of a sweep")
    manifest = _read_manifest(root / MANIFEST)
    if manifest:
        names, fields = manifest["runs"], list(manifest["grid"])
    else:
        names = sorted(p.name for p in root.iterdir() if (p / CONFIG).is_file())
        fields = None
    if not names:
        raise UserError(f"'{root}' holds no sweep: neither a {MANIFEST} nor run directories with a "
                        "config.yaml")
    done, excluded = [], []
    for name in names:
        config, state = read_config(root / name), run_state(root / name)
        if config is None or state.kind != "probed":
            excluded.append((name, str(state)))
            continue
        metrics = probe_metrics(root / name)
        summary = read_json(root / name / SUMMARY) or {}
        if summary.get(LOSS) is not None and summary.get("step") == state.step:
            metrics[LOSS] = summary[LOSS]
        done.append(RunResult(name, config, metrics))
    if fields is None:
        fields = [k for k in (done[0].config if done else {}) if k != "out"
                  and len({_key(r.config.get(k)) for r in done}) > 1]
    return fields, done, excluded


def _read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) \
            or not isinstance(data.get("grid"), dict):
        raise UserError(f"'{path}' is not a sweep manifest (written by stoptool sweep): remove it or fix it")
    return data


def _key(value: Any) -> str:
    """A value as groups compare it: 0 and 0.0 alike, lists as tuples."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{float(value):.12g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_key(v) for v in value)
    return str(value)


# -- the report ------------------------------------------------------------------------------


def make_report(root: str | Path, by: list[str] | None = None, baseline: str | None = None) -> Report:
    """Group the probed runs of the sweep in `root`, with per-metric statistics and, for
    `baseline` ("FIELD=VALUE"), the paired differences from it."""
    root = Path(root)
    fields, runs, excluded = read_runs(root)
    if not runs:
        listed = "; ".join(f"{n}: {s}" for n, s in excluded[:3]) + ("; ..." if len(excluded) > 3 else "")
        raise UserError(f"no run in '{root}' has probe results yet ({plural(len(excluded), 'run')}: "
                        f"{listed})")
    group_by = list(by) if by else [f for f in fields if f != "seed"]
    unknown = [f for f in group_by if f not in runs[0].config]
    if unknown:
        raise UserError(f"--by {unknown[0]}: not a config key of these runs (the grid's fields: "
                        f"{', '.join(fields) or 'none'})")
    base = _parse_baseline(baseline, group_by, runs) if baseline else None
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = tuple(_key(r.config[f]) for f in group_by)
        groups.setdefault(key, Group({f: r.config[f] for f in group_by}, [])).runs.append(r)
    metrics = sorted({m for r in runs for m in r.metrics}, key=lambda m: (m == LOSS, m))
    for g in groups.values():
        g.stats = _group_stats(g, metrics)
    if base:
        _add_differences(groups, group_by, base, metrics)
    return Report(root, group_by, metrics, list(groups.values()), excluded, base)


def _parse_baseline(text: str, group_by: list[str], runs: list[RunResult]) -> tuple[str, Any]:
    name, value = parse_assignment(text, "--baseline", "FIELD=VALUE, e.g. sigma=0")
    if name not in group_by:
        raise UserError(f"--baseline {name}: the groups are by {', '.join(group_by) or 'nothing'}; "
                        "the baseline must name one of those fields")
    if not any(_key(r.config[name]) == _key(value) for r in runs):
        seen = sorted({_key(r.config[name]) for r in runs})
        raise UserError(f"--baseline {text}: no probed run has {name}={_key(value)} (it takes "
                        f"{', '.join(seen)})")
    return name, value


def _group_stats(group: Group, metrics: list[str]) -> dict[str, dict]:
    stats = {}
    for m in metrics:
        values = [r.metrics[m] for r in group.runs if m in r.metrics]
        if values:
            mean, sd = mean_sd(values)
            stats[m] = {"n": len(values), "mean": mean, "sd": sd, "values": values}
    return stats


def _add_differences(groups: dict[tuple, Group], group_by: list[str], base: tuple[str, Any],
                     metrics: list[str]) -> None:
    field_name, value = base
    i = group_by.index(field_name)
    for key, g in groups.items():
        partner = groups.get(key[:i] + (_key(value),) + key[i + 1:])
        if partner is None or partner is g:
            continue
        for m in metrics:
            mine = {_key(r.config.get("seed")): r.metrics[m] for r in g.runs if m in r.metrics}
            theirs = {_key(r.config.get("seed")): r.metrics[m] for r in partner.runs if m in r.metrics}
            diff = paired_difference(mine, theirs)
            if diff is not None and m in g.stats:
                g.stats[m]["diff"] = diff


# -- output ----------------------------------------------------------------------------------


def cell(stats: dict | None) -> str:
    """mean ± sd, to 2 decimals (4 for values under 1, such as a loss)."""
    if not stats:
        return "-"
    digits = 4 if abs(stats["mean"]) < 1 else 2
    sd = f" ± {stats['sd']:.{digits}f}" if stats["sd"] is not None else ""
    return f"{stats['mean']:.{digits}f}{sd}"


def diff_cell(stats: dict | None, is_baseline: bool) -> str:
    """The paired difference from the baseline and its 95 % interval: +1.23 [-0.40, +2.86] (n = 3)."""
    if is_baseline:
        return "baseline"
    d = (stats or {}).get("diff")
    if not d:
        return "-"
    digits = 4 if abs(stats["mean"]) < 1 else 2
    if d["low"] is None:
        return f"{d['mean']:+.{digits}f} (n = 1, no interval)"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] (n = {d['n']})"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """The report as a header and rows of text: the group's fields, n, each metric's mean ± sd
    and, with a baseline, its paired difference [95 % interval]."""
    header = [*report.by, "n"]
    for m in report.metrics:
        header.append(m)
        if report.baseline:
            header.append(f"Δ {m} vs {report.baseline[0]}={_key(report.baseline[1])} (95 % CI)")
    rows = []
    for g in report.groups:
        row = [_key(g.fields[f]) for f in report.by] + [str(len(g.runs))]
        is_base = bool(report.baseline) and _key(g.fields[report.baseline[0]]) == _key(report.baseline[1])
        for m in report.metrics:
            row.append(cell(g.stats.get(m)))
            if report.baseline:
                row.append(diff_cell(g.stats.get(m), is_base))
        rows.append(row)
    return header, rows


def markdown(report: Report) -> str:
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if report.excluded:
        listed = "; ".join(f"{n} ({s})" for n, s in report.excluded)
        lines += ["", f"Not included (no probe results): {listed}."]
    return "\n".join(lines) + "\n"


def check_outputs(json_path: Path | None, md_path: Path | None, plot_path: Path | None) -> Path | None:
    """Refuse output paths that cannot be written, before any is; the figure's path with its
    extension (.png when it has none)."""
    for path in (json_path, md_path):
        if path is not None:
            if path.is_dir():
                raise UserError(f"'{path}' is a directory; give a file name")
            check_writable(path)
    if plot_path is None:
        return None
    from stoptool.viz.common import check_out  # (matplotlib: only when a figure is asked for)

    try:
        return check_out(plot_path, plot_path)
    except UserError as err:
        raise UserError(str(err).replace("out '", "--plot '")) from None


def write_outputs(report: Report, json_path: Path | None, md_path: Path | None) -> None:
    if json_path is not None:
        write_report(json_path, report.to_dict())
    if md_path is not None:
        write_text_atomic(md_path, markdown(report))


def error_bars(metric: str, stats: list[dict]) -> list[list[float]]:
    """[below, above] each mean: ± sd, cut at the ends of the metric's range (0 to 100 % for
    an accuracy; no lower bound than 0 for the loss), where a bar would otherwise claim values
    the metric cannot take."""
    low, high = (0.0, float("inf")) if metric == LOSS else (0.0, 100.0)
    below = [min(s["sd"] or 0.0, s["mean"] - low) for s in stats]
    above = [min(s["sd"] or 0.0, high - s["mean"]) for s in stats]
    return [below, above]


def plot(report: Report, path: Path, dpi: int = 150) -> Path:
    """Each metric's group means with ± sd error bars (cut at the metric's range, see
    `error_bars`) and the single runs as dots, one panel per metric; the report's JSON goes
    beside the figure."""
    from matplotlib.figure import Figure

    from stoptool.viz.common import save_figure

    labels = [",".join(f"{f}={_key(g.fields[f])}" for f in report.by) or "all" for g in report.groups]
    fig = Figure(figsize=(max(6.0, 1.1 * len(labels) + 1.5), 3.2 * len(report.metrics)))
    axes = fig.subplots(len(report.metrics), 1, squeeze=False)[:, 0]
    for ax, m in zip(axes, report.metrics):
        xs = [i for i, g in enumerate(report.groups) if m in g.stats]
        stats = [report.groups[i].stats[m] for i in xs]
        ax.errorbar(xs, [s["mean"] for s in stats], yerr=error_bars(m, stats), fmt="o", capsize=4,
                    color="C0", label="mean ± sd")
        for x, s in zip(xs, stats):
            ax.plot([x] * len(s["values"]), s["values"], ".", color="0.5", alpha=0.7)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(m + (" (%)" if m != LOSS else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"{report.root.name}: mean ± sd over seeds (dots: single runs)", fontsize=10)
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi)
    write_report(path.with_suffix(".json"), report.to_dict())
    return path
