"""Typed configuration of `stoptool pretrain`, presets, and their validation.

A `PretrainConfig` is made of five sections: `model`, `masks` (the sampler's own
`MaskConfig`), `data` (data set and augmentation), `optim` and `runtime`. Every field is
declared once below, with its default and help (see `stoptool.options`); flags, `--set`, presets
and config files reach it by its key, and keys are unique across sections, so files stay flat
(`lr: 1e-3`, not `optim: {lr: 1e-3}`).

A run's config is built in three layers: the defaults (a CPU-sized run on the bundled digits),
then a preset or YAML file (`--config`), then the command line (flags and `--set KEY=VALUE`).
"""

import difflib
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from stoptool.errors import UserError
from stoptool.io.checkpoint import LATEST, read_meta
from stoptool.io.paths import check_file
from stoptool.masks import MaskConfig
from stoptool.models.archs import (
    ARCHS,
    Covariance,
    Init,
    NoiseOn,
    PredPos,
    check_img_size,
    default_img_size,
    default_init,
    parse_arch,
)
from stoptool.options import (
    KNN_FEATURES,
    KNN_FEATURES_HELP,
    PAIR,
    Attention,
    Decode,
    Interpolation,
    KnnFeatures,
    Precision,
    as_flat,
    build,
    check_fields,
    declared,
    key_of,
    like,
    option,
)
from stoptool.runs import parse_assignment

_SMALL = "for patches of 4 px or less"


@dataclass
class ModelConfig:
    arch: str = option("vit_t4", f"Encoder: vit_{{{','.join(ARCHS)}}}<patch>, e.g. vit_b16, vit_t4 (n: 4 "
                       "blocks, a smoke-test size).")
    img_size: int | None = option(None, "Image side in pixels; a multiple of the patch size.", positive=True,
                                  default_text=f"224; 8 patches a side {_SMALL}, e.g. 32 for vit_t4")
    sigma: float = option(0.25, "StoP noise standard deviation σ; 0 is plain I-JEPA.", low=0)
    pred_depth: int | None = option(None, "Predictor depth.", positive=True,
                                    default_text=f"6 for ViT-T/S/B, 12 for ViT-L/H/g, 2 {_SMALL}")
    pred_width: int | None = option(None, "Predictor width d_p.", positive=True,
                                    default_text=f"384; 96 {_SMALL}")
    pred_pos: PredPos = option("sincos", "Predictor positions: sincos | learned (paper Table 6).")
    init: Init | None = option(
        None, "Initial weights: released (as the released I-JEPA/StoP scripts draw them) | timm (timm's, "
        "with depth-rescaled projections).", default_text=f"released; timm {_SMALL}")
    noise_on: NoiseOn = option("masked", "Where the noise goes: masked | context | both (Table 7).")
    cov: Covariance = option("learned", "Noise covariance: learned (σ²AAᵀ) | fixed (σ²I in predictor width).")
    a_l1: float = option(0.0, "λ of an l1 penalty λ‖A‖₁ on the predictor's input projection.", low=0)

    def __post_init__(self):
        # Archs with patches of 4 px or less are the CPU-sized demo setting (calibrated in
        # docs/reproducing.md); every other arch gets the paper's sizes.
        spec, patch = parse_arch(self.arch)
        small = patch <= 4
        if self.img_size is None:
            self.img_size = default_img_size(self.arch)
        if self.init is None:
            self.init = default_init(self.arch)
        if self.pred_width is None:
            self.pred_width = 96 if small else 384
        if self.pred_depth is None:
            self.pred_depth = 2 if small else (6 if spec.depth <= 12 else 12)

    @property
    def patch(self) -> int:
        return parse_arch(self.arch)[1]

    @property
    def grid(self) -> int:
        return self.img_size // self.patch

    def validate(self) -> None:
        check_fields(self)
        spec = parse_arch(self.arch)[0]
        check_img_size(self.arch, self.img_size)
        if self.pred_width % spec.heads or self.pred_width % 4:
            raise UserError(f"pred_width {self.pred_width} must be a multiple of 4 and of the "
                            f"{spec.heads} heads of {self.arch}", key="pred_width")


