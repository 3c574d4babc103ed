"""`stoptool track`'s options, declared once (see `stoptool.options`): the flags are generated
from them. The propagation's defaults are those of DINO's DAVIS evaluation. A light module:
reading it loads neither torch nor timm."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stoptool.errors import UserError
from stoptool.io.checkpoint import resolve_checkpoint
from stoptool.io.paths import check_file
from stoptool.options import Precision, check_fields, option


@dataclass
class TrackConfig:
    """`stoptool track`: which encoder, which videos, how to propagate. Checks itself."""

    ckpt: str | None = option(
        None, "A stoptool checkpoint (pretrain, imported or encoder-only), or a run directory (its latest).",
        argument=True, metavar="CKPT", default_text="none: with --score-only")
    davis: str | None = option(
        None, "The DAVIS 2017 folder (DAVIS-2017-trainval-480p.zip unpacked): JPEGImages/480p, "
        "Annotations/480p, ImageSets/2017.", metavar="PATH", default_text="required")
    split: str = option("val", "The sequences listed in ImageSets/2017/SPLIT.txt (val: the paper's 30).")
    sequence: list[str] = option([], "Only this sequence of the split (repeatable).", metavar="NAME",
                                 default_text="all of the split")
    out: str | None = option(
        None, "Output folder: OUT/SEQ/00000.png ... (palette PNGs, DAVIS's layout) and the results (CSV, "
        "JSON).",
        default_text="<ckpt stem>.davis-<split> beside the checkpoint; with --score-only, PRED_DIR")
    score_only: str | None = option(
        None, "Score the palette PNGs in this folder (PRED_DIR/SEQ/00000.png ..., any method's) instead of "
        "propagating.", metavar="PRED_DIR")
    which: Literal["target", "context"] = option(
        "target", "Which encoder of a pretrain checkpoint: target (EMA, the one the paper evaluates) | "
        "context.")
    n_last_frames: int = option(7, "Context: the first frame and this many frames before the current one.",
                                low=0)
    topk: int = option(5, "Affinities kept per patch: the k largest over all context patches.", positive=True)
    radius: int = option(12, "Half-width of the square neighbourhood, in patches, a patch takes labels from "
                         "(0: the whole frame).", low=0)
    temperature: float = option(0.1, "Affinity temperature T: exp(cos / T).", positive=True)
    short_side: int = option(480, "Frames are resized so that their short side is this (their long side: a "
                             "multiple of 64 below the aspect ratio's).", positive=True)
    batch_size: int = option(16, "Frames per batch during feature extraction.", positive=True)
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: Precision = option(
        "auto", "Extraction precision: auto (bf16 where fast, else fp32) | bf16 | fp16 | fp32. Propagation "
        "runs in fp32.")

    def validate(self) -> "TrackConfig":
        check_fields(self)
        if not self.davis:
            raise UserError("the DAVIS 2017 folder is needed", key="davis")
        if self.ckpt is not None and self.score_only is not None:
            raise UserError("give a checkpoint to propagate with, or score_only PRED_DIR to score masks made "
                            "elsewhere, not both", key="score_only")
        if self.ckpt is None and self.score_only is None:
            raise UserError("give a checkpoint to propagate with, or score_only PRED_DIR to score masks made "
                            "elsewhere", key="score_only")
        if self.ckpt is not None:  # a run directory stands for its latest
            self.ckpt = str(check_file(resolve_checkpoint(self.ckpt), "checkpoint"))
        if self.score_only is not None and not Path(self.score_only).is_dir():
            raise UserError(f"predictions folder '{self.score_only}' is not a directory (one holding "
                            "SEQ/00000.png ...)", key="score_only")
        return self

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        if self.score_only is not None:
            return Path(self.score_only)
        ckpt = Path(self.ckpt)
        tail = "" if self.which == "target" else f"-{self.which}"
        return ckpt.with_name(f"{ckpt.stem}.davis-{self.split}{tail}")
