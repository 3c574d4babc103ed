"""`stoptool finetune`'s options, declared once (see `stoptool.options`), and its presets.

A light module: reading it loads neither timm nor torchvision, so the command line starts fast.

A run's config is built as pretrain's is: the defaults (a CPU-sized fine-tuning of the demo's
encoder on digits), then a preset or YAML file (`--config`, presets in
`stoptool/configs/finetune/`), then the flags and `--set KEY=VALUE`. A preset may hold values
that depend on the encoder's size under `by_size` (MAE's recipe differs for ViT-B and
ViT-L/H): once the encoder's arch is known (`for_arch`), the values for its size letter apply
over the preset's own, under anything given on the command line.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stoptool.config import DataConfig, OptimConfig, RuntimeConfig, WatchConfig, read_config_file
from stoptool.errors import UserError
from stoptool.models.archs import ARCHS, Init, parse_arch
from stoptool.options import (
    PAIR,
    Attention,
    Interpolation,
    Precision,
    as_flat,
    build,
    check_fields,
    coerce,
    declared,
    key_of,
    like,
    option,
)
from stoptool.runs import parse_assignment

PRESETS = "finetune"  # the folder of stoptool/configs the presets live in
NONE = ("", "none", "off")  # how a preset or flag turns RandAugment off

_DATA = ("digits (bundled) | count (synthetic) | cifar10 | cifar100 | PATH with train/ and val/ (or test/) "
         "ImageFolder trees, or a set stoptool prepare wrote (train and val).")


@dataclass
class FinetuneConfig:
    """`stoptool finetune`: which encoder, on which labels, with which recipe. The defaults are
    the CPU-sized run on digits; the presets hold the published recipes."""

    # -- the encoder
    ckpt: str | None = option(
        None, "The encoder to fine-tune: a stoptool checkpoint (pretrain, imported official, exported, or "
        "fine-tuned), a run directory (its latest), or timm:NAME, timm's model with its published weights "
        "(e.g. timm:vit_large_patch16_224.mae, a baseline).", argument=True, default_text="none")
    which: Literal["target", "context"] = option(
        "target", "Which encoder of a pretrain checkpoint: target (EMA, the one the paper evaluates) | "
        "context.")
    random_init: bool = option(False, "Fine-tune an untrained encoder of --arch (seeded): the baseline.",
                               flags=("--random-init",))
    arch: str | None = option(None, "Arch of the --random-init encoder, e.g. vit_t4.")
    init: Init | None = option(None, "How the --random-init encoder is drawn: released | timm.",
                               default_text="as pretrain draws that arch")
    img_size: int | None = option(
        None, "Image side to fine-tune and evaluate at; the encoder's fixed sine-cosine positions are "
        "recomputed for its grid.", positive=True,
        default_text="the checkpoint's; with --random-init, as pretrain: 8 patches a side for patches of "
        "4 px or less, else 224")
    drop_path: float = option(0.0, "Stochastic depth rate of the last block (timm's drop_path_rate; it "
                              "rises linearly over the blocks).", low=0, high=1)
    head_norm: Literal["none", "standardize"] = option(
        "standardize", "What comes between the averaged tokens and the head: none (MAE's fine-tuning) | "
        "standardize (each feature less its mean, over its standard deviation, both measured once on the "
        "training images with the starting encoder, as the probes standardise: for features that differ "
        "between images by little beside a shared offset, as the CPU demo's do; folded into the head when "
        "exported).")
    # -- data and augmentation
    dataset: str = option("digits", _DATA)
    data_root: str | None = like(DataConfig, "data_root")
    download: bool = like(DataConfig, "download")
    subset: str | None = option(
        None, "Keep only the training images named in this file, one per line (the 1 % ImageNet subset "
        "format: SimCLR's 1percent.txt).")
    fraction: float = option(1.0, "Class-balanced, seeded share of the training labels to use, in (0, 1].")
    crop_scale: PAIR = option((1.0, 1.0), "Random-resized-crop area MIN,MAX (timm's scale; 1,1: the whole "
                              "image).")
    hflip: float = option(0.0, "Horizontal flip probability.", low=0, high=1)
    auto_augment: str | None = option(
        None, "timm's RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (MAE's); none: off.", default_text="none")
    color_jitter: float | None = option(None, "Colour jitter strength (timm; ignored with auto_augment).",
                                        low=0, default_text="none")
    interpolation: Interpolation = option("bicubic", "How crops and evaluation images are resized.")
    reprob: float = option(0.0, "Random erasing probability (timm's RandomErasing).", low=0, high=1)
    remode: Literal["const", "rand", "pixel"] = option("pixel", "Random erasing fill: const | rand | pixel.")
    recount: int = option(1, "Random erasing: regions per image.", positive=True)
    mixup: float = option(0.0, "Mixup α (timm's Mixup); 0: off.", low=0)
    cutmix: float = option(0.0, "CutMix α; 0: off.", low=0)
    mixup_prob: float = option(1.0, "Probability of mixing a batch (mixup or cutmix).", low=0, high=1)
    mixup_switch_prob: float = option(0.5, "Probability of cutmix rather than mixup when both are on.",
                                      low=0, high=1)
    mixup_mode: Literal["batch", "pair", "elem"] = option(
        "batch", "Mixing parameters drawn per batch | pair | elem.")
    smoothing: float = option(0.1, "Label smoothing.", low=0, high=1)
    eval_crop_pct: float = option(1.0, "Evaluation: resize the short side to img_size / eval_crop_pct, then "
                                  "take the centre crop (MAE: 0.875, i.e. 256 then 224).", positive=True,
                                  high=1)
    # -- optimization
    epochs: int = option(6, "Epochs (the cosine spans them all).", positive=True)
    steps: int | None = like(OptimConfig, "steps")
    batch_size: int = like(OptimConfig, "batch_size")
    accum_steps: int = like(OptimConfig, "accum_steps")
    lr: float | None = option(None, "Peak learning rate (of the head; earlier layers get it times "
                              "layer_decay^depth).", low=0, default_text="blr × batch_size / 256")
    blr: float = option(8e-3, "Base learning rate per 256 images, used when lr is not given (MAE's rule).",
                        low=0)
    min_lr: float = option(1e-6, "Learning rate at the end of the cosine.", low=0)
    warmup: float = option(0.5, "Linear warmup from 0, in epochs.", low=0)
    wd: float = option(0.05, "AdamW weight decay (none on biases, norms and positions).", low=0)
    layer_decay: float = option(0.75, "Layer-wise lr decay: the block at depth d from the top learns at "
                                "lr × layer_decay^d (1: none).", positive=True, high=1)
    clip_grad: float | None = option(None, "Clip the gradient norm to this (0 or none: no clipping).", low=0,
                                     default_text="no clipping")
    by_size: dict = option({}, f"Values by the encoder's size letter ({', '.join(ARCHS)}), e.g. "
                           "{b: {drop_path: 0.1}}: they apply over the preset's own once the arch is known.",
                           cli=False)
    # -- runtime
    out: str | None = like(RuntimeConfig, "out", default_text="runs/finetune-<data>-<source>")
    seed: int = like(RuntimeConfig, "seed", help="Seed of the head, the data order, the augmentation, the "
                     "fraction and --random-init.")
    device: str = like(RuntimeConfig, "device")
    precision: Precision = like(RuntimeConfig, "precision")
    attn: Attention = like(RuntimeConfig, "attn")
    workers: int | None = like(RuntimeConfig, "workers")
    eval_every: int = option(1, "Evaluate on the val split every N epochs (and after the last step, always); "
                             "0: after the last step only.", low=0)
    save_every: int = like(RuntimeConfig, "save_every", 1000, default_text="1000 (in effect: latest only)")
    log_every: int = like(RuntimeConfig, "log_every")
    checkpoint_every: int = like(RuntimeConfig, "checkpoint_every")
    checkpoint_minutes: float = like(RuntimeConfig, "checkpoint_minutes")
    compile: bool = like(RuntimeConfig, "compile", help="torch.compile the step's forward and backward "
                         "(falls back to eager, with a note, where it fails).")
    grad_checkpoint: bool = like(RuntimeConfig, "grad_checkpoint")
    log: str = like(WatchConfig, "log")
    # keys given on the command line: a preset's `by_size` does not override them (not an option)
    pinned: frozenset = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.auto_augment, str) and self.auto_augment.strip().lower() in NONE:
            self.auto_augment = None

    # -- derived values

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def loggers(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.log.split(",") if name.strip())

    def mixing(self) -> bool:
        """Mixup or CutMix on: the targets are soft."""
        return self.mixup > 0 or self.cutmix > 0

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        data = Path(self.dataset).name or "data"
        return Path("runs") / f"finetune-{data}-{source_name(self)}"

    # -- resolution and checks

    def for_arch(self, arch: str) -> "FinetuneConfig":
        """This config with `by_size`'s values for `arch`'s size letter over the preset's, under
        the keys given on the command line (`pinned`); `by_size` is then spent (empty), so the
        resolved config written to a run reads back the same."""
        letter = arch[len("vit_")] if arch.startswith("vit_") else ""
        sized = {k: v for k, v in self.by_size.get(letter, {}).items() if k not in self.pinned}
        by_key = {key_of(f): f for f in declared(FinetuneConfig)}
        values = {by_key[k].name: coerce(by_key[k], v) for k, v in sized.items()}
        return dataclasses.replace(self, **values, by_size={})

    def validate(self) -> "FinetuneConfig":
        check_fields(self)
        _check_by_size(self.by_size)
        if not 0 < self.fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {self.fraction}", key="fraction")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"crop_scale must satisfy 0 < min <= max <= 1, got {lo}, {hi}", key="crop_scale")
        if self.batch_size % self.accum_steps:
            raise UserError(f"batch_size {self.batch_size} does not split into accum_steps "
                            f"{self.accum_steps} equal micro-batches: make it a multiple", key="accum_steps")
        if self.out is not None and not str(self.out).strip():
            raise UserError("out is empty: give a run directory, or leave it out for the default", key="out")
        unknown = [n for n in self.loggers() if n not in LOGGERS]
        if unknown or not self.loggers():
            raise UserError(f"log takes a comma-separated list of {', '.join(LOGGERS)}, got '{self.log}'",
                            key="log")
        self._check_source()
        return self

    def _check_source(self) -> None:
        if self.random_init:
            if self.ckpt is not None:
                raise UserError("give either a checkpoint or random_init, not both", key="random_init")
            if self.arch is None:
                raise UserError("random_init needs an arch (e.g. vit_t4)", key="arch")
            parse_arch(self.arch)
            return
        if self.ckpt is None:
            raise UserError("give a checkpoint to fine-tune (or random_init with an arch)")
        if self.arch is not None or self.init is not None:
            raise UserError("arch and init are for random_init; a checkpoint holds its own weights",
                            key="arch")

    # -- files

    def to_dict(self) -> dict[str, Any]:
        return as_flat(self)

    def to_yaml(self) -> str:
        """Every key, grouped under a comment naming its part (as --help groups the flags)."""
        flat, out, group = self.to_dict(), [], None
        for key, value in flat.items():
            if panel_of(key) != group:
                group = panel_of(key)
                out.append(f"# {group.lower()}\n")
            out.append(yaml.safe_dump({key: value}, sort_keys=False))
        return "".join(out)


LOGGERS = ("jsonl", "csv", "tensorboard", "wandb")


def _check_by_size(by_size: dict) -> None:
    keys = {key_of(f): f for f in declared(FinetuneConfig)}
    for letter, values in by_size.items():
        if letter not in ARCHS:
            raise UserError(f"by_size is keyed by size letter ({', '.join(ARCHS)}), got '{letter}'",
                            key="by_size")
        if not isinstance(values, dict):
            raise UserError(f"by_size.{letter} takes a mapping of keys to values, got {values!r}",
                            key="by_size")
        for k in values:
            if k not in keys or k in ("ckpt", "by_size"):
                raise UserError(f"by_size.{letter}: {_unknown(k)}", key="by_size")


def _unknown(key: Any) -> str:
    keys = [key_of(f) for f in declared(FinetuneConfig)]
    close = difflib.get_close_matches(str(key), keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}: see `stoptool finetune --print-config` for every key"


def source_name(cfg: FinetuneConfig) -> str:
    """What the default run directory calls the encoder: its run directory's name, else the
    checkpoint file's stem; `random-<arch>` for --random-init."""
    if cfg.random_init or cfg.ckpt is None:
        return f"random-{cfg.arch}"
    if cfg.ckpt.startswith("timm:"):
        return "timm-" + cfg.ckpt[len("timm:"):]
    path = Path(cfg.ckpt)
    if path.name == "latest.safetensors" or path.is_dir():
        path = path.parent if path.name == "latest.safetensors" else path
        return path.resolve().name or "run"
    return path.stem


