"""The result of `stoptool evaluate` laid out as the paper's table: one row per encoder, the
paper's rows of the same arch right below, one column per task (top-1 %), as the terminal, a
Markdown file and the JSON show it."""

from dataclasses import dataclass, field
from pathlib import Path

from stoptool.evaluate.suite import Suite, arch_label


@dataclass
class EvaluateReport:
    suite: Suite
    models: list[dict]  # label, source, arch, encoder_sha256, meta, results {column: result}
    skipped: list[tuple[str, str]]  # (column, why)
    json_path: Path
    markdown_path: Path
    figure_path: Path
    extracted: list[str] = field(default_factory=list)  # feature pieces computed by this run
    reused: int = 0  # task results taken from an earlier run
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        return self.suite.columns

    def header(self) -> tuple[str, ...]:
        return ("model", "arch", *self.columns)

    def title(self) -> str:
        return f"{self.suite.title} [{self.suite.name}]"

    def ordered(self) -> list[dict]:
        """The table's rows in order: {name, arch, paper (bool), values {column: top-1 % or None}}.
        Encoders are grouped by arch, in the order given; below each group, the paper's rows of
        that arch; the paper's other rows close the table."""
        rows, shown, archs = [], set(), []
        for m in self.models:
            if m["arch"] not in archs:
                archs.append(m["arch"])
        for arch in archs:
            for m in self.models:
                if m["arch"] == arch:
                    results = m["results"]
                    values = {c: 100 * results[c]["top1"] if c in results else None for c in self.columns}
                    rows.append({"name": m["label"], "arch": arch, "paper": False, "values": values})
            rows += [_paper(i, p, self.columns) for i, p in enumerate(self.suite.paper) if p["arch"] == arch]
            shown |= {i for i, p in enumerate(self.suite.paper) if p["arch"] == arch}
        rows += [_paper(i, p, self.columns) for i, p in enumerate(self.suite.paper) if i not in shown]
        return rows

    def table(self) -> list[tuple[str, ...]]:
        return [(r["name"], arch_label(r["arch"]), *(_cell(r["values"][c]) for c in self.columns))
                for r in self.ordered()]

    def markdown(self) -> str:
        head = self.header()
        lines = [f"# {self.suite.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.ordered():
            name = f"*{r['name']}*" if r["paper"] else f"**{r['name']}**"
            cells = [name, arch_label(r["arch"]), *(_cell(r["values"][c]) for c in self.columns)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Top-1 % on each task's test split. Bold: measured here; italic: the paper's numbers."]
        protocols = sorted({res.get("protocol", "?") for m in self.models for res in m["results"].values()})
        if protocols:
            lines.append(f"Protocol: {', '.join(protocols)} (see docs/reproducing.md).")
        lines += [f"Skipped {c}: {why}." for c, why in self.skipped]
        return "\n".join(lines) + "\n"

    def closing(self) -> str:
        said = f"extracted {len(self.extracted)} feature pieces" if self.extracted else "features from cache"
        if self.reused:
            said += f"; {self.reused} task results from the earlier run"
        return f"{said}; results in {self.json_path}, {self.markdown_path.name}, {self.figure_path.name}"

    def to_dict(self) -> dict:
        return {"suite": self.suite.name, "title": self.suite.title, "columns": self.columns,
                "skipped": [{"column": c, "reason": why} for c, why in self.skipped],
                "models": self.models, "paper": self.suite.paper, "table": self.ordered()}


def _paper(index: int, row: dict, columns: list[str]) -> dict:
    return {"name": f"paper: {row['method']}", "arch": row["arch"], "paper": True,
            "values": {c: row["values"].get(c) for c in columns}}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
