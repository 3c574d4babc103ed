"""`stoptool evaluate`: every task of a suite whose data is found, for every encoder given,
laid out as the paper's table.

Order of work: check everything a user can get wrong (the suite, the data of every task found,
every checkpoint or timm name, the output directory), then, encoder by encoder and task by
task, get the features and fit the protocol. Features come from the cache of
`stoptool.probe.features` in pieces of `chunk` images, and each task's result is written as
soon as it is known: run again, the command reuses finished results and cached pieces, so it
resumes where it stopped and extracts nothing twice.

One extraction serves a task's every head: the features are always the last four blocks'
pools (`last4`), whose last quarter is `last`.
"""

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stoptool.data.base import ImageDataset
from stoptool.data.transforms import MEAN, STD
from stoptool.errors import UserError
from stoptool.evaluate.config import EvaluateConfig
from stoptool.evaluate.heads import Recipe, best, columns, train_heads
from stoptool.evaluate.suite import Found, find_tasks, load_suite
from stoptool.evaluate.table import EvaluateReport
from stoptool.io.checkpoint import resolve_checkpoint
from stoptool.io.paths import check_file, check_writable, write_report, write_text_atomic
from stoptool.io.timm_source import check_source, is_timm, load_timm
from stoptool.options import KNN_FEATURES
from stoptool.probe.config import ProbeConfig
from stoptool.probe.features import (
    Features,
    ImageTransform,
    cache_key,
    dataset_fingerprint,
    default_cache_dir,
    encoder_fingerprint,
    extract_features,
    load_cached,
    resize_of,
    save_cached,
)
from stoptool.probe.knn import knn_probe
from stoptool.probe.linear import linear_probe
from stoptool.probe.logreg import logreg_probe
from stoptool.probe.run import load_encoder
from stoptool.probe.subset import balanced_subset
from stoptool.runs import RunLock
from stoptool.train.runtime import default_workers, resolve_device, resolve_precision

Progress = Callable[[str, int, int], None]  # (what, images done, images in it)


@dataclass
class Model:
    """One checkpoint argument, loaded: the frozen network and how to feed and name it."""

    net: torch.nn.Module
    arch: str | None
    img_size: int
    source: str
    label: str  # how the table names it
    meta: dict
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD


def check_sources(cfg: EvaluateConfig) -> list[str]:
    """The checkpoint arguments, each an existing checkpoint file (a run directory stands for
    its latest) or a timm model whose weights can be had."""
    out = []
    for arg in cfg.ckpts:
        if is_timm(arg):
            out.append(check_source(arg))
        else:
            out.append(str(check_file(resolve_checkpoint(arg), "checkpoint")))
    return out


def load_model(arg: str, cfg: EvaluateConfig) -> Model:
    if is_timm(arg):
        t = load_timm(arg, cfg.img_size)
        return Model(t.net, t.arch, t.img_size, t.source, t.source, t.meta, t.mean, t.std)
    enc = load_encoder(ProbeConfig(ckpt=arg, which=cfg.which, img_size=cfg.img_size))
    path = Path(arg)
    return Model(enc.net, enc.arch, enc.img_size, enc.source, f"{path.parent.name}/{path.name}", enc.meta)


