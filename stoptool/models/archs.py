"""The ViT family by name (`vit_b16`: size letter and patch) and the defaults that follow from
it. Kept apart from the model code, so that reading a name or a config needs neither torch nor
timm."""

import re
from dataclasses import dataclass
from typing import Literal, get_args

from stoptool.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


# Widths, depths and heads of the ViT family (the size letter of the arch name). `n` (nano) is
# stoptool's own, not a paper size: 4 blocks 96 wide, for smoke tests of a pipeline and for the
# test suite, a few times cheaper a step than ViT-T. Each size has a width of its own (checkpoint
# import names the size by its width).
ARCHS: dict[str, ArchSpec] = {
    "n": ArchSpec(96, 4, 3),
    "t": ArchSpec(192, 12, 3),
    "s": ArchSpec(384, 12, 6),
    "b": ArchSpec(768, 12, 12),
    "l": ArchSpec(1024, 24, 16),
    "h": ArchSpec(1280, 32, 16),
    "g": ArchSpec(1408, 40, 16, 48 / 11),
}

_ARCH_RE = re.compile(rf"^vit_([{''.join(ARCHS)}])(\d+)$")


def parse_arch(name: str) -> tuple[ArchSpec, int]:
    """`vit_b16` -> (ViT-B shape, patch 16). Raises UserError on an unknown name."""
    match = _ARCH_RE.match(name)
    if not match or int(match.group(2)) < 1:
        known = ", ".join(f"vit_{k}<patch>" for k in ARCHS)
        raise UserError(f"unknown arch '{name}': expected one of {known} (e.g. vit_b16, vit_t4)")
    return ARCHS[match.group(1)], int(match.group(2))


MAX_GRID = 512  # patches a side: 262,144 tokens, far past any ViT's sequence; a typo beyond


def check_img_size(arch: str, img_size: int, what: str = "image size") -> int:
    """The patch size of `arch`, once `img_size` is known to be a positive multiple of it that
    gives at most MAX_GRID patches a side."""
    patch = parse_arch(arch)[1]
    if img_size <= 0 or img_size % patch:
        raise UserError(f"{what} {img_size} is not a positive multiple of the patch size {patch} of {arch}",
                        key="img_size")
    check_grid(img_size // patch, f"{what} {img_size}")
    return patch


def check_grid(grid: int, what: str) -> None:
    if grid > MAX_GRID:  # past it, sampling masks alone needs gigabytes
        raise UserError(f"{what} makes a {grid}×{grid} grid of patches; at most {MAX_GRID} a side work",
                        key="img_size")


def default_img_size(arch: str) -> int:
    """The image side an arch pretrains and probes at unless told: 8 patches a side for patches
    of 4 px or less (the CPU-sized demo, e.g. 32 px for vit_t4), 224 px otherwise."""
    patch = parse_arch(arch)[1]
    return 8 * patch if patch <= 4 else 224


# The predictor's ablation switches (paper Tables 6, 7 and Fig. 3) and the initialisations:
# here rather than beside the predictor, so that configs and checkpoint checks read them
# without importing the model code.
NoiseOn = Literal["masked", "context", "both"]
Covariance = Literal["learned", "fixed"]
PredPos = Literal["sincos", "learned"]
Init = Literal["released", "timm"]
INITS: tuple[str, ...] = get_args(Init)


def default_init(arch: str) -> str:
    """`released` (the released I-JEPA/StoP scripts' init) for the paper's archs; `timm` (timm's
    init with depth-rescaled output projections) for the CPU-sized archs with patches of 4 px or
    less, where the demo was calibrated with it (docs/reproducing.md)."""
    return "timm" if parse_arch(arch)[1] <= 4 else "released"
