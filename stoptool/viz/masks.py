"""Multi-block masks drawn on an image: what the context encoder sees and what is predicted.

Each panel is one sample of `MaskSampler` (a batch of one, seeded), so a panel shows exactly
the context block (targets removed) and the target blocks a training step would use with
the same settings and generator state.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from stoptool.errors import UserError
from stoptool.masks import MaskConfig, MaskSampler
from stoptool.models.archs import check_grid
from stoptool.viz.common import (
    CONTEXT_COLOR,
    TARGET_COLORS,
    FigureResult,
    cells_of,
    check_dpi,
    check_out,
    load_image,
    outline,
    sample_image_path,
    save_figure,
    show_image,
    write_json,
)

PANEL_INCHES = 2.6


def sample_masks(cfg: MaskConfig, seeds: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ctx_idx [Nc], tgt_idx [M, K]) for each seed."""
    sampler = MaskSampler(cfg)
    out = []
    for seed in seeds:
        ctx, tgt = sampler(1, torch.Generator().manual_seed(seed))
        out.append((ctx[0], tgt[0]))
    return out


def figure_size(n_seeds: int) -> tuple[float, float]:
    return n_seeds * PANEL_INCHES + 0.2, PANEL_INCHES + 0.9


def draw_masks(
    display: np.ndarray,
    masks: Sequence[tuple[torch.Tensor, torch.Tensor]],
    seeds: Sequence[int],
    grid: int,
    title: str = "",
) -> Figure:
    """One panel per seed: patches outside the context are dimmed, targets tinted and outlined."""
    fig = Figure(figsize=figure_size(len(seeds)), layout="constrained")
    fig.suptitle(title or "Multi-block masks: context (green outline) and target blocks")
    axes = fig.subplots(1, len(seeds), squeeze=False)[0]
    for ax, (ctx, tgt), seed in zip(axes, masks, seeds, strict=True):
        show_image(ax, display, f"seed {seed}: {len(ctx)} context, {tgt.shape[0]}×{tgt.shape[1]} targets")
        context = cells_of(ctx, grid)
        shade = np.zeros((grid, grid, 4))
        shade[~context] = (0, 0, 0, 0.45)
        for m, block in enumerate(tgt):
            shade[cells_of(block, grid)] = (*to_rgb(TARGET_COLORS[m % len(TARGET_COLORS)]), 0.35)
        ax.imshow(shade, extent=(0, 1, 1, 0), interpolation="nearest")
        if grid <= 32:  # the patch grid itself, faintly, while it is still readable
            for i in range(1, grid):
                ax.axhline(i / grid, color="white", alpha=0.25, linewidth=0.5)
                ax.axvline(i / grid, color="white", alpha=0.25, linewidth=0.5)
        outline(ax, context, CONTEXT_COLOR, 1.8)
        for m, block in enumerate(tgt):
            outline(ax, cells_of(block, grid), TARGET_COLORS[m % len(TARGET_COLORS)], 1.4)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
    return fig


def mask_settings(config: str | None, overrides: dict) -> tuple[int, int, MaskConfig]:
    """(img_size, patch, MaskConfig): pretrain's defaults, then a preset or YAML, then flags."""
    from stoptool.config import config_from_dict, read_config_file

    values = read_config_file(config) if config else {}
    patch = overrides.pop("patch", None)
    img_size = overrides.pop("img_size", None)
    cfg = config_from_dict({**values, **{k: v for k, v in overrides.items() if v is not None}})
    img_size = img_size if img_size is not None else cfg.model.img_size
    patch = patch if patch is not None else cfg.model.patch
    if patch < 1 or img_size < 1 or img_size % patch:
        raise UserError(
            f"image size {img_size} is not a positive multiple of the patch size {patch}"
        )
    check_grid(img_size // patch, f"image size {img_size} with patch {patch}")
    return img_size, patch, cfg.masks.on_grid(img_size // patch).validate()


def make_masks(
    image: str | Path | None = None,
    out: str | Path | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3),
    config: str | None = None,
    overrides: dict | None = None,
    dpi: int = 150,
) -> FigureResult:
    """Sample a mask per seed with the resolved settings and draw them on the image."""
    path = check_out(out, Path("masks.png"))
    check_dpi(dpi)
    if not seeds:
        raise UserError("seeds names no seed", key="seeds")
    img_size, patch, cfg = mask_settings(config, dict(overrides or {}))
    _, display = load_image(image, img_size)
    masks = sample_masks(cfg, seeds)
    lo_t, hi_t = cfg.target_scale
    lo_c, hi_c = cfg.context_scale
    title = (
        f"{cfg.mode} masks at {img_size} px, patch {patch} ({cfg.grid}×{cfg.grid} grid): "
        f"{cfg.num_targets} targets of scale {lo_t:g}–{hi_t:g}, context scale {lo_c:g}–{hi_c:g}"
    )
    save_figure(draw_masks(display, masks, seeds, cfg.grid, title), path, dpi)
    data = {
        "image": str(image if image is not None else sample_image_path()), "img_size": img_size,
        "patch": patch, "grid": cfg.grid, "mode": cfg.mode, "num_targets": cfg.num_targets,
        "target_scale": list(cfg.target_scale), "target_aspect": list(cfg.target_aspect),
        "context_scale": list(cfg.context_scale), "min_keep": cfg.keep,
        "masks": [{"seed": s, "context": c.tolist(), "targets": t.tolist()}
                  for s, (c, t) in zip(seeds, masks, strict=True)],
    }
    rows = {"image": data["image"], "grid": f"{cfg.grid}×{cfg.grid} ({img_size} px, patch {patch})"}
    for s, (c, t) in zip(seeds, masks, strict=True):
        rows[f"seed {s}"] = f"{len(c)} context patches, {t.shape[0]} targets × {t.shape[1]} patches"
    return FigureResult(path, write_json(path.with_suffix(".json"), data), rows)
