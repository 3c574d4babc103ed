"""Positional similarity maps (paper Fig. 5): how sure a stochastic position is of its place.

For a query patch q, StoP feeds the predictor the position ψ_q + A n with n ~ N(0, σ² I_{d_e})
(Σ = σ² A Aᵀ). We draw that many times and, for each draw, take its cosine similarity with
the deterministic ψ_k of every patch k, then average over draws:

    S_σ(q, k) = E_n[ cos(ψ_q + A n, ψ_k) ]

Averaging the similarities, not the embeddings, is what shows the uncertainty: the mean of
ψ_q + A n is ψ_q itself, so the similarity of the averaged embedding would converge to the
σ = 0 map as draws grow and hide exactly what the figure is for. At σ = 0 the map is
cos(ψ_q, ψ_k), peaked at q with value 1; as σ grows the peak drops and more positions come
within reach of it.

With the fixed-covariance ablation (cov="fixed") the noise is N(0, σ² I) in predictor width.

For one checkpoint the figure shows S_0, S_σ and S_σ − S_0 (on a diverging scale of its own: a
small σ‖A‖ moves the maps by less than one colour step of the first scale). For several, each
checkpoint's S at its own σ, side by side on one scale: I-JEPA beside StoP, as in the paper.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from stoptool.errors import UserError
from stoptool.models.predictor import Predictor
from stoptool.viz.common import (
    FigureResult,
    check_dpi,
    check_out,
    checkpoint_grid,
    checkpoint_name,
    default_path,
    parse_cells,
    save_figure,
    write_json,
)

CELL_INCHES = 1.5  # side of one query's heatmap


def default_queries(grid: int, n: int = 3) -> list[tuple[int, int]]:
    """An n × n spread of patches over the grid, away from the border when the grid allows."""
    if n < 1:
        raise UserError(f"queries N needs N >= 1, got {n}", key="queries")
    n = min(n, grid)
    if n == 1:
        return [(grid // 2, grid // 2)]
    margin = 1 if grid >= n + 2 else 0
    steps = np.linspace(margin, grid - 1 - margin, n).round().astype(int).tolist()
    return [(r, c) for r in steps for c in steps]


def parse_queries(text: str | None, grid: int) -> list[tuple[int, int]]:
    """`--queries`: None (3 × 3 spread), "N" (N × N spread) or "r,c;r,c;..."."""
    if text is None:
        return default_queries(grid)
    if text.strip().isdigit():
        n = int(text)
        if n > grid:
            raise UserError(f"queries {n} asks for a {n}×{n} spread of patches, but the patch grid "
                            f"is {grid}×{grid}: give at most {grid}", key="queries")
        return default_queries(grid, n)
    return parse_cells(text, grid, "queries")


MAX_DRAWS = 1_000_000  # the mean's sampling error is then about 1e-3 of a cosine's spread


def check_noise(sigma: float, draws: int) -> None:
    if not sigma >= 0 or sigma == float("inf"):
        raise UserError(f"sigma must be >= 0 (it is the noise standard deviation), got {sigma}", key="sigma")
    if not 1 <= draws <= MAX_DRAWS:
        raise UserError(f"draws must be between 1 and {MAX_DRAWS:,}, got {draws}", key="draws")


@torch.no_grad()
def similarity_maps(
    predictor: Predictor,
    queries: Sequence[tuple[int, int]],
    sigma: float,
    draws: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """S_σ(q, ·) for each query (row, col): [Q, grid, grid] cosine similarities in [-1, 1]."""
    check_noise(sigma, draws)
    grid = predictor.grid
    psi = predictor.predictor_pos_embed[0].detach().float()  # [N, d_p]
    idx = torch.tensor([r * grid + c for r, c in queries], dtype=torch.long)
    query = psi[idx]  # [Q, d_p]
    if sigma == 0:
        sims = F.normalize(query, dim=-1) @ F.normalize(psi, dim=-1).T
        return sims.clamp(-1, 1).reshape(len(queries), grid, grid)  # rounding can pass ±1
    if predictor.cov == "fixed":
        width, project = predictor.pred_dim, None
    else:
        width, project = predictor.embed_dim, predictor.A.detach().float()  # [d_p, d_e]
    unit_psi = F.normalize(psi, dim=-1)
    total = torch.zeros(len(queries), psi.size(0))
    chunk = max(1, 2**22 // (len(queries) * max(width, psi.size(0))))  # bounds memory
    for start in range(0, draws, chunk):
        d = min(chunk, draws - start)
        noise = torch.randn(d, len(queries), width, generator=generator) * sigma
        if project is not None:
            noise = noise @ project.T  # A n
        noisy = F.normalize(query[None] + noise, dim=-1)  # [d, Q, d_p]
        total += (noisy @ unit_psi.T).sum(0)
    return (total / draws).clamp(-1, 1).reshape(len(queries), grid, grid)


def _layout(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


BAR_INCHES = 1.0  # one colour bar and its label


def figure_size(n_queries: int, checkpoints: int = 1) -> tuple[float, float]:
    """Inches. One checkpoint: three blocks of query maps (σ = 0, σ, their difference) and two
    colour bars; several: one block each and one colour bar. A title above."""
    rows, cols = _layout(n_queries)
    blocks, bars = (3, 2) if checkpoints == 1 else (checkpoints, 1)
    return blocks * cols * CELL_INCHES + bars * BAR_INCHES, rows * CELL_INCHES + 1.0


def _draw_block(sub, maps: torch.Tensor, queries, name: str, cmap: str, vmin: float, vmax: float):
    """One block of query maps titled `name`; returns the last image (for a colour bar)."""
    rows, cols = _layout(len(queries))
    sub.suptitle(name, fontsize=10)
    axes = sub.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    image = None
    for ax, m, (r, c) in zip(axes.flat, maps, queries, strict=False):  # spare axes stay off
        ax.set_axis_on()
        image = ax.imshow(m.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.plot(c, r, marker="+", color="black" if cmap == "RdBu_r" else "red", markersize=8,
                markeredgewidth=1.5)
        label = f"min {float(m.min()):+.3f}" if cmap == "RdBu_r" else f"peak {float(m.max()):.3f}"
        ax.set_title(f"q = ({r}, {c})  {label}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def _colour_bar(sub, image, label: str) -> None:
    sub.colorbar(image, cax=sub.add_axes((0.08, 0.12, 0.22, 0.72))).set_label(label)


def draw_similarity(
    deterministic: torch.Tensor,
    stochastic: torch.Tensor,
    queries: Sequence[tuple[int, int]],
    sigma: float,
    draws: int,
    title: str = "",
) -> Figure:
    """Three blocks of heatmaps: σ = 0, σ (one colour scale for both, so the lower peaks of the
    stochastic maps show as such), and stochastic minus deterministic on a diverging scale of
    its own, so that an effect too small to see on the first scale is visible."""
    fig = Figure(figsize=figure_size(len(queries)), layout="constrained")
    fig.suptitle(title or r"Positional similarity $\cos(\psi_q + A n, \psi_k)$, mean over draws of n")
    # narrow subfigures hold the colour bars, so every block gets the same room
    widths = (1.0, 1.0, 0.2, 1.0, 0.2)
    left, right, bar, diff, diff_bar = fig.subfigures(1, 5, wspace=0.02, width_ratios=widths)
    vmin = float(min(deterministic.min(), stochastic.min()))
    _draw_block(left, deterministic, queries, "σ = 0 (deterministic ψ)", "viridis", vmin, 1.0)
    image = _draw_block(right, stochastic, queries, f"σ = {sigma:g} (StoP), mean of {draws} draws", "viridis",
                        vmin, 1.0)
    _colour_bar(bar, image, "cosine similarity")
    delta = stochastic - deterministic
    reach = max(float(delta.abs().max()), 1e-6)
    name = f"difference: σ = {sigma:g} minus σ = 0"
    image = _draw_block(diff, delta, queries, name, "RdBu_r", -reach, reach)
    _colour_bar(diff_bar, image, "difference of cosine similarity")
    return fig


def draw_comparison(panels: Sequence[tuple[str, torch.Tensor]], queries: Sequence[tuple[int, int]],
                    title: str) -> Figure:
    """One block of heatmaps per checkpoint (`panels`: its title and maps), on one colour scale
    (the paper's Fig. 5)."""
    fig = Figure(figsize=figure_size(len(queries), len(panels)), layout="constrained")
    fig.suptitle(title)
    subs = fig.subfigures(1, len(panels) + 1, wspace=0.02, width_ratios=(1.0,) * len(panels) + (0.2,))
    vmin = float(min(maps.min() for _, maps in panels))
    image = None
    for sub, (name, maps) in zip(subs, panels, strict=False):
        image = _draw_block(sub, maps, queries, name, "viridis", vmin, 1.0)
    _colour_bar(subs[-1], image, "cosine similarity")
    return fig


DEFAULT_SIGMA = 0.25  # the paper's σ for ViT-B/L, used when a checkpoint was trained without noise


@dataclass
class _Loaded:
    path: Path
    meta: dict
    trained_sigma: float


def _read(ckpt: str | Path) -> _Loaded:
    from stoptool.io.checkpoint import read_meta, resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    return _Loaded(path, meta, float(meta.get("sigma", 0.0)))


def _predictor(ckpt: Path) -> Predictor:
    from stoptool.io.models import load_model

    return load_model(ckpt, need_predictor=True).model.predictor


def make_similarity(
    ckpts: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    sigma: float | None = None,
    draws: int = 256,
    queries: str | None = None,
    seed: int = 0,
    dpi: int = 150,
) -> FigureResult:
    """Load the checkpoint(s), compute the maps, write the figure and its numbers. One
    checkpoint: σ = 0, its σ and their difference. Several: each at its own σ, side by side."""
    paths = [ckpts] if isinstance(ckpts, (str, Path)) else list(ckpts)
    if not paths:
        raise UserError("give at least one checkpoint")
    # everything the metadata can check is checked before the weights are read
    loaded = [_read(p) for p in paths]
    first = loaded[0].path
    path = check_out(out, default_path(first, "similarity" if len(loaded) == 1 else "similarity-compare"))
    check_dpi(dpi)
    check_noise(sigma if sigma is not None else 0.0, draws)
    grids = {checkpoint_grid(x.meta) for x in loaded}
    if len(grids) > 1:
        sides = " vs ".join(f"{g}×{g}" for g in sorted(grids))
        raise UserError(f"the checkpoints have different patch grids ({sides}): compare checkpoints of one "
                        "grid")
    cells = parse_queries(queries, grids.pop())
    generator = torch.Generator().manual_seed(seed)
    if len(loaded) == 1:
        return _single(loaded[0], path, sigma, draws, cells, seed, dpi, generator)
    return _compare(loaded, path, sigma, draws, cells, seed, dpi, generator)


def _single(ck: _Loaded, path: Path, sigma, draws, cells, seed, dpi, generator) -> FigureResult:
    if sigma is None:
        sigma = ck.trained_sigma if ck.trained_sigma > 0 else DEFAULT_SIGMA
    predictor = _predictor(ck.path)
    deterministic = similarity_maps(predictor, cells, 0.0)
    stochastic = similarity_maps(predictor, cells, sigma, draws, generator)
    title = (
        f"Positional similarity of {checkpoint_name(ck.path)} ({ck.meta.get('arch', '?')}, trained σ = "
        f"{ck.trained_sigma:g}, step {ck.meta.get('step', '?')}): "
        r"$\cos(\psi_q + A n, \psi_k)$"
    )
    save_figure(draw_similarity(deterministic, stochastic, cells, sigma, draws, title), path, dpi)
    delta = stochastic - deterministic
    data = {
        "checkpoint": str(ck.path), "trained_sigma": ck.trained_sigma, "sigma": sigma, "draws": draws,
        "seed": seed, "grid": predictor.grid, "cov": predictor.cov, "queries": cells,
        "peak_deterministic": [round(float(m.max()), 5) for m in deterministic],
        "peak_stochastic": [round(float(m.max()), 5) for m in stochastic],
        "largest_difference": round(float(delta.abs().max()), 5),
        "deterministic": deterministic.round(decimals=5).tolist(),
        "stochastic": stochastic.round(decimals=5).tolist(),
        "difference": delta.round(decimals=5).tolist(),
    }
    rows = {
        "checkpoint": ck.path, "trained σ": f"{ck.trained_sigma:g}", "σ drawn": f"{sigma:g}",
        "draws": draws, "patch grid": f"{predictor.grid}×{predictor.grid}",
        "queries": " ".join(f"{r},{c}" for r, c in cells),
        "mean peak, σ = 0": f"{np.mean(data['peak_deterministic']):.3f}",
        f"mean peak, σ = {sigma:g}": f"{np.mean(data['peak_stochastic']):.3f}",
        "largest |difference|": f"{data['largest_difference']:.4f}",
    }
    return FigureResult(path, write_json(path.with_suffix(".json"), data), rows)


def _compare(loaded: list[_Loaded], path: Path, sigma, draws, cells, seed, dpi, generator) -> FigureResult:
    panels, entries = [], []
    for ck in loaded:
        drawn = ck.trained_sigma if sigma is None else sigma
        maps = similarity_maps(_predictor(ck.path), cells, drawn, draws, generator)
        method = "StoP" if ck.trained_sigma > 0 else "I-JEPA"
        name = f"{checkpoint_name(ck.path)}: {method}, σ = {drawn:g}"
        if drawn != ck.trained_sigma:
            name += f" (trained σ = {ck.trained_sigma:g})"
        panels.append((name, maps))
        entries.append({"checkpoint": str(ck.path), "trained_sigma": ck.trained_sigma, "sigma": drawn,
                        "peak": [round(float(m.max()), 5) for m in maps],
                        "maps": maps.round(decimals=5).tolist()})
    title = (r"Positional similarity $\cos(\psi_q + A n, \psi_k)$, each checkpoint at its σ, "
             f"mean of {draws} draws where σ > 0")
    save_figure(draw_comparison(panels, cells, title), path, dpi)
    data = {"draws": draws, "seed": seed, "queries": cells, "checkpoints": entries}
    rows = {"queries": " ".join(f"{r},{c}" for r, c in cells), "draws": draws}
    for entry in entries:
        rows[f"{entry['checkpoint']} (σ = {entry['sigma']:g})"] = f"mean peak {np.mean(entry['peak']):.3f}"
    return FigureResult(path, write_json(path.with_suffix(".json"), data), rows)
