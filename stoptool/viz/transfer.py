"""The bar chart of `stoptool evaluate`: top-1 per task, one bar per row of its table (the
encoders measured, solid; the paper's rows, hatched and lighter), grouped by task."""

from pathlib import Path

from matplotlib.figure import Figure

from stoptool.evaluate.suite import arch_label
from stoptool.evaluate.table import EvaluateReport
from stoptool.viz.common import save_figure


def draw_chart(report: EvaluateReport, path: Path | None = None, dpi: int = 150) -> Path:
    """Draw the report's table as grouped bars into `path` (its figure path by default)."""
    path = Path(path) if path is not None else report.figure_path
    rows, columns = report.ordered(), report.columns
    fig = Figure(figsize=(max(6.0, 1.6 * len(columns) + 2.0), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    for k, row in enumerate(rows):
        xs = [i - 0.4 + (k + 0.5) * width for i in range(len(columns))]
        heights = [row["values"][c] if row["values"][c] is not None else 0.0 for c in columns]
        label = f"{row['name']} ({arch_label(row['arch'])})"
        style = {"alpha": 0.45, "hatch": "//", "edgecolor": "0.3"} if row["paper"] else {}
        bars = ax.bar(xs, heights, width, label=label, color=f"C{k % 10}", **style)
        for bar, value in zip(bars, (row["values"][c] for c in columns)):
            if value is None:  # a task not measured: no bar, a dash where it would stand
                bar.set_visible(False)
                ax.text(bar.get_x() + bar.get_width() / 2, 1.0, "-", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(columns)), columns, fontsize=9)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(report.suite.title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.subplots_adjust(left=0.08, right=0.68, bottom=0.12, top=0.9)
    return save_figure(fig, path, dpi)