@dataclass
class DataConfig:
    dataset: str = option("digits", "digits (bundled) | count (synthetic, drawn on demand) | cifar10 | "
                          "cifar100 | a path to an ImageFolder tree (its train/ when present) or to a set "
                          "stoptool prepare wrote (its train shards) | clevr-count:PATH | clevr-dist:PATH | "
                          "inat18:PATH | places205:PATH (the transfer sets in their release layouts).")
    subset: str | None = option(None, "File of image paths (one per line) to keep from an ImageFolder.")
    data_root: str | None = option(None, "Where CIFAR's release archive or extracted folder lives.",
                                   default_text="~/.cache/stoptool/data")
    download: bool = option(False, "Fetch the CIFAR archive into data_root when it is missing.",
                            flags=("--download",))
    crop_scale: PAIR = option((0.3, 1.0), "Random-resized-crop area MIN,MAX.")
    hflip: float = option(0.0, "Horizontal flip probability.", low=0, high=1)
    blur: float = option(0.0, "Gaussian blur probability.", low=0, high=1)
    gray: float = option(0.0, "Grayscale probability.", low=0, high=1)
    interpolation: Interpolation = option(
        "bilinear", "How crops are resized: bilinear (antialiased, torchvision's default, which the released "
        "I-JEPA code uses) or bicubic (Pillow; what runs started before this option existed used).")
    decode: Decode = option(
        "cpu", "Where JPEGs are decoded: cpu (loader workers) | gpu (nvJPEG through torchvision, a batch "
        "at a time on the training device; workers only read files and draw crops).")

    def validate(self) -> None:
        check_fields(self)
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            raise UserError(f"crop_scale must satisfy 0 < min <= max <= 1, got {lo}, {hi}", key="crop_scale")
        if self.decode == "gpu" and (self.blur or self.gray or self.interpolation != "bilinear"):
            raise UserError("decode=gpu crops, resizes (bilinear) and flips on the device; blur, gray and "
                            "bicubic resizing need decode=cpu", key="decode")


@dataclass
class OptimConfig:
    epochs: int = option(5, "Epochs (schedules span ipe_scale × epochs).", positive=True)
    steps: int | None = option(None, "Stop after this many steps in total (schedules unchanged).",
                               positive=True, default_text="all epochs")
    batch_size: int = option(64, "Global batch size.", positive=True)
    accum_steps: int = option(1, "Split each batch into N micro-batches whose gradients add up before one "
                              "optimizer step: the same update in less memory (batch_size, per process "
                              "under torchrun, must divide by N).", positive=True)
    lr: float = option(1e-3, "Peak learning rate after warmup.", low=0)
    start_lr: float = option(2e-4, "Learning rate at step 0.", low=0)
    final_lr: float = option(1e-6, "Learning rate at the end of the cosine.", low=0)
    warmup: float = option(1.0, "Warmup length in epochs.", low=0)
    wd: float = option(0.04, "Weight decay at the start (cosine to final_wd).", low=0)
    final_wd: float = option(0.4, "Weight decay at the end.", low=0)
    ema: PAIR = option((0.996, 1.0), "EMA momentum of the target encoder, START,END (linear).", low=0, high=1)
    ipe_scale: float = option(1.0, "Schedules run over ipe_scale × epochs.", positive=True)
    const_after_epoch: float | None = option(None, "Hold lr and wd constant from this epoch on (the paper's "
                                             "ViT-H: 250).", low=0, default_text="never")
    clip_grad: float | None = option(None, "Clip the context encoder's gradient norm to this (0: no "
                                     "clipping).", low=0, default_text="no clipping")

    def validate(self) -> None:
        check_fields(self)
        if self.ema[0] > self.ema[1]:
            raise UserError(f"ema momentum must satisfy 0 <= start <= end <= 1, got {self.ema}", key="ema")
        if self.batch_size % self.accum_steps:
            raise UserError(f"batch_size {self.batch_size} does not split into accum_steps "
                            f"{self.accum_steps} equal micro-batches: make it a multiple", key="accum_steps")