class FeatureStore:
    """`last4` features of one model, in cached pieces of `chunk` images each."""

    def __init__(self, model: Model, cfg: EvaluateConfig, device: torch.device, precision: str,
                 progress: Progress | None, extracted: list[str]):
        self.model, self.cfg, self.device, self.precision = model, cfg, device, precision
        self.progress, self.extracted = progress, extracted
        self.encoder_hash = encoder_fingerprint(model.net)
        self.cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self._fingerprints: dict[int, str] = {}

    def fingerprint(self, data: ImageDataset) -> str:
        if id(data) not in self._fingerprints:
            self._fingerprints[id(data)] = dataset_fingerprint(data)
        return self._fingerprints[id(data)]

    def transform(self, data: ImageDataset, view: int | None = None) -> ImageTransform:
        m = self.model
        return ImageTransform(m.img_size, resize_of(data), view, self.cfg.seed, m.mean, m.std)

    def get(self, data: ImageDataset, split: str, what: str, view: int | None = None) -> Features:
        """The features of `data` (its `split`) with the evaluation transform, or training view
        `view`; `what` names them in the progress bar."""
        x, ys, filled, skipped = None, [], 0, 0
        for key, rows, transform in self._pieces(data, split, view):
            piece = load_cached(self.cache_dir, key)
            if piece is None:
                piece = self._extract(data, transform, rows, key, what)
            if x is None:  # filled in place: the pieces are never held twice
                x = np.empty((len(data), piece.x.shape[1]), dtype=np.float32)
            x[filled:filled + len(piece)] = piece.x
            filled += len(piece)
            ys.append(piece.y)
            skipped += piece.skipped
        return Features(x[:filled], np.concatenate(ys), skipped)

    def ensure(self, data: ImageDataset, split: str, what: str, view: int | None = None) -> None:
        """Extract and cache the pieces of `get` that are not cached yet, holding none."""
        for key, rows, transform in self._pieces(data, split, view):
            if not (self.cache_dir / f"{key}.npz").is_file():
                self._extract(data, transform, rows, key, what)

    def _pieces(self, data: ImageDataset, split: str, view: int | None):
        """(cache key, rows, transform) of each piece of `chunk` images."""
        n, chunk = len(data), self.cfg.chunk
        transform = self.transform(data, view)
        for start in range(0, n, chunk):
            rows = range(start, min(n, start + chunk))
            extra = transform.key()
            if n > chunk:
                extra = {**(extra or {}), "rows": [rows.start, rows.stop]}
            key = cache_key(self.encoder_hash, self.fingerprint(data), split, "last4", self.model.img_size,
                            self.precision, extra)
            yield key, rows, transform

    def _extract(self, data: ImageDataset, transform: ImageTransform, rows: range, key: str,
                 what: str) -> Features:
        cfg = self.cfg
        workers = cfg.workers
        if workers is None:
            workers = default_workers(self.device, in_memory=not hasattr(data, "files"))
        report = None
        if self.progress:
            report = lambda done, total: self.progress(what, rows.start + done, len(data))  # noqa: E731
        feats = extract_features(self.model.net, data, self.model.img_size, "last4", cfg.batch_size,
                                 self.device, self.precision, workers, report, transform, rows)
        save_cached(self.cache_dir, key, feats)
        self.extracted.append(f"{what} [{rows.start}:{rows.stop}]")
        return feats


def run_task(store: FeatureStore, found: Found, cfg: EvaluateConfig, device: torch.device) -> dict:
    """One task's result for the store's model: top-1/top-5 of the best head (or layers), and
    every head's numbers."""
    task, start = found.task, time.perf_counter()
    label = f"{store.model.label} {task.column}"
    test = store.get(found.test, "test", f"{label} test")
    num_classes = len(found.train.classes)
    width = test.x.shape[1] // 4
    out = {"protocol": task.protocol, "dataset": found.dataset, "classes": num_classes}
    if task.protocol == "paper":
        views = task.views

        def view_args(v: int) -> tuple:
            if views == 0:  # the centre crops: no augmentation
                return found.train, "train", f"{label} train"
            return found.train, "train", f"{label} train view {v + 1}/{views}", v

        for v in range(max(views, 1)):  # every view cached before the heads train: a stop loses no training
            store.ensure(*view_args(v))
        recipe = Recipe(task.epochs, cfg.lr, cfg.weight_decay, cfg.head_batch_size, cfg.seed)
        train = None

        def train_view(v: int) -> Features:
            nonlocal train
            train = store.get(*view_args(v))
            return train

        rows = train_heads(train_view, max(views, 1), test, width, num_classes, task.layers, recipe, device)
        out.update(views=views, recipe=asdict(recipe))
    else:
        train = store.get(found.train, "train", f"{label} train")
        idx = balanced_subset(train.y, task.fraction, cfg.seed)
        rows = [_fast(task.protocol, lay, train.x[idx], train.y[idx], test, width, num_classes, cfg.seed,
                      device) for lay in task.layers]
        out.update(fraction=task.fraction)
        train = Features(train.x[idx], train.y[idx], train.skipped)
    top = best(rows)
    out.update(top1=top["top1"], top5=top["top5"], best={k: top[k] for k in ("layers", "head") if k in top},
               heads=rows, train=int(len(train.y)), test=int(len(test.y)),
               skipped_images=int(train.skipped + test.skipped),
               seconds=round(time.perf_counter() - start, 3))
    return out


