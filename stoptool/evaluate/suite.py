"""Suites of evaluation tasks: the paper's Table 4 and Table 1 ship as presets
(`stoptool/configs/evaluate/*.yaml`), and any YAML file of the same shape names others.

A suite file holds a `title`, its `tasks` and the paper's rows to print beside the results:

    title: "Table 4: linear probes on transfer tasks (top-1 %)"
    tasks:
      - column: CLEVR/Count              # the table's column
        dataset: clevr-count:CLEVR_v1.0  # as probe's --dataset; paths are under --data-root
        protocol: paper                  # optional: paper | logreg | linear | knn
        layers: [last, last4]            # optional: which pooled features compete
        views: 4                         # optional (paper protocol): augmented views per image
        epochs: 50                       # optional (paper protocol)
        subset: imagenet/1percent.txt    # optional: a subset file under --data-root
        fraction: 1.0                    # optional (fast protocols): share of the training labels
    paper:
      - {method: StoP, arch: vit_b16, CLEVR/Count: 83.7}

A task whose data is not under the data root is skipped with the reason; one whose data is
there but not as its release lays it out stops the command with one line, before any work.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

from stoptool.config import read_config_file
from stoptool.data.base import ImageDataset
from stoptool.data.cifar import RELEASES
from stoptool.data.datasets import BUILTIN
from stoptool.data.transfer import parse_name
from stoptool.errors import UserError
from stoptool.evaluate.config import EPOCHS, PROTOCOLS, VIEWS
from stoptool.models.archs import parse_arch
from stoptool.probe.config import LAYERS, ProbeConfig
from stoptool.probe.run import open_splits

TASK_KEYS = ("column", "dataset", "protocol", "layers", "views", "epochs", "subset", "fraction")


@dataclass(frozen=True)
class Task:
    column: str
    dataset: str  # as the suite writes it: relative to the data root
    protocol: str = "paper"
    layers: tuple[str, ...] = LAYERS
    views: int = VIEWS
    epochs: int = EPOCHS
    subset: str | None = None
    fraction: float = 1.0


@dataclass
class Suite:
    name: str
    title: str
    tasks: list[Task]
    paper: list[dict] = field(default_factory=list)  # {"method", "arch", "values": {column: top-1 %}}

    @property
    def columns(self) -> list[str]:
        return [t.column for t in self.tasks]


@dataclass
class Found:
    """A task whose data is there, opened."""

    task: Task
    train: ImageDataset
    test: ImageDataset
    dataset: str  # the resolved name: a path under the data root, KIND:PATH, or a built-in name


def load_suite(name: str, overrides: dict | None = None) -> Suite:
    """The suite preset `name` or YAML file, with `overrides` (protocol, views, epochs) applied
    to every task."""
    doc = read_config_file(name, "evaluate", what="suite")
    what = f"suite '{name}'"
    unknown = sorted(set(doc) - {"title", "tasks", "paper"})
    if unknown:
        raise UserError(f"{what}: unknown key '{unknown[0]}' (a suite has title, tasks and paper)",
                        key="suite")
    if not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise UserError(f"{what} names no tasks: give a list under 'tasks'", key="suite")
    tasks = [_task(t, i, what) for i, t in enumerate(doc["tasks"])]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    tasks = [replace(t, **given) for t in tasks]
    columns = [t.column for t in tasks]
    if len(set(columns)) != len(columns):
        raise UserError(f"{what} names a column twice: each task needs its own", key="suite")
    paper = [_paper_row(r, columns, what) for r in doc.get("paper") or []]
    return Suite(Path(name).stem, str(doc.get("title") or Path(name).stem), tasks, paper)


def _task(entry, index: int, what: str) -> Task:
    if not isinstance(entry, dict) or "column" not in entry or "dataset" not in entry:
        raise UserError(f"{what}: task {index + 1} needs a column and a dataset", key="suite")
    unknown = sorted(set(entry) - set(TASK_KEYS))
    if unknown:
        raise UserError(f"{what}: task {index + 1} has an unknown key '{unknown[0]}' "
                        f"(keys: {', '.join(TASK_KEYS)})", key="suite")
    values = {k: entry[k] for k in TASK_KEYS if k in entry}
    values["column"], values["dataset"] = str(values["column"]), str(values["dataset"])
    where = f"{what}: task {values['column']}"
    if "layers" in values:
        layers = values["layers"] if isinstance(values["layers"], list) else [values["layers"]]
        if not layers or any(layer not in LAYERS for layer in layers):
            raise UserError(f"{where}: layers are among {', '.join(LAYERS)}", key="suite")
        values["layers"] = tuple(layers)
    if values.get("protocol", "paper") not in PROTOCOLS:
        raise UserError(f"{where}: protocol is one of {', '.join(PROTOCOLS)}", key="suite")
    for key, low in (("views", 0), ("epochs", 1)):
        if key in values and (not isinstance(values[key], int) or values[key] < low):
            raise UserError(f"{where}: {key} must be an integer >= {low}", key="suite")
    fraction = values.get("fraction", 1.0)
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise UserError(f"{where}: fraction must be in (0, 1]", key="suite")
    return Task(**values)


def _paper_row(row, columns: list[str], what: str) -> dict:
    if not isinstance(row, dict) or "method" not in row or "arch" not in row:
        raise UserError(f"{what}: each paper row needs a method and an arch", key="suite")
    parse_arch(str(row["arch"]))
    values = {k: float(v) for k, v in row.items() if k not in ("method", "arch")}
    stray = [k for k in values if k not in columns]
    if stray:
        raise UserError(f"{what}: a paper row names the column '{stray[0]}', which no task has", key="suite")
    return {"method": str(row["method"]), "arch": str(row["arch"]), "values": values}


def resolve(dataset: str, data_root: Path) -> tuple[str, Path | None]:
    """(name to open, the path that must exist for it) of a suite's data set under `data_root`:
    a built-in name stays itself (CIFAR's release must be in the data root), `KIND:REL` becomes
    `KIND:ROOT/REL`, and any other name a path under the root."""
    transfer = parse_name(dataset)
    if transfer is not None:
        path = data_root / transfer[1]
        return f"{transfer[0]}:{path}", path
    if dataset in BUILTIN:
        release = RELEASES.get(dataset)
        if release is None:
            return dataset, None
        folder, archive = data_root / release.folder, data_root / release.archive
        return dataset, archive if archive.is_file() or not folder.exists() else folder
    path = data_root / dataset
    return str(path), path


def find_tasks(suite: Suite, data_root: str | Path) -> tuple[list[Found], list[tuple[str, str]]]:
    """The tasks whose data lies under `data_root`, opened (train and test splits), and the
    others as (column, why it was skipped)."""
    root = Path(data_root).expanduser().resolve()  # (results and caches must not depend on the cwd)
    found, skipped, opened = [], [], {}
    for task in suite.tasks:
        name, needed = resolve(task.dataset, root)
        subset = str(root / task.subset) if task.subset else None
        missing = [p for p in (needed, Path(subset) if subset else None) if p is not None and not p.exists()]
        if missing:
            skipped.append((task.column, f"no {missing[0]}"))
            continue
        if (name, subset) not in opened:
            train, test, _ = open_splits(ProbeConfig(dataset=name, data_root=str(root), subset=subset))
            opened[(name, subset)] = (train, test)
        found.append(Found(task, *opened[(name, subset)], name))
    return found, skipped


def arch_label(arch: str | None) -> str:
    """`vit_l16` -> ViT-L/16, as the paper writes it."""
    if not arch:
        return "-"
    letter, patch = arch[len("vit_")], arch[len("vit_") + 1:]
    return f"ViT-{letter.upper()}/{patch}"