@dataclass
class RuntimeConfig:
    out: str | None = option(None, "Run directory.", default_text="runs/<data>-<arch>-sigma<σ>")
    seed: int = option(0, "Random seed.", low=0, high=2**32 - 1)
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: Precision = option("auto", "auto | bf16 | fp16 | fp32 (auto: bf16 where fast; fp16 with a "
                                  "gradient scaler on GPUs before Ampere).")
    attn: Attention = option("auto", "Attention: auto | sdpa (fused) | math (plain matmuls); auto picks math "
                             "for bf16 on CPU.")
    workers: int | None = option(None, "Data loader workers.", low=0, default_text="auto")
    save_every: int = option(10, "Keep a weight snapshot every N epochs (latest is written after every "
                             "epoch).", positive=True)
    log_every: int = option(10, "Log metrics every N steps.", positive=True)
    checkpoint_every: int = option(0, "Also write latest every N steps inside an epoch (0: only at epoch "
                                   "ends and by checkpoint_minutes); a resume goes on from the next batch.",
                                   low=0)
    checkpoint_minutes: float = option(30.0, "Also write latest when this many minutes of wall time have "
                                       "passed since the last write (0: never).", low=0)
    compile: bool = option(False, "torch.compile the whole step's forward (both encoders, the predictor, the "
                           "loss) as one graph, and so its backward; falls back to eager, with a note, where "
                           "it fails.")
    cuda_graphs: bool = option(False, "With compile, on a GPU: replay the compiled step as CUDA graphs "
                               "(torch.compile's reduce-overhead mode; one graph per mask shape, so it "
                               "needs masks.bucket, and accum_steps 1). Experimental: not yet run on a GPU. "
                               "A CPU compiles as without it.")
    grad_checkpoint: bool = option(False, "Recompute activations to save memory.")
    fsdp: bool = option(False, "Under torchrun, shard weights, gradients and optimizer state across the "
                        "processes (FSDP) instead of a whole replica in each (DDP); bf16 or fp32, not with "
                        "compile.")
    shard_group: int | None = option(None, "With fsdp: shard each copy of the weights over groups of N "
                                     "processes and replicate across groups (hybrid sharding; N = processes "
                                     "per node keeps the weight gathers inside a node).", low=1,
                                     default_text="all processes, one copy")

    def validate(self) -> None:
        check_fields(self)
        if self.out is not None and not str(self.out).strip():
            raise UserError("out is empty: give a run directory, or leave it out for the default", key="out")
        if self.fsdp and self.compile:
            raise UserError("fsdp and compile do not go together: drop one of them", key="fsdp")


def check_cuda_graphs(compile: bool, accum_steps: int, mask_bucket: int) -> None:
    """What CUDA-graph replay of the step needs: a compiled step, one backward a step (a replay
    writes over the gradients of the one before it) and few mask shapes (one graph each)."""
    if not compile:
        raise UserError("cuda_graphs replays the compiled step: add --compile", key="cuda_graphs")
    if accum_steps > 1:
        raise UserError(f"cuda_graphs replays one backward a step: accum_steps {accum_steps} would have "
                        "each micro-batch overwrite the last one's gradients; drop one of them",
                        key="cuda_graphs")
    if not mask_bucket:
        raise UserError("cuda_graphs records a graph for each mask shape: round the context lengths "
                        "with masks.bucket (--mask-bucket 8, say)", key="cuda_graphs")


LOGGERS = ("jsonl", "csv", "tensorboard", "wandb")


@dataclass
class WatchConfig:
    eval_every: int | None = option(None, "Online k-NN probe every N epochs (and on the initial weights "
                                    "and at the end); 0 turns it off.", low=0,
                                    default_text="1 for in-memory sets (digits, count, CIFAR); 5 for folders")
    eval_dataset: str | None = option(None, "Labelled set of the online k-NN, as probe's --dataset.",
                                      default_text="the pretraining set's own labelled splits")
    eval_max_images: int = option(10000, "Images of each split (bank and test) the online k-NN uses, a "
                                  "seeded sample when there are more.", positive=True)
    knn_features: KnnFeatures = option(KNN_FEATURES, "Features of the online k-NN, as probe's "
                                       "--knn-features: " + KNN_FEATURES_HELP)
    log: str = option("jsonl,csv,tensorboard", "Loggers, comma-separated: jsonl, csv, tensorboard, wandb "
                      "(WANDB_MODE=offline works).")

    def loggers(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.log.split(",") if name.strip())

    def validate(self) -> None:
        check_fields(self)
        unknown = [n for n in self.loggers() if n not in LOGGERS]
        if unknown or not self.loggers():
            raise UserError(f"log takes a comma-separated list of {', '.join(LOGGERS)}, got '{self.log}'",
                            key="log")


