"""`stoptool probe`: load a frozen encoder, get (cached) features, fit the probes, report.

Everything a user can get wrong (paths, names, sizes, fractions) is checked before any
feature is extracted or any file written.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from stoptool.data.datasets import (
    BUILTIN,
    ArrayDataset,
    FolderDataset,
    ImageDataset,
    has_labelled_splits,
    missing_dataset,
    open_dataset,
)
from stoptool.data.shards import is_prepared
from stoptool.data.transfer import parse_name
from stoptool.errors import UserError
from stoptool.io.paths import check_writable, write_report
from stoptool.models.archs import check_img_size, default_img_size, default_init
from stoptool.models.encoder import build_encoder
from stoptool.probe.config import ProbeConfig, knn_features_of
from stoptool.probe.features import (
    Features,
    cache_key,
    dataset_fingerprint,
    default_cache_dir,
    encoder_fingerprint,
    extract_features,
    load_cached,
    save_cached,
)
from stoptool.probe.knn import knn_probe
from stoptool.probe.linear import linear_probe
from stoptool.probe.logreg import logreg_probe
from stoptool.probe.subset import balanced_subset
from stoptool.train.runtime import default_workers, resolve_device, resolve_precision


@dataclass
class ProbeReport:
    rows: list[dict]
    info: dict
    json_path: Path
    extracted: list[str] = field(default_factory=list)  # splits computed (not from cache)
    notes: list[str] = field(default_factory=list)  # one line each, for the user

    COLUMNS = ("method", "layers", "train", "test", "dim", "top-1", "top-5", "seconds")

    def title(self) -> str:
        i = self.info
        return f"probe {i['encoder']} ({i['which']}, {i['arch']} @ {i['img_size']}px) on {i['dataset']}"

    def table(self) -> list[tuple[str, ...]]:
        """One row per method, as the table shows it (top-1 and top-5 in %; the k-NN's features
        named)."""
        out = []
        for r in self.rows:
            top5 = f"{100 * r['top5']:.2f}" if r["top5"] is not None else "-"
            train = f"{r['train']}" + (f" ({r['fraction']:g})" if r["fraction"] < 1 else "")
            top1 = f"{100 * r['top1']:.2f}"
            method = r["method"] + (f" ({knn_features_of(r)})" if r["method"] == "knn" else "")
            out.append((method, r["layers"], train, str(r["test"]), str(r["dim"]), top1, top5,
                        f"{r['seconds']:.1f}"))
        return out

    def closing(self) -> str:
        """Where the features came from and where the results went."""
        said = "features from cache" if not self.extracted else f"extracted: {', '.join(self.extracted)}"
        if self.info["skipped_images"]:
            said += f"; {self.info['skipped_images']} unreadable images skipped"
        return f"{said}; results in {self.json_path}"


@dataclass
class Encoder:
    net: torch.nn.Module
    arch: str
    img_size: int
    source: str  # checkpoint path or "random-init"
    meta: dict
    trained_on: tuple[str, str | None] | None = None  # (dataset, data_root) of the run, where it says


def load_encoder(cfg: ProbeConfig) -> Encoder:
    if cfg.which not in ("target", "context"):
        raise UserError(f"which must be target or context, got '{cfg.which}'", key="which")
    if cfg.random_init:
        if cfg.ckpt is not None:
            raise UserError("give either a checkpoint or random_init, not both", key="random_init")
        if cfg.arch is None:
            raise UserError("random_init needs an arch (e.g. vit_t4)", key="arch")
        img_size = default_img_size(cfg.arch) if cfg.img_size is None else cfg.img_size
        check_img_size(cfg.arch, img_size, "img_size")
        torch.manual_seed(cfg.seed)
        init = cfg.init or default_init(cfg.arch)
        return Encoder(build_encoder(cfg.arch, img_size, init).eval(), cfg.arch, img_size, "random-init",
                       {"seed": cfg.seed, "init": init})
    if cfg.ckpt is None:
        raise UserError("give a checkpoint to probe, or random_init with an arch")
    if cfg.arch is not None or cfg.init is not None:
        raise UserError("arch and init are for random_init; a checkpoint holds its own weights", key="arch")
    from stoptool.io.models import check_holds, load_model

    loaded = load_model(cfg.ckpt)
    check_holds(loaded.checkpoint, cfg.which, cfg.ckpt)
    meta = loaded.meta
    net = loaded.model.target_encoder if cfg.which == "target" else loaded.model.encoder
    arch, img_size = meta["arch"], meta["img_size"]
    if cfg.img_size is not None and cfg.img_size != img_size:
        check_img_size(arch, cfg.img_size, "img_size")
        # The positions are fixed sine-cosine, so the encoder is exact at any grid: rebuild
        # it for the new size and keep every trained weight.
        resized = build_encoder(arch, cfg.img_size, drawn=False)  # (the positions are made for the size)
        state = {k: v for k, v in net.state_dict().items() if k != "pos_embed"}
        resized.load_state_dict(state, strict=False)
        net, img_size = resized, cfg.img_size
    keep = ("kind", "arch", "img_size", "sigma", "step", "epoch", "source")
    trained = meta.get("config") or {}
    return Encoder(net.eval(), arch, img_size, str(cfg.ckpt), {k: meta[k] for k in keep if k in meta},
                   (trained["dataset"], trained.get("data_root")) if trained.get("dataset") else None)


def choose_data(cfg: ProbeConfig, enc: Encoder) -> tuple[ProbeConfig, str | None]:
    """`cfg` with its data set decided when none was given, and the line that says which: the
    set the encoder was trained on where it has labelled train and val splits, else digits."""
    if cfg.dataset is not None or cfg.train_dir or cfg.val_dir:
        return cfg, None
    if enc.trained_on is not None and has_labelled_splits(enc.trained_on[0]):
        name, root = enc.trained_on
        chosen = replace(cfg, dataset=name, data_root=cfg.data_root or root)
        return chosen, f"probing on {name}, the data set the encoder was trained on (its labelled splits)"
    if cfg.random_init:
        why = "give --dataset to choose another"
    elif enc.trained_on is not None:
        why = f"the data set the encoder was trained on, '{enc.trained_on[0]}', has no labelled val split"
    else:
        why = "the checkpoint does not name the data set it was trained on"
    return replace(cfg, dataset="digits"), f"probing on the bundled digits: {why}"


def open_splits(cfg: ProbeConfig) -> tuple[ImageDataset, ImageDataset, str]:
    """(train, test, tag): tag names the data set in file names and tables."""
    if cfg.train_dir or cfg.val_dir:
        if not (cfg.train_dir and cfg.val_dir):
            raise UserError("train_dir and val_dir go together", key="val_dir")
        train = FolderDataset(cfg.train_dir, cfg.subset)
        test = FolderDataset(cfg.val_dir)
        tag = Path(cfg.train_dir).resolve().parent.name or "folder"
    elif parse_name(cfg.dataset) is not None:  # a transfer set, read in its release layout
        train, test = (open_dataset(cfg.dataset, split, cfg.subset) for split in ("train", "val"))
        tag = parse_name(cfg.dataset)[0]
    elif cfg.dataset in BUILTIN:
        if cfg.subset is not None:
            raise UserError("subset keeps images of an ImageFolder tree; use it with a PATH data set",
                            key="subset")
        train = open_dataset(cfg.dataset, "train", root=cfg.data_root, download=cfg.download)
        test = open_dataset(cfg.dataset, "test", root=cfg.data_root)
        tag = cfg.dataset
    else:
        root = Path(cfg.dataset).expanduser()
        if not root.exists():
            raise missing_dataset(cfg.dataset, "digits, count, cifar10, cifar100 or a directory with train/ "
                                  "and val/ ImageFolder trees")
        if not root.is_dir():
            raise UserError(f"dataset path '{cfg.dataset}' is not a directory: give one with train/ and val/ "
                            "ImageFolder trees", key="dataset")
        if is_prepared(root):
            return _checked(open_dataset(str(root), "train", cfg.subset), open_dataset(str(root), "val"),
                            root.resolve().name)
        val = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if not (root / "train").is_dir() or val is None:
            raise UserError(
                f"'{root}' needs train/ and val/ sub-directories (ImageNet layout); "
                "or give --train-dir and --val-dir"
            )
        train = FolderDataset(root / "train", cfg.subset)
        test = FolderDataset(val)
        tag = root.resolve().name
    return _checked(train, test, tag)


def _checked(train: ImageDataset, test: ImageDataset, tag: str) -> tuple[ImageDataset, ImageDataset, str]:
    if list(train.classes) != list(test.classes):
        raise UserError(
            f"the training and test splits have different classes ({len(train.classes)} vs "
            f"{len(test.classes)}): they must hold the same class folders"
        )
    if len(train.classes) < 2:
        raise UserError(f"a probe needs at least 2 classes; the training split has {len(train.classes)}")
    return train, test, tag


def default_json_path(cfg: ProbeConfig, enc: Encoder, tag: str) -> Path:
    if cfg.out:
        return Path(cfg.out)
    tag = tag.replace("/", "_")
    if cfg.random_init:
        return Path("runs") / f"random-init-{enc.arch}-{enc.img_size}px.probe-{tag}.json"
    ckpt = Path(cfg.ckpt)
    return ckpt.with_name(f"{ckpt.stem}.probe-{tag}.json")


def feature_cache_dir(cfg: ProbeConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def get_features(enc: Encoder, data: ImageDataset, split: str, cfg: ProbeConfig,
                 device: torch.device, precision: str, enc_hash: str,
                 progress: Callable | None, extracted: list[str]) -> Features:
    key = cache_key(enc_hash, dataset_fingerprint(data), split, cfg.layers, enc.img_size, precision)
    cache_dir = feature_cache_dir(cfg)
    if cfg.cache:
        hit = load_cached(cache_dir, key)
        if hit is not None:
            return hit
    workers = cfg.workers if cfg.workers is not None else default_workers(
        device, isinstance(data, ArrayDataset))
    feats = extract_features(
        enc.net, data, enc.img_size, cfg.layers, cfg.batch_size, device, precision, workers,
        progress=(lambda done, total: progress(split, done, total)) if progress else None,
    )
    extracted.append(split)
    if cfg.cache:
        save_cached(cache_dir, key, feats)
    return feats


def run_probe(cfg: ProbeConfig, progress: Callable[[str, int, int], None] | None = None,
              notify: Callable[[str], None] | None = None) -> ProbeReport:
    """Probe per `cfg`. `progress(split, done, total)` is called during feature extraction;
    `notify(line)` first hears which data set is probed, where none was given."""
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, fp16=False)
    enc = load_encoder(cfg)
    cfg, said = choose_data(cfg, enc)
    train, test, tag = open_splits(cfg)
    json_path = default_json_path(cfg, enc, tag)
    if json_path.exists() and json_path.is_dir():
        raise UserError(f"output path '{json_path}' is a directory")
    check_writable(json_path)
    if cfg.cache:
        cache_dir = feature_cache_dir(cfg)
        if cache_dir.exists() and not cache_dir.is_dir():
            raise UserError(f"feature cache '{cache_dir}' is not a directory", key="cache_dir")
        check_writable(cache_dir / "features.npz")

    if said and notify:  # (once every input is checked: a refusal prints alone)
        notify(said)
    enc_hash = encoder_fingerprint(enc.net)
    extracted: list[str] = []
    f_train = get_features(enc, train, "train", cfg, device, precision, enc_hash, progress, extracted)
    f_test = get_features(enc, test, "test", cfg, device, precision, enc_hash, progress, extracted)
    idx = balanced_subset(f_train.y, cfg.fraction, cfg.seed)
    x_train, y_train = f_train.x[idx], f_train.y[idx]
    num_classes = len(train.classes)

    rows = []
    for method in cfg.methods():
        start = time.perf_counter()
        if method == "logreg":
            res = logreg_probe(x_train, y_train, f_test.x, f_test.y, num_classes, seed=cfg.seed)
        elif method == "linear":
            res = linear_probe(x_train, y_train, f_test.x, f_test.y, num_classes, seed=cfg.seed,
                               device=device)
        else:
            res = knn_probe(x_train, y_train, f_test.x, f_test.y, num_classes, features=cfg.knn_features,
                            device=device)
        rows.append({
            "method": method, "layers": cfg.layers, "fraction": cfg.fraction, "seed": cfg.seed,
            "precision": precision, "train": int(len(y_train)), "test": int(len(f_test.y)),
            "dim": int(x_train.shape[1]),
            "top1": res["top1"], "top5": res["top5"],
            "seconds": round(time.perf_counter() - start, 3), "params": res["params"],
        })

    info = {
        "encoder": enc.source, "which": "random-init" if cfg.random_init else cfg.which,
        "arch": enc.arch, "img_size": enc.img_size, "encoder_sha256": enc_hash,
        "checkpoint_meta": enc.meta, "dataset": tag, "classes": num_classes,
        "train_images": len(train), "test_images": len(test),
        "skipped_images": f_train.skipped + f_test.skipped, "precision": precision,
        "device": str(device), "seed": cfg.seed,
    }
    if cfg.subset is not None:
        info.update(subset=cfg.subset, subset_lines=train.subset_lines,
                    subset_unmatched=len(train.subset_unmatched))
    write_json(json_path, info, rows)
    return ProbeReport(rows, info, json_path, extracted, [n for n in (train.subset_note(),) if n])


def _row_key(row: dict) -> tuple:
    """What makes two rows different measurements: a new seed (another label subset, another
    init of the linear probe), precision or k-NN features adds a row instead of replacing one."""
    return (row["method"], row["layers"], row["fraction"], row.get("seed"), row.get("precision"),
            knn_features_of(row))


def write_json(path: Path, info: dict, rows: list[dict]) -> None:
    """Write the results; rows of other methods/layers/fractions/seeds/precisions already in the
    file for the same encoder and data set are kept, so successive probes add up."""
    kept = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            same = all(old.get(k) == info[k] for k in ("encoder_sha256", "dataset", "img_size", "which"))
            if same:
                new_keys = {_row_key(r) for r in rows}
                kept = [r for r in old.get("results", []) if _row_key(r) not in new_keys]
        except (ValueError, KeyError, TypeError, AttributeError):
            kept = []
    path.parent.mkdir(parents=True, exist_ok=True)
    write_report(path, {**info, "results": kept + rows})
