"""Typed configuration of `stoptool pretrain`, presets, and their validation.

A run's config is built in three layers: the defaults below (a CPU-sized run on the bundled
digits), then a preset or YAML file (`--config`), then the command-line flags a user gave.
"""

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from stoptool.errors import UserError
from stoptool.io.paths import check_file
from stoptool.masks import MaskConfig
from stoptool.models.archs import INITS, check_img_size, default_img_size, default_init, parse_arch

PAIR_FIELDS = {
    "target_scale",
    "target_aspect",
    "context_scale",
    "context_aspect",
    "crop_scale",
    "ema",
}
CHOICES = {
    "pred_pos": ("sincos", "learned"),
    "init": INITS,
    "noise_on": ("masked", "context", "both"),
    "cov": ("learned", "fixed"),
    "mask_mode": ("multiblock", "random"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "attn": ("auto", "sdpa", "math"),
}


@dataclass
class PretrainConfig:
    # model
    arch: str = "vit_t4"
    img_size: int | None = None  # 224, or 8 patches a side for patches of 4 px or less
    sigma: float = 0.25
    pred_depth: int | None = None  # the paper's 6 (ViT-S/B) or 12 (ViT-L/H/g); 2 for CPU-sized archs
    pred_width: int | None = None  # the paper's 384; 96 for CPU-sized archs
    pred_pos: str = "sincos"
    init: str | None = None  # released (paper archs) | timm (archs with patches of 4 px or less)
    noise_on: str = "masked"
    cov: str = "learned"
    a_l1: float = 0.0
    # masks
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int | None = None
    mask_mode: str = "multiblock"
    # data and augmentation
    dataset: str = "digits"
    subset: str | None = None
    data_root: str | None = None  # where cifar10/cifar100 live (default: ~/.cache/stoptool/data)
    download: bool = False  # fetch cifar10/cifar100 into data_root when missing
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: float = 0.0
    blur: float = 0.0
    gray: float = 0.0
    # optimization
    epochs: int = 5
    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup: float = 1.0
    wd: float = 0.04
    final_wd: float = 0.4
    ema: tuple[float, float] = (0.996, 1.0)
    ipe_scale: float = 1.0
    const_after_epoch: float | None = None
    clip_grad: float | None = None
    # runtime
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    attn: str = "auto"
    workers: int | None = None
    save_every: int = 10
    log_every: int = 10
    compile: bool = False
    grad_checkpoint: bool = False
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2)
    shard_group: int | None = None  # with fsdp: processes per sharded copy (None: all; HSDP below)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

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

    def mask_config(self) -> MaskConfig:
        return MaskConfig(
            grid=self.grid,
            num_targets=self.num_targets,
            target_scale=self.target_scale,
            target_aspect=self.target_aspect,
            context_scale=self.context_scale,
            context_aspect=self.context_aspect,
            min_keep=self.min_keep,
            mode=self.mask_mode,
        )

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        data = Path(self.dataset).name or "data"
        return Path("runs") / f"{data}-{self.arch}-sigma{self.sigma:g}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def validate(self) -> "PretrainConfig":
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if f.name in PAIR_FIELDS else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        spec = parse_arch(self.arch)[0]
        check_img_size(self.arch, self.img_size)
        if self.sigma < 0:
            raise UserError(f"sigma must be >= 0 (it is the noise standard deviation), got {self.sigma}")
        for name, options in CHOICES.items():
            if getattr(self, name) not in options:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be one of {', '.join(options)}, got '{getattr(self, name)}'")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        positive = ("epochs", "batch_size", "pred_depth", "pred_width", "save_every", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise UserError(f"--steps must be positive, got {self.steps}")
        if self.pred_width % spec.heads or self.pred_width % 4:
            raise UserError(
                f"pred-width {self.pred_width} must be a multiple of 4 and of the "
                f"{spec.heads} heads of {self.arch}"
            )
        for name in ("lr", "start_lr", "final_lr", "wd", "final_wd", "warmup", "a_l1", "ipe_scale"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.ipe_scale <= 0:
            raise UserError(f"ipe-scale must be positive, got {self.ipe_scale}")
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            raise UserError(f"crop-scale must satisfy 0 < min <= max <= 1, got {lo}, {hi}")
        for name in ("hflip", "blur", "gray"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not (0 <= self.ema[0] <= self.ema[1] <= 1):
            raise UserError(f"ema momentum must satisfy 0 <= start <= end <= 1, got {self.ema}")
        if self.out is not None and not str(self.out).strip():
            raise UserError("--out is empty: give a run directory, or leave it out for the default")
        if self.fsdp and self.compile:
            raise UserError("--fsdp and --compile do not go together: drop one of them")
        if self.shard_group is not None and self.shard_group < 1:
            raise UserError(f"--shard-group must be at least 1, got {self.shard_group}")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise UserError(f"clip_grad must be >= 0 (0 or left out: no clipping), got {self.clip_grad}")
        if self.const_after_epoch is not None and self.const_after_epoch < 0:
            raise UserError(f"const_after_epoch must be >= 0, got {self.const_after_epoch}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        self.mask_config().validate()
        return self


def preset_names() -> list[str]:
    files = resources.files("stoptool.configs").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


def read_config_file(name_or_path: str) -> dict[str, Any]:
    """Read a preset by name (see `preset_names`) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        check_file(name_or_path, "config file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"config '{name_or_path}' is not a UTF-8 text file (YAML)") from None
    else:
        preset = resources.files("stoptool.configs") / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise UserError(
                f"unknown preset '{name_or_path}': choose one of "
                f"{', '.join(preset_names())} or give a YAML path"
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


def build_config(file: str | None = None, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Defaults, then the config file, then the overrides; validated."""
    values: dict[str, Any] = {}
    if file:
        values.update(read_config_file(file))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(values).validate()


def config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    names = {f.name for f in fields(PretrainConfig)} - {"extra"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown config key(s): {', '.join(unknown)}")
    kinds = {f.name: f.type for f in fields(PretrainConfig)}
    typed = {}
    for k, v in values.items():
        if k in PAIR_FIELDS:
            if not (isinstance(v, (list, tuple)) and len(v) == 2):
                raise UserError(f"config key '{k}' takes two numbers, got {v!r}")
            v = (_number(k, v[0], float), _number(k, v[1], float))
        else:
            v = _scalar(k, v, kinds[k])
        typed[k] = v
    return PretrainConfig(**typed)


def _scalar(key: str, value: Any, kind: Any) -> Any:
    """`value` as the field's type: YAML reads `1e-3` as a string, and `5` where 5.0 is meant."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    for number in (float, int):
        if number in options:
            return _number(key, value, number)
    if bool in options:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' takes true or false, got {value!r}")
        return value
    if str in options and not isinstance(value, str):
        raise UserError(f"config key '{key}' takes a string, got {value!r}")
    return value


def _number(key: str, value: Any, number: type) -> int | float:
    try:
        if isinstance(value, bool):
            raise ValueError
        parsed = float(value)
        if number is int:
            if not parsed.is_integer():
                raise ValueError
            return int(parsed)
        return parsed
    except (TypeError, ValueError):
        what = "an integer" if number is int else "a number"
        raise UserError(f"config key '{key}' takes {what}, got {value!r}") from None