SECTIONS = {"model": ModelConfig, "masks": MaskConfig, "data": DataConfig, "optim": OptimConfig,
            "runtime": RuntimeConfig, "watch": WatchConfig}


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)

    def mask_config(self) -> MaskConfig:
        """The mask settings on this config's patch grid."""
        return self.masks.on_grid(self.model.grid)

    def run_dir(self) -> Path:
        if self.runtime.out:
            return Path(self.runtime.out)
        data = Path(self.data.dataset).name or "data"
        return Path("runs") / f"{data}-{self.model.arch}-sigma{self.model.sigma:g}"

    def to_dict(self) -> dict[str, Any]:
        """Every field by key, flat, in section order (what config.yaml and checkpoints hold)."""
        return {k: v for f in fields(self) for k, v in as_flat(getattr(self, f.name)).items()}

    def to_yaml(self) -> str:
        """`to_dict` as YAML, each section under a comment naming it."""
        parts = [f"# {f.name}\n" + yaml.safe_dump(as_flat(getattr(self, f.name)), sort_keys=False)
                 for f in fields(self)]
        return "".join(parts)

    def validate(self) -> "PretrainConfig":
        for section in (self.model, self.data, self.optim, self.runtime, self.watch):
            section.validate()
        self.mask_config().validate()  # the masks on this image's patch grid
        if self.runtime.cuda_graphs:
            check_cuda_graphs(self.runtime.compile, self.optim.accum_steps, self.masks.bucket)
        return self


# Keys that may change when a run is resumed; every other key must match the saved run.
RESUMABLE_CHANGES = {
    "init",  # how fresh weights are drawn: a resumed run loads its own
    "data_root",
    "download",
    "steps",
    "epochs",
    "out",
    "device",
    "precision",
    "attn",
    "workers",
    "log_every",
    "save_every",
    "compile",
    "cuda_graphs",
    "grad_checkpoint",
    "fsdp",  # checkpoints hold whole tensors either way
    "shard_group",
    "eval_every",  # what is watched, not what is trained
    "eval_dataset",
    "eval_max_images",
    "knn_features",
    "log",
    "accum_steps",  # the same update, in micro-batches
    "checkpoint_every",
    "checkpoint_minutes",
    "decode",  # where JPEGs are decoded: the same crops (pixels within a level or so)
}

# Keys a run's stoptool may not have had whose absence meant another value than today's default.
OLD_DEFAULTS = {
    "interpolation": "bicubic",  # crops were resized bicubic before the option came
}


