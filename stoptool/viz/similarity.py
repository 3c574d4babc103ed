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
"""

import math
from collections.abc import Sequence
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


def figure_size(n_queries: int) -> tuple[float, float]:
    """Inches: two blocks of query maps side by side, a colour bar, a title."""
    rows, cols = _layout(n_queries)
    return 2 * cols * CELL_INCHES + 1.0, rows * CELL_INCHES + 1.0


def draw_similarity(
    deterministic: torch.Tensor,
    stochastic: torch.Tensor,
    queries: Sequence[tuple[int, int]],
    sigma: float,
    draws: int,
    title: str = "",
) -> Figure:
    """Two blocks of heatmaps, σ = 0 on the left and σ on the right, on one colour scale."""
    rows, cols = _layout(len(queries))
    fig = Figure(figsize=figure_size(len(queries)), layout="constrained")
    fig.suptitle(title or r"Positional similarity $\cos(\psi_q + A n, \psi_k)$, mean over draws of n")
    # A third, narrow subfigure holds the colour bar so both blocks get the same room.
    left, right, bar = fig.subfigures(1, 3, wspace=0.02, width_ratios=(1.0, 1.0, 0.2))
    # One scale for both blocks, so the lower peaks of the stochastic maps are visible as such.
    vmin = float(min(deterministic.min(), stochastic.min()))
    image = None
    for sub, maps, name in (
        (left, deterministic, "σ = 0 (deterministic ψ)"),
        (right, stochastic, f"σ = {sigma:g} (StoP), mean of {draws} draws"),
    ):
        sub.suptitle(name, fontsize=10)
        axes = sub.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, m, (r, c) in zip(axes.flat, maps, queries, strict=False):  # spare axes stay off
            ax.set_axis_on()
            image = ax.imshow(m.numpy(), cmap="viridis", vmin=vmin, vmax=1.0,
                              interpolation="nearest")
            ax.plot(c, r, marker="+", color="red", markersize=8, markeredgewidth=1.5)
            ax.set_title(f"q = ({r}, {c})  peak {float(m.max()):.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    bar.colorbar(image, cax=bar.add_axes((0.08, 0.12, 0.22, 0.72))).set_label("cosine similarity")
    return fig


DEFAULT_SIGMA = 0.25  # the paper's σ for ViT-B/L, used when a checkpoint was trained without noise


def make_similarity(
    ckpt: str | Path,
    out: str | Path | None = None,
    sigma: float | None = None,
    draws: int = 256,
    queries: str | None = None,
    seed: int = 0,
    dpi: int = 150,
) -> FigureResult:
    """Load a checkpoint, compute both blocks of maps, write the figure and its numbers."""
    from stoptool.io.checkpoint import read_meta, resolve_checkpoint
    from stoptool.io.models import load_model

    ckpt = resolve_checkpoint(ckpt)
    path = check_out(out, default_path(ckpt, "similarity"))
    check_dpi(dpi)
    # everything the metadata can check is checked before the weights are read
    meta = read_meta(ckpt)
    trained_sigma = float(meta.get("sigma", 0.0))
    if sigma is None:
        sigma = trained_sigma if trained_sigma > 0 else DEFAULT_SIGMA
    check_noise(sigma, draws)
    cells = parse_queries(queries, checkpoint_grid(meta))
    predictor = load_model(ckpt, need_predictor=True).model.predictor
    generator = torch.Generator().manual_seed(seed)
    deterministic = similarity_maps(predictor, cells, 0.0)
    stochastic = similarity_maps(predictor, cells, sigma, draws, generator)
    title = (
        f"Positional similarity of {checkpoint_name(ckpt)} ({meta.get('arch', '?')}, trained σ = "
        f"{trained_sigma:g}, step {meta.get('step', '?')}): "
        r"$\cos(\psi_q + A n, \psi_k)$"
    )
    save_figure(draw_similarity(deterministic, stochastic, cells, sigma, draws, title), path, dpi)
    data = {
        "checkpoint": str(ckpt), "trained_sigma": trained_sigma, "sigma": sigma, "draws": draws,
        "seed": seed, "grid": predictor.grid, "cov": predictor.cov, "queries": cells,
        "peak_deterministic": [round(float(m.max()), 5) for m in deterministic],
        "peak_stochastic": [round(float(m.max()), 5) for m in stochastic],
        "deterministic": deterministic.round(decimals=5).tolist(),
        "stochastic": stochastic.round(decimals=5).tolist(),
    }
    rows = {
        "checkpoint": ckpt, "trained σ": f"{trained_sigma:g}", "σ drawn": f"{sigma:g}",
        "draws": draws, "patch grid": f"{predictor.grid}×{predictor.grid}",
        "queries": " ".join(f"{r},{c}" for r, c in cells),
        "mean peak, σ = 0": f"{np.mean(data['peak_deterministic']):.3f}",
        f"mean peak, σ = {sigma:g}": f"{np.mean(data['peak_stochastic']):.3f}",
    }
    return FigureResult(path, write_json(path.with_suffix(".json"), data), rows)
