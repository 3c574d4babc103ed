"""`stoptool probe`'s options, declared once (see `stoptool.options`): the flags, the sweep
specs' `probe` section and the online k-NN all build a `ProbeConfig`. A light module: reading
it loads neither timm nor scikit-learn."""

from dataclasses import dataclass
from typing import Literal

from stoptool.errors import UserError
from stoptool.io.checkpoint import resolve_checkpoint
from stoptool.io.paths import check_file
from stoptool.models.archs import Init
from stoptool.options import KNN_FEATURES, KNN_FEATURES_HELP, KnnFeatures, Precision, check_fields, option

METHODS = ("logreg", "linear", "knn")
LAYERS = ("last", "last4")


@dataclass
class ProbeConfig:
    """`stoptool probe`: which encoder, on which data, how. Checks itself (`validate`)."""

    ckpt: str | None = option(
        None, "A stoptool checkpoint (pretrain, imported or encoder-only), or a run directory (its latest).",
        argument=True, default_text="none")
    dataset: str | None = option(
        None, "digits (bundled) | count (synthetic, drawn on demand) | cifar10 | cifar100 | PATH with "
        "train/ and val/ (or test/) ImageFolder trees, or a set stoptool prepare wrote | clevr-count:PATH | "
        "clevr-dist:PATH | inat18:PATH | places205:PATH (the transfer sets in their release layouts).",
        default_text="the data set the checkpoint was trained on, where it has labelled train and val "
        "splits; else digits")
    data_root: str | None = option(None, "Where CIFAR's release archive or extracted folder lives.",
                                   default_text="~/.cache/stoptool/data")
    download: bool = option(False, "Fetch the CIFAR archive into --data-root when it is missing.",
                            flags=("--download",))
    train_dir: str | None = option(
        None, "ImageFolder tree of training images (with --val-dir, instead of --dataset).")
    val_dir: str | None = option(None, "ImageFolder tree of test images.")
    subset: str | None = option(
        None, "Keep only the training images named in this file, one file name per line (the 1 % ImageNet "
        "subset format).")
    fraction: float = option(1.0, "Class-balanced, seeded share of the training labels to use, in (0, 1].")
    layers: Literal[LAYERS] = option(
        "last", "last: average-pooled last block | last4: the last four blocks' pools concatenated.")
    method: Literal[METHODS + ("all",)] = option(
        "logreg", "logreg (scikit-learn) | linear (torch, GPU) | knn (cosine, k=20) | all.")
    knn_features: KnnFeatures = option(KNN_FEATURES, "Features of --method knn: " + KNN_FEATURES_HELP)
    img_size: int | None = option(
        None, "Evaluation image size (resize + centre crop).", positive=True,
        default_text="the checkpoint's; with --random-init, as pretrain: 8 patches a side for patches of "
        "4 px or less, else 224")
    which: Literal["target", "context"] = option(
        "target", "Which encoder of a pretrain checkpoint: target (EMA, the one the paper evaluates) | "
        "context.")
    random_init: bool = option(False, "Probe an untrained encoder of --arch (seeded): the baseline.",
                               flags=("--random-init",))
    arch: str | None = option(None, "Arch of the --random-init encoder, e.g. vit_t4.")
    init: Init | None = option(
        None, "How the --random-init encoder is drawn: released | timm.",
        default_text="as pretrain draws that arch: released; timm for patches of 4 px or less")
    batch_size: int = option(128, "Images per batch during feature extraction.", positive=True)
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: Precision = option(
        "auto", "Extraction precision: auto (bf16 where fast, else fp32) | bf16 | fp16 | fp32.")
    workers: int | None = option(None, "Data loader workers for extraction.", low=0, default_text="auto")
    cache_dir: str | None = option(None, "Feature cache directory.",
                                   default_text="~/.cache/stoptool/features")
    cache: bool = option(True, "Reuse and store extracted features.")
    seed: int = option(0, "Seed of --fraction, the held-out split, the linear probe and --random-init.",
                       low=0, high=2**32 - 1)
    out: str | None = option(
        None, "JSON results file.",
        default_text="<ckpt stem>.probe-<dataset>.json beside the checkpoint; "
        "runs/random-init-<arch>-<size>px.probe-<dataset>.json with --random-init")

    def validate(self) -> "ProbeConfig":
        check_fields(self)
        if not 0 < self.fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {self.fraction}", key="fraction")
        if self.ckpt is not None:  # a run directory stands for its latest
            self.ckpt = str(check_file(resolve_checkpoint(self.ckpt), "checkpoint"))
        return self

    def methods(self) -> tuple[str, ...]:
        return METHODS if self.method == "all" else (self.method,)


def knn_features_of(row: dict) -> str | None:
    """A probe result row's k-NN features (None for the other methods); k-NN rows written before
    there was a choice were raw."""
    return row.get("params", {}).get("features", "raw") if row["method"] == "knn" else None