def unresumable_difference(before: dict[str, Any], now: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key (with its saved and its new value) in which the config `now` differs from
    the config `before` a run was saved with, of the keys a resume may not change. A key the
    run's stoptool did not have held its default then (or its value in `OLD_DEFAULTS`)."""
    defaults = {**PretrainConfig().to_dict(), **OLD_DEFAULTS}
    for key, value in now.items():
        was = before.get(key, defaults.get(key))
        if key not in RESUMABLE_CHANGES and was != value:
            return key, was, value
    return None


def config_keys() -> dict[str, tuple[str, Any]]:
    """key -> (section name, field) for every pretraining option."""
    return {key_of(f): (name, f) for name, cls in SECTIONS.items() for f in declared(cls)}


def config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    """A config from flat keys (YAML, `--set`, flags), each value typed by its field. Not validated."""
    keys = config_keys()
    unknown = [k for k in values if k not in keys]
    if unknown:
        raise UserError(_unknown(unknown[0], keys), key=None)
    by_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for k, v in values.items():
        by_section[keys[k][0]][k] = v
    return PretrainConfig(**{name: build(SECTIONS[name], vals) for name, vals in by_section.items()})


def _unknown(key: Any, keys) -> str:
    close = difflib.get_close_matches(str(key), list(keys), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}: see `stoptool pretrain --print-config` for every key"


def build_config(file: str | None = None, overrides: dict[str, Any] | None = None,
                 resume: bool = False) -> PretrainConfig:
    """Defaults, then the config file, then the overrides (None values skipped); validated.
    With `resume`, a run already in the run directory must be this one (`check_same_run`),
    checked first: a new arch is named as such, not by what it implies (a mask too large)."""
    values: dict[str, Any] = {}
    if file:
        values.update(read_config_file(file))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = config_from_dict(values)
    if resume:
        latest = cfg.run_dir() / LATEST
        if latest.is_file():
            check_same_run(latest, read_meta(latest).get("config", {}), cfg.to_dict())
    return cfg.validate()


def check_same_run(latest: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume the run saved in `latest` (its config `saved`) with a config `now` that
    differs in a key a resume may not change."""
    diff = unresumable_difference(saved, now)
    if diff:
        key, was, value = diff
        raise UserError(f"'{latest}' holds a run with {key}={was!r}, not {value!r}: pass --no-resume to "
                        "start over there, or --out for a new run directory")


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a dict; each value is read as YAML (`[0.99, 1.0]`, `null`, `1e-3`)."""
    out = {}
    keys = config_keys()
    for item in items:
        key, value = parse_assignment(item)
        if key not in keys:
            raise UserError(_unknown(key, keys))
        out[key] = value
    return out


def preset_names(folder: str = "") -> list[str]:
    """The presets shipped in `stoptool/configs/<folder>` (pretrain's at the top; `sweeps`,
    `finetune`, ... below)."""
    files = (resources.files("stoptool.configs") / folder).iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


def read_config_file(name_or_path: str, folder: str = "", what: str = "preset") -> dict[str, Any]:
    """Read a preset by name (one of `preset_names(folder)`, `what` in messages) or a YAML file
    by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        check_file(name_or_path, "config file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"config '{name_or_path}' is not a UTF-8 text file (YAML)") from None
    else:
        preset = resources.files("stoptool.configs") / folder / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise UserError(
                f"unknown {what} '{name_or_path}': choose one of "
                f"{', '.join(preset_names(folder))} or give a YAML path"
            )
        text = preset.read_text()
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config '{name_or_path}' is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"config '{name_or_path}' must be a mapping of option names to values")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (which plain YAML loading
    settles silently in favour of the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys given beside it override
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                problem = f"key '{key}' appears twice" if key in seen else None
            except TypeError:  # a list or a mapping as a key
                problem = "found unhashable key"
            if problem:
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@dataclass
class BenchConfig:
    """`stoptool bench`: what to time, on which model; the model fields mean what they mean for
    `pretrain` (None: pretrain's default for the arch). With `config`, the model, mask and runtime
    settings are the preset's (see `bench_config`) and the bench projects its whole schedule."""

    config: str | None = option(None, "A pretrain preset (e.g. stop-vitb16-in1k) or YAML file: time the step "
                                "it runs (its model, masks and precision; its global batch split over "
                                "--devices) and project the wall-clock of its whole schedule; flags given "
                                "override it.", default_text="none: the flags alone")
    arch: str = like(ModelConfig, "arch", "vit_s16", default_text="vit_s16; with --config, the preset's")
    img_size: int | None = like(ModelConfig, "img_size")
    batch_size: int = like(OptimConfig, "batch_size", 16, help="Batch size (of one device).",
                           default_text="16; with --config, the preset's batch / --devices")
    accum_steps: int = like(OptimConfig, "accum_steps", help="Split the batch into N micro-batches whose "
                            "gradients add up (peak memory falls, the update stays).")
    devices: int = option(1, "With --config: devices sharing the preset's global batch; the projection adds "
                          "their wall-clock, a linear-scaling estimate.", positive=True)
    precision: Precision = like(RuntimeConfig, "precision")
    device: str = like(RuntimeConfig, "device")
    steps: int = option(5, "Timed steps per repeat.", positive=True)
    warmup: int = option(2, "Untimed warm-up steps.", low=0)
    repeats: int = option(3, "Repeats; the median is reported with min and max.", positive=True)
    what: Literal["train", "extract", "masks", "data", "finetune", "host"] = option(
        "train", "train (whole step) | extract (probe features) | masks (mask sampler) | data (the "
        "pretraining input pipeline alone: decode, crop, augment, masks, collate) | finetune (the "
        "finetune-in1k step and its augmentation, beside the pretraining step) | host (the operators "
        "one training step dispatches, by origin, and its ms on one thread: give a tiny --img-size).")
    dataset: str = like(DataConfig, "dataset", help="With --what data: the images to read (a name, an "
                        "ImageFolder tree or a prepared set).")
    data_root: str | None = like(DataConfig, "data_root")
    workers: int = option(0, "With --what data: loader workers (0: the main process alone).", low=0)
    crop_scale: PAIR = like(DataConfig, "crop_scale")
    hflip: float = like(DataConfig, "hflip")
    blur: float = like(DataConfig, "blur")
    gray: float = like(DataConfig, "gray")
    interpolation: Interpolation = like(DataConfig, "interpolation")
    decode: Decode = like(DataConfig, "decode")
    pred_width: int | None = like(ModelConfig, "pred_width")
    pred_depth: int | None = like(ModelConfig, "pred_depth")
    sigma: float = like(ModelConfig, "sigma")
    attn: Attention = like(RuntimeConfig, "attn", help="auto | sdpa (fused) | math (plain matmuls); auto: "
                           "math for bf16 training on CPU, else sdpa.")
    grad_checkpoint: bool = like(RuntimeConfig, "grad_checkpoint", help="Recompute activations.")
    compile: bool = like(RuntimeConfig, "compile", help="torch.compile the work timed: a training step's "
                         "forward whole (and so its backward), or the encoder's blocks for --what extract.")
    cuda_graphs: bool = like(RuntimeConfig, "cuda_graphs")
    threads: int | None = option(None, "torch threads.", positive=True, default_text="all cores")
    vary_masks: bool = option(False, "Train: draw new masks every step, as a run does (their sampling is "
                              "timed too), and report the distinct mask shapes met and the graphs compiled.")
    mask_bucket: int = like(MaskConfig, "bucket")
    json: str | None = option(None, "Also write the figures to this JSON file.", metavar="FILE")

    def validate(self) -> "BenchConfig":
        check_fields(self)
        if self.devices != 1 and not self.config:
            raise UserError("devices splits a preset's batch: give a preset with --config too", key="devices")
        if self.cuda_graphs:  # a fixed batch meets one mask shape; extraction has no backward
            step = self.what in ("train", "host")
            check_cuda_graphs(self.compile, self.accum_steps if step else 1,
                              self.mask_bucket if step and self.vary_masks else 1)
        if self.batch_size % self.accum_steps:
            raise UserError(f"batch_size {self.batch_size} does not split into accum_steps "
                            f"{self.accum_steps} equal micro-batches: make it a multiple", key="accum_steps")
        return self


# What `bench --config` takes from the preset (over bench's own defaults).
BENCH_FROM_PRESET = ("arch", "img_size", "sigma", "pred_width", "pred_depth", "precision", "device", "attn",
                     "grad_checkpoint", "compile", "cuda_graphs", "crop_scale", "hflip", "blur", "gray",
                     "interpolation", "decode")


def bench_config(flags: dict[str, Any]) -> BenchConfig:
    """`stoptool bench`'s config from the flags given (typed, by key). With `config`, the
    preset's settings come first, its global batch split over `devices`, and the flags given
    override them."""
    given = build(BenchConfig, flags).validate()  # the flags' own checks first
    if not given.config:
        return given
    run = build_config(given.config).to_dict()
    preset = {k: run[k] for k in BENCH_FROM_PRESET}
    if "batch_size" not in flags:
        if run["batch_size"] % given.devices:
            raise UserError(f"the preset's batch of {run['batch_size']} does not split evenly over "
                            f"{given.devices} devices: give one device's batch with --batch-size",
                            key="devices")
        preset["batch_size"] = run["batch_size"] // given.devices
    return build(BenchConfig, {**preset, **flags}).validate()


def option_fields() -> list:
    """Every pretraining option's field, in section order (what `pretrain`'s flags are made of)."""
    return [f for cls in SECTIONS.values() for f in declared(cls)]


PANELS = {"model": "Model", "masks": "Masks", "data": "Data and augmentation", "optim": "Optimization",
          "runtime": "Runtime", "watch": "Watching the run"}


def option_panels() -> dict[str, str]:
    """key -> the title of its section, for --help."""
    return {key: PANELS[section] for key, (section, _) in config_keys().items()}