def config_from_dict(values: dict[str, Any], pinned=()) -> FinetuneConfig:
    """A config from flat keys (YAML, `--set`, flags), each value typed by its field; keys in
    `pinned` are the command line's. Not validated."""
    keys = {key_of(f) for f in declared(FinetuneConfig)}
    unknown = [k for k in values if k not in keys]
    if unknown:
        raise UserError(_unknown(unknown[0]))
    return dataclasses.replace(build(FinetuneConfig, values), pinned=frozenset(pinned))


def build_finetune_config(file: str | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Defaults, then the preset or file, then the command line's `overrides`; checked, with
    `by_size` not yet applied (see `FinetuneConfig.for_arch`)."""
    values = dict(read_config_file(file, PRESETS, what="finetune preset")) if file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    return config_from_dict(values, pinned=given).validate()


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (VALUE read as YAML), each key one of finetune's."""
    out = {}
    keys = {key_of(f) for f in declared(FinetuneConfig)}
    for item in items:
        key, value = parse_assignment(item)
        if key not in keys:
            raise UserError(_unknown(key))
        out[key] = value
    return out


# The parts of the config, as --help and --print-config group the keys: each part's first key.
PARTS = {"ckpt": "Encoder", "dataset": "Data and augmentation", "epochs": "Optimization", "out": "Runtime"}


def panel_of(key: str) -> str:
    """The part `key` belongs to: the part of the nearest part-opening key declared before it."""
    names = [key_of(f) for f in declared(FinetuneConfig)]
    return PARTS[next(k for k in reversed(names[: names.index(key) + 1]) if k in PARTS)]


def panels() -> dict[str, str]:
    return {key_of(f): panel_of(key_of(f)) for f in declared(FinetuneConfig)}


def cli_fields() -> list:
    """The options the command line has flags for (`by_size` is YAML and --set only)."""
    return [f for f in declared(FinetuneConfig) if f.metadata.get("cli", True)]
