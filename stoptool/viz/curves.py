"""Training curves (paper Fig. 4): loss, lr, ‖A‖ and ‖m̃‖ against step, runs overlaid.

Reads what `stoptool pretrain` writes in a run directory: `metrics.jsonl` (one JSON row per
logged step) and `config.yaml` (for σ). In a σ sweep the paper's finding shows up here: the
larger σ, the smaller ‖A‖ (the noise is A n, so shrinking A shrinks it) and the larger the
shared mask token ‖m̃‖.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from stoptool.errors import UserError
from stoptool.viz.common import (
    FigureResult,
    check_dpi,
    check_out,
    default_path,
    save_figure,
    write_json,
)

METRICS = "metrics.jsonl"
PANELS = (
    ("loss", "loss (smooth L1)"),
    ("lr", "learning rate"),
    ("A_norm", "‖A‖ (Frobenius)"),
    ("mask_token_norm", "‖m̃‖ (mask token)"),
)
# drawn when a run logged them (the online k-NN, the health metrics: docs/monitoring.md)
EXTRA_PANELS = (
    ("knn_top1", "online k-NN top-1"),
    ("rankme", "RankMe (target features)"),
)
FIGSIZE = (10.0, 7.0)
FEW_POINTS = 5  # a run logged at fewer steps than this draws straight lines between them: said so


@dataclass
class Run:
    path: Path
    sigma: float | None
    rows: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        sigma = "σ = ?" if self.sigma is None else f"σ = {self.sigma:g}"
        return f"{sigma} ({self.path.name or self.path.resolve().name})"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in self.rows if key in r and "step" in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def sparse_note(self) -> str | None:
        """What to say of a run logged at too few steps for a curve, with the flag that gives more."""
        steps = self.series("loss")[0]
        if len(steps) >= FEW_POINTS:
            return None
        every = max(1, (steps[-1] if steps else 1) // 25)
        return (f"{self.label}: {len(steps)} logged step{'s' * (len(steps) != 1)}, so its lines are straight "
                f"between them; pretrain with --log-every {every} for a curve")


def read_run(run_dir: str | Path) -> Run:
    """The metrics log and σ of a run directory; a UserError if there is no log to read."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory '{run_dir}' does not exist")
    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is a file; viz curves takes run directories")
    log = run_dir / METRICS
    if not log.is_file():
        raise UserError(
            f"'{run_dir}' has no {METRICS}: not a stoptool run directory "
            "(stoptool pretrain writes one)"
        )
    try:
        lines = log.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"'{log}' is not text: not a metrics log written by stoptool pretrain") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run still writing may leave half a line at the end
                break
            raise UserError(f"'{log}' line {number} is not valid JSON") from None
        if not _is_metrics_row(row):
            raise UserError(f"'{log}' line {number} is not a metrics row (an object with a numeric step)")
        rows.append(row)
    if not rows:
        raise UserError(f"'{log}' holds no logged steps yet")
    return Run(run_dir, _sigma(run_dir), rows)


def _is_metrics_row(row) -> bool:
    """A JSON object whose step and plotted values, where present, are numbers."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return (
        isinstance(row, dict) and number(row.get("step"))
        and all(number(row[key]) for key, _ in PANELS + EXTRA_PANELS if row.get(key) is not None)
    )


def _sigma(run_dir: Path) -> float | None:
    config = run_dir / "config.yaml"
    try:
        sigma = (yaml.safe_load(config.read_text()) or {}).get("sigma")
        return float(sigma) if sigma is not None else None
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None


def draw_curves(runs: Sequence[Run], title: str = "") -> Figure:
    """A grid of panels, one line per run (2 × 2, or 2 × 3 with the online k-NN and RankMe when
    a run logged them); the legend names each run and its σ."""
    panels = PANELS + tuple(p for p in EXTRA_PANELS if any(run.series(p[0])[0] for run in runs))
    cols = (len(panels) + 1) // 2
    fig = Figure(figsize=(FIGSIZE[0] * cols / 2, FIGSIZE[1]), layout="constrained")
    fig.suptitle(title or "Training curves")
    axes = list(fig.subplots(2, cols).flat)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    ordered = sorted(runs, key=lambda r: (r.sigma is None, r.sigma or 0.0))
    for ax, (key, name) in zip(axes, panels):
        for run in ordered:
            steps, values = run.series(key)
            dots = key == "knn_top1" or run.sparse_note() is not None  # (the points are all there is)
            ax.plot(steps, values, label=run.label, linewidth=1.5, marker="o" if dots else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles, labels = next(iter(fig.axes)).get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=9)
    notes = [n for n in (run.sparse_note() for run in ordered) if n]
    if notes:
        fig.text(0.5, 0.0, "\n".join(notes), ha="center", va="bottom", fontsize=8, color="0.35")
        fig.get_layout_engine().set(rect=(0, 0.04 * len(notes), 1, 1 - 0.04 * len(notes)))
    return fig


def make_curves(
    run_dirs: Sequence[str | Path], out: str | Path | None = None, dpi: int = 150
) -> FigureResult:
    """Read every run first (so a bad one writes nothing), then draw and write the figure."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    path = check_out(out, default_path(Path(run_dirs[0]), "curves"))
    check_dpi(dpi)
    runs = [read_run(d) for d in run_dirs]
    title = "Training curves" + (" (σ sweep)" if len({r.sigma for r in runs}) > 1 else "")
    save_figure(draw_curves(runs, title), path, dpi)
    data = {"runs": [{"run": str(r.path), "sigma": r.sigma, "last": r.rows[-1]} for r in runs]}
    rows = {}
    for r in runs:
        last = {"loss": float("nan"), "A_norm": float("nan"), "mask_token_norm": float("nan"),
                **r.rows[-1]}
        rows[r.label] = (
            f"step {last.get('step')}  loss {last['loss']:.4f}  ‖A‖ {last['A_norm']:.3f}  "
            f"‖m̃‖ {last['mask_token_norm']:.3f}"
        )
        if r.sparse_note():
            rows[f"note ({r.label})"] = r.sparse_note().split(": ", 1)[1]
    return FigureResult(path, write_json(path.with_suffix(".json"), data), rows)