def _fast(method: str, layers: str, x_train, y_train, test: Features, width: int, num_classes: int, seed: int,
          device) -> dict:
    cols = columns(layers, width)
    args = (x_train[:, cols], y_train, test.x[:, cols], test.y, num_classes)
    if method == "logreg":
        res = logreg_probe(*args, seed=seed)
    elif method == "linear":
        res = linear_probe(*args, seed=seed, device=device)
    else:
        res = knn_probe(*args, device=device)
    return {"layers": layers, "head": method, "dim": cols.stop - cols.start, "top1": res["top1"],
            "top5": res["top5"], "params": res["params"]}


def result_key(store: FeatureStore, found: Found, cfg: EvaluateConfig) -> str:
    """What a task's result depends on: a result in the file with the same key is reused."""
    fields = {"encoder": store.encoder_hash, "dataset": found.dataset, "task": asdict(found.task),
              "train": store.fingerprint(found.train), "test": store.fingerprint(found.test),
              "img_size": store.model.img_size, "precision": store.precision, "seed": cfg.seed,
              "lr": cfg.lr, "weight_decay": cfg.weight_decay, "head_batch_size": cfg.head_batch_size,
              "mean": list(store.model.mean), "std": list(store.model.std)}
    if found.task.protocol == "knn":  # the k-NN's features (results written before it was whitened differ)
        fields["knn_features"] = KNN_FEATURES
    fields["task"].pop("column")
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _earlier(path: Path) -> dict[str, dict]:
    """Task results of an earlier run in `path`, by their keys."""
    try:
        doc = json.loads(path.read_text())
        results = [r for m in doc.get("models", []) for r in m.get("results", {}).values()]
        return {r["key"]: r for r in results if "key" in r}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def run_evaluate(cfg: EvaluateConfig, progress: Progress | None = None,
                 notify: Callable[[str], None] | None = None) -> EvaluateReport:
    """Evaluate per `cfg`: its protocol, views and epochs, when given, override the suite's
    tasks. `progress(what, done, total)` follows extraction; `notify` gets one-line notes."""
    cfg.validate()
    suite = load_suite(cfg.suite, {k: getattr(cfg, k) for k in ("protocol", "views", "epochs")})
    sources = check_sources(cfg)
    found, skipped = find_tasks(suite, cfg.data_root)
    if not found:
        why = "; ".join(f"{c}: {w}" for c, w in skipped)
        raise UserError(f"no data of the suite '{suite.name}' under '{cfg.data_root}' ({why})",
                        key="data_root")
    out_dir = Path(cfg.out).expanduser() if cfg.out else Path("runs") / "evaluate" / suite.name
    report = EvaluateReport(suite, [], skipped, out_dir / f"{suite.name}.json", out_dir / f"{suite.name}.md",
                            out_dir / f"{suite.name}.png")
    for path in (report.json_path, report.markdown_path, report.figure_path):
        if path.is_dir():
            raise UserError(f"output path '{path}' is a directory", key="out")
    check_writable(report.json_path, beside=(report.markdown_path.name, report.figure_path.name))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, fp16=False)
    for column, why in skipped:
        if notify:
            notify(f"skipped {column}: {why}")
    with RunLock(out_dir, "evaluate"):
        earlier = _earlier(report.json_path)
        for arg in sources:
            model = load_model(arg, cfg)
            store = FeatureStore(model, cfg, device, precision, progress, report.extracted)
            entry = {"label": model.label, "source": model.source, "arch": model.arch,
                     "encoder_sha256": store.encoder_hash, "img_size": model.img_size, "meta": model.meta,
                     "results": {}}
            report.models.append(entry)
            for f in found:
                key = result_key(store, f, cfg)
                if key in earlier:
                    entry["results"][f.task.column] = earlier[key]
                    report.reused += 1
                    continue
                entry["results"][f.task.column] = {**run_task(store, f, cfg, device), "key": key}
                write_report(report.json_path, report.to_dict())  # a stop keeps every finished task
        report.notes += _notes(report)
        write_report(report.json_path, report.to_dict())
        write_text_atomic(report.markdown_path, report.markdown())
    return report


def _notes(report: EvaluateReport) -> list[str]:
    notes = []
    for m in report.models:
        if m["meta"].get("pretrained") is False:
            notes.append(f"{m['source']} was built without its pretrained weights "
                         "(STOPTOOL_TIMM_RANDOM_WEIGHTS)")
        lost = sum(r.get("skipped_images", 0) for r in m["results"].values())
        if lost:
            notes.append(f"{m['label']}: {lost} unreadable images skipped")
    return notes
