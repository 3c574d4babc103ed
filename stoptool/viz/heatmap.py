"""Predicted-token heatmaps (paper Fig. 6): where in the image a prediction points.

For one image and one mask, the predictor (eval mode: deterministic positions, no noise)
predicts the target-encoder features of each masked patch. For a chosen masked patch j, its
prediction p_j is compared with every target token t_k of the whole image (the EMA encoder's
output, layer-normed without affine parameters, exactly as the training targets):

    P(k | j) = softmax_k( cos(p_j, t_k) / τ )

A prediction that has learned the semantics of its region puts mass on patches that look
alike; one that has only learned position puts it on j alone.
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps, patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from stoptool.config import config_from_dict
from stoptool.errors import UserError
from stoptool.masks import MaskConfig, MaskSampler
from stoptool.models.encoder import encode
from stoptool.models.jepa import JEPA, predict
from stoptool.train.step import StepInputs, compute_targets
from stoptool.viz.common import (
    CONTEXT_COLOR,
    TARGET_COLORS,
    FigureResult,
    cells_of,
    check_dpi,
    check_out,
    checkpoint_grid,
    checkpoint_name,
    default_path,
    load_image,
    outline,
    parse_cells,
    sample_image_path,
    save_figure,
    show_image,
    write_json,
)

PANEL_INCHES = 2.6


@dataclass
class MaskedPatch:
    index: int  # raster index in the patch grid
    block: int  # the target block whose prediction is used
    position: int  # its place within that block


MASK_KEYS = ("num_targets", "target_scale", "target_aspect", "context_scale", "context_aspect",
             "min_keep", "mask_mode")


def mask_config_from_meta(meta: dict, grid: int) -> MaskConfig:
    """The mask settings a checkpoint was trained with; I-JEPA's defaults where not recorded
    (imported checkpoints carry no config)."""
    saved = meta.get("config") or {}
    cfg = config_from_dict({k: saved[k] for k in MASK_KEYS if saved.get(k) is not None})
    return cfg.masks.on_grid(grid)


def locate(tgt_idx: torch.Tensor, patch: int, grid: int) -> MaskedPatch:
    """Find `patch` among the target blocks [M, K]; the first block holding it is used."""
    hits = (tgt_idx == patch).nonzero()
    if len(hits) == 0:
        r, c = divmod(patch, grid)
        centres = " ".join(f"{p.index // grid},{p.index % grid}" for p in block_centres(tgt_idx, grid))
        raise UserError(
            f"patch {r},{c} is not in a target block of this mask; pick a masked patch, e.g. "
            f"one of the block centres {centres} (or change the seed)", key="patch"
        )
    block, position = hits[0].tolist()
    return MaskedPatch(patch, block, position)


def block_centres(tgt_idx: torch.Tensor, grid: int) -> list[MaskedPatch]:
    """One patch per target block: the one nearest the block's centroid."""
    out = []
    for m, block in enumerate(tgt_idx):
        rows, cols = (block // grid).float(), (block % grid).float()
        dist = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
        k = int(dist.argmin())
        out.append(MaskedPatch(int(block[k]), m, k))
    return out


@torch.no_grad()
def predictions_and_targets(
    model: JEPA, image: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions [M, K, D] for the target blocks and target tokens [N, D] of the whole image."""
    was_training = model.training
    model.eval()  # no StoP noise: the heatmap shows the deterministic prediction
    try:
        # the training targets, taken at every patch (one "block" holding the whole grid)
        every_patch = torch.arange(model.predictor.grid**2)[None, None]
        inputs = StepInputs(image[None], ctx_idx[None], every_patch)
        target = partial(encode, model.target_encoder)
        targets = compute_targets(target, inputs, contextlib.nullcontext)[0, 0]
        pred = predict(model.encoder, model.predictor, image[None], ctx_idx[None], tgt_idx[None])[0].float()
    finally:
        model.train(was_training)
    return pred, targets


def check_temperature(temperature: float) -> None:
    if not 0 < temperature < float("inf"):
        raise UserError(f"temperature must be positive, got {temperature}", key="temperature")


def heatmap_probs(
    model: JEPA,
    image: torch.Tensor,
    ctx_idx: torch.Tensor,
    tgt_idx: torch.Tensor,
    patches: Sequence[int],
    temperature: float = 0.1,
) -> torch.Tensor:
    """P(k | j) for each masked patch j in `patches`: [P, grid, grid], each map sums to 1.

    image: [3, H, W] normalized; ctx_idx: [Nc] context patches; tgt_idx: [M, K] target blocks.
    """
    check_temperature(temperature)
    grid = model.predictor.grid
    located = [locate(tgt_idx, int(p), grid) for p in patches]
    pred, targets = predictions_and_targets(model, image, ctx_idx, tgt_idx)
    chosen = torch.stack([pred[p.block, p.position] for p in located])  # [P, D]
    sims = F.normalize(chosen, dim=-1) @ F.normalize(targets, dim=-1).T  # [P, N]
    probs = torch.softmax(sims / temperature, dim=-1)
    return probs.reshape(len(located), grid, grid)


LEGEND_INCHES = 0.45  # the row of legend entries under the panels


def figure_size(n_patches: int) -> tuple[float, float]:
    return (n_patches + 1) * PANEL_INCHES + 0.8, PANEL_INCHES + 0.9 + LEGEND_INCHES


# The query patch's box: white with a dark rim, so that it reads on the light and the dark
# parts of a heatmap and on the figure's white ground, where its legend entry sits.
QUERY_RIM = [patheffects.Stroke(linewidth=3.4, foreground="0.1"), patheffects.Normal()]


def distinct_blocks(tgt_idx: torch.Tensor) -> list[list[int]]:
    """The target blocks grouped by their patches: each group lists the (0-based) blocks that
    cover the same patches, which draw as one outline (the first's colour)."""
    groups: dict[tuple, list[int]] = {}
    for m, block in enumerate(tgt_idx):
        groups.setdefault(tuple(sorted(int(i) for i in block)), []).append(m)
    return list(groups.values())


def block_color(m: int) -> str:
    return TARGET_COLORS[m % len(TARGET_COLORS)]


def legend_handles(tgt_idx: torch.Tensor) -> list[Patch]:
    """One entry per mark the panels show, as they show it: the query patch's box, the
    context's outline, and one outline per distinct target block (blocks sampled onto the same
    patches share it, and its entry names them all)."""
    def label(group: list[int]) -> str:
        names = " = ".join(str(m + 1) for m in group)
        return f"target block {names}" + (" (the same patches)" if len(group) > 1 else "")

    return [
        Patch(facecolor="none", edgecolor="white", linewidth=2.2, path_effects=QUERY_RIM,
              label="masked patch whose prediction is mapped"),
        Patch(facecolor="none", edgecolor=CONTEXT_COLOR, linewidth=1.6,
              label="context block (targets removed)"),
        *[Patch(facecolor="none", edgecolor=block_color(group[0]), linewidth=1.6, label=label(group))
          for group in distinct_blocks(tgt_idx)],
    ]


def _draw_mask(ax, ctx_idx, tgt_idx, grid: int, width: float = 1.6) -> None:
    outline(ax, cells_of(ctx_idx, grid), CONTEXT_COLOR, width)
    for group in distinct_blocks(tgt_idx):
        outline(ax, cells_of(tgt_idx[group[0]], grid), block_color(group[0]), width)


def draw_heatmap(
    display: np.ndarray,
    probs: torch.Tensor,
    patches: Sequence[int],
    ctx_idx: torch.Tensor,
    tgt_idx: torch.Tensor,
    temperature: float,
    title: str = "",
) -> Figure:
    """The image with its mask, then one overlay per masked patch; the patch is boxed white.
    A legend under the panels names every mark."""
    grid = probs.shape[-1]
    fig = Figure(figsize=figure_size(len(patches)), layout="constrained")
    fig.suptitle(title or f"softmax(cos(prediction, target) / {temperature:g})")
    axes = fig.subplots(1, len(patches) + 1, squeeze=False)[0]
    show_image(axes[0], display, "context (green) and targets")
    _draw_mask(axes[0], ctx_idx, tgt_idx, grid)
    colors = ScalarMappable(Normalize(0.0, float(probs.max())), colormaps["inferno"])
    for ax, p, patch in zip(axes[1:], probs, patches, strict=True):
        r, c = divmod(int(patch), grid)
        block = locate(tgt_idx, int(patch), grid).block + 1
        show_image(ax, display, f"patch ({r}, {c}) of target {block}  max {float(p.max()):.2f}")
        # Opacity follows the probability, so the photo stays readable where the mass is not.
        rgba = colors.to_rgba(p.numpy())
        rgba[..., 3] = 0.15 + 0.75 * colors.norm(p.numpy())
        ax.imshow(rgba, extent=(0, 1, 1, 0), interpolation="nearest")
        _draw_mask(ax, ctx_idx, tgt_idx, grid, width=1.0)
        outline(ax, cells_of([patch], grid), "white", 2.2, path_effects=QUERY_RIM)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
    fig.colorbar(colors, ax=axes[1:].tolist(), shrink=0.85).set_label("probability")
    handles = legend_handles(tgt_idx)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False,
               handlelength=1.1, handleheight=1.1, columnspacing=1.2)  # square marks, as the patches are
    return fig


def make_heatmap(
    ckpt: str | Path,
    image: str | Path | None = None,
    out: str | Path | None = None,
    patch: str | None = None,
    seed: int = 0,
    temperature: float = 0.1,
    dpi: int = 150,
) -> FigureResult:
    """Load a checkpoint and an image, sample a mask, write the heatmaps and their numbers."""
    from stoptool.io.checkpoint import read_meta, resolve_checkpoint
    from stoptool.io.models import load_model

    ckpt = resolve_checkpoint(ckpt)
    path = check_out(out, default_path(ckpt, "heatmap"))
    check_dpi(dpi)
    check_temperature(temperature)
    # everything the metadata can check is checked before the weights are read
    meta = read_meta(ckpt)
    grid = checkpoint_grid(meta)
    pixels, display = load_image(image, int(meta["img_size"]))
    sampler = MaskSampler(mask_config_from_meta(meta, grid))
    ctx, tgt = sampler(1, torch.Generator().manual_seed(seed))
    ctx_idx, tgt_idx = ctx[0], tgt[0]
    if patch is None:
        patches = [p.index for p in block_centres(tgt_idx, grid)]
    else:
        patches = [r * grid + c for r, c in parse_cells(patch, grid, "patch")]
    patches = list(dict.fromkeys(patches))  # overlapping blocks may share a centre: draw it once
    for p in patches:
        locate(tgt_idx, p, grid)
    model = load_model(ckpt, need_predictor=True).model
    probs = heatmap_probs(model, pixels, ctx_idx, tgt_idx, patches, temperature)
    title = (
        f"Predicted-token similarity, {checkpoint_name(ckpt)} ({meta.get('arch', '?')}, σ = "
        f"{float(meta.get('sigma', 0.0)):g}, step {meta.get('step', '?')}): "
        f"softmax(cos(prediction, target) / {temperature:g}), mask seed {seed}"
    )
    fig = draw_heatmap(display, probs, patches, ctx_idx, tgt_idx, temperature, title)
    save_figure(fig, path, dpi)
    flat = probs.flatten(1)
    entropy = -(flat * flat.clamp_min(1e-12).log()).sum(-1)
    data = {
        "checkpoint": str(ckpt), "image": str(image if image is not None else sample_image_path()),
        "seed": seed, "temperature": temperature, "grid": grid,
        "context": ctx_idx.tolist(), "targets": tgt_idx.tolist(),
        "patches": [list(divmod(p, grid)) for p in patches],
        "prob_at_patch": [round(float(flat[i, p]), 6) for i, p in enumerate(patches)],
        "max_prob": [round(float(m), 6) for m in flat.max(-1).values],
        "entropy": [round(float(e), 4) for e in entropy],
        "probs": probs.round(decimals=6).tolist(),
    }
    rows = {
        "checkpoint": ckpt, "image": data["image"], "mask seed": seed,
        "patch grid": f"{grid}×{grid}", "temperature": f"{temperature:g}",
    }
    for (r, c), at, top, ent in zip(data["patches"], data["prob_at_patch"], data["max_prob"],
                                    data["entropy"], strict=True):
        rows[f"patch {r},{c}"] = f"P(itself) {at:.3f}  max {top:.3f}  entropy {ent:.2f} nats"
    return FigureResult(path, write_json(path.with_suffix(".json"), data), rows)
