"""`stoptool evaluate`'s options, declared once (see `stoptool.options`). A light module: reading
it loads neither torch nor timm nor scikit-learn, so the command line starts fast."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stoptool.errors import UserError
from stoptool.options import Precision, check_fields, option

PROTOCOLS = ("paper", "logreg", "linear", "knn")
Protocol = Literal[PROTOCOLS]

# The paper protocol's recipe, VISSL's linear benchmarks (see docs/reproducing.md)
EPOCHS = 50
LR = 0.01  # for a batch of 256; scaled linearly with the batch
WEIGHT_DECAY = 5e-4
HEAD_BATCH = 256
VIEWS = 4


@dataclass
class EvaluateConfig:
    """`stoptool evaluate`: which encoders, which suite of tasks, where the data lies, how."""

    ckpts: list[str] = option(
        [], "Encoders to evaluate: stoptool checkpoints, run directories (their latest), or timm:MODEL for a "
        "timm model with its pretrained weights (e.g. timm:vit_large_patch16_224.mae).",
        argument=True, required=True, metavar="CKPT")
    suite: str = option(
        "table4", "table4 (CIFAR-100, Places205, iNat18, CLEVR/Count, CLEVR/Dist) | table1 (ImageNet: 1 %, "
        "last layer; 100 %, last layer; 100 %, last 4 layers) | a YAML file naming tasks.")
    data_root: str | None = option(
        None, "Directory holding the suite's data sets, each in its release layout (see docs/"
        "reproducing-imagenet.md); a task whose data is not there is skipped and said so.",
        default_text="none: required")
    protocol: Protocol | None = option(
        None, "paper (the best of {last, last4} × {linear, BatchNorm + linear} heads, SGD on augmented "
        "crops) | logreg | linear | knn (the probe's fast protocols, on centre crops).",
        default_text="each task's: paper, and logreg for table1's 1 % column")
    which: Literal["target", "context"] = option(
        "target", "Which encoder of a pretrain checkpoint: target (the one the paper evaluates) | context.")
    img_size: int | None = option(
        None, "Input size of every encoder.", positive=True,
        default_text="each encoder's own (a checkpoint's; a timm model's pretrained)")
    views: int | None = option(
        None, "Paper protocol: augmented views extracted per training image; head-training epoch e uses view "
        "e mod N (N = epochs: a fresh crop every epoch). 0: the centre crops alone.", low=0,
        default_text=f"the suite's, else {VIEWS}")
    epochs: int | None = option(None, "Paper protocol: epochs the heads train.", positive=True,
                                default_text=f"the suite's, else {EPOCHS}")
    lr: float = option(LR, "Paper protocol: learning rate for a batch of 256 (scaled with "
                       "--head-batch-size), cosine to 1 % of it.", positive=True)
    weight_decay: float = option(WEIGHT_DECAY, "Paper protocol: weight decay of the heads' linear layers.",
                                 low=0)
    head_batch_size: int = option(HEAD_BATCH, "Paper protocol: batch size of head training.", positive=True)
    batch_size: int = option(128, "Images per batch during feature extraction.", positive=True)
    chunk: int = option(50_000, "Images per cached piece of features: a run stopped during extraction "
                        "resumes from its last whole piece.", positive=True)
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: Precision = option(
        "auto", "Extraction precision: auto (bf16 where fast, else fp32) | bf16 | fp16 | fp32.")
    workers: int | None = option(None, "Data loader workers for extraction.", low=0, default_text="auto")
    cache_dir: str | None = option(None, "Feature cache directory.",
                                   default_text="~/.cache/stoptool/features")
    seed: int = option(0, "Seed of the views, the heads, --fraction and the held-out split.", low=0,
                       high=2**32 - 1)
    out: str | None = option(None, "Directory of the results: SUITE.json, SUITE.md and SUITE.png.",
                             default_text="runs/evaluate/<suite name>")

    def validate(self) -> "EvaluateConfig":
        check_fields(self)
        if not self.ckpts:
            raise UserError("give at least one checkpoint (or timm:MODEL) to evaluate")
        if self.data_root is None:
            raise UserError("give the directory that holds the suite's data sets", key="data_root")
        root = Path(self.data_root).expanduser()
        if not root.is_dir():
            raise UserError(f"data root '{root}' does not exist or is not a directory", key="data_root")
        return self
