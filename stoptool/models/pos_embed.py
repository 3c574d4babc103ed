"""Fixed 2-D sine-cosine positional embeddings, as in MAE and I-JEPA.

Half of the channels encode the row, half the column; each half, of width h = d/2, is
[sin | cos] at frequencies 1 / 10000^(2k/h) for k = 0 .. h/2 - 1.
"""

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """Return a [grid_h * grid_w, dim] float32 table in raster (row-major) order."""
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"sine-cosine embedding width must be a multiple of 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    # I-JEPA/MAE order: the first half is driven by the column index, the second by the row.
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return emb.float()
