"""What every figure shares: output paths, atomic writes, images, patch-grid outlines.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global
backend is switched, no window can open, and nothing leaks between figures in one process.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from stoptool.data.datasets import read_rgb
from stoptool.data.transforms import to_tensor
from stoptool.errors import UserError
from stoptool.io.paths import asset, atomic_write, check_file, check_writable, write_report


@dataclass
class FigureResult:
    figure: Path  # the image written
    data: Path  # the numbers behind it, as JSON
    rows: dict  # a summary for the terminal


FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
# The shown image is at least this many pixels wide, whatever size the model reads.
DISPLAY_SIZE = 224
# Outline colours of the context block and of the target blocks (in turn), in every figure
TARGET_COLORS = ("#ff3b30", "#ff9500", "#af52de", "#007aff", "#ff2d55", "#5ac8fa")
CONTEXT_COLOR = "#34c759"


def sample_image_path() -> Path:
    """The photo shipped with stoptool (see stoptool/assets/README.txt)."""
    return asset("china.jpg")


def check_out(out: str | Path | None, default: Path) -> Path:
    """The figure's path: `out` or `default`; the extension picks the format (.png if none)."""
    path = Path(out) if out is not None else default
    if path.is_dir():
        raise UserError(
            f"out '{path}' is a directory; give a file name such as {path / default.name}", key="out"
        )
    if path.suffix == "":
        path = path.with_suffix(".png")
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"cannot write '{path}': the figure format comes from the extension, one of "
            f"{', '.join(FORMATS)}"
        )
    if path.is_dir():
        raise UserError(
            f"out '{path}' is a directory; give a file name such as {path / default.name}", key="out"
        )
    return check_writable(path, beside=(path.with_suffix(".json").name,))  # the numbers go beside it


def check_dpi(dpi: int) -> int:
    if not 10 <= dpi <= 1200:
        raise UserError(f"dpi must be between 10 and 1200, got {dpi}", key="dpi")
    return dpi


def save_figure(fig: Figure, path: Path, dpi: int) -> Path:
    """Write `fig` at its own size (no tight cropping, so pixels = inches × dpi)."""
    fmt = FORMATS[path.suffix.lower()]
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi), suffix=path.suffix)
    return path


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_report(path, data)


def load_image(path: str | Path | None, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The central square of an image: a normalized [3, size, size] tensor for the model and
    an RGB uint8 array of the same region, at least DISPLAY_SIZE wide, to draw on."""
    path = Path(path) if path is not None else sample_image_path()
    check_file(path, "image")
    try:
        img = read_rgb(path)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read image '{path}': {str(err).splitlines()[0][:120]}") from None
    w, h = img.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    model_input = to_tensor(img.resize((size, size), Image.BICUBIC, box=box))
    shown = max(size, DISPLAY_SIZE)
    display = np.asarray(img.resize((shown, shown), Image.BICUBIC, box=box))
    return model_input, display


def outline(ax, cells: np.ndarray, color, linewidth: float = 2.0, extent: float = 1.0,
            **kwargs) -> None:
    """Draw the border of a set of patches: `cells` is a boolean [grid, grid] array, the
    axes span [0, extent] in both directions with row 0 at the top."""
    grid = cells.shape[0]
    cell = extent / grid
    padded = np.pad(cells, 1)
    segments = []
    for r, c in zip(*np.nonzero(cells), strict=True):
        x0, x1, y0, y1 = c * cell, (c + 1) * cell, r * cell, (r + 1) * cell
        pr, pc = r + 1, c + 1
        if not padded[pr - 1, pc]:
            segments.append([(x0, y0), (x1, y0)])
        if not padded[pr + 1, pc]:
            segments.append([(x0, y1), (x1, y1)])
        if not padded[pr, pc - 1]:
            segments.append([(x0, y0), (x0, y1)])
        if not padded[pr, pc + 1]:
            segments.append([(x1, y0), (x1, y1)])
    ax.add_collection(LineCollection(segments, colors=[color], linewidths=linewidth, **kwargs))


def cells_of(indices: torch.Tensor | np.ndarray, grid: int) -> np.ndarray:
    """Raster patch indices -> boolean [grid, grid] array."""
    cells = np.zeros(grid * grid, dtype=bool)
    cells[np.asarray(indices, dtype=np.int64).reshape(-1)] = True
    return cells.reshape(grid, grid)


def show_image(ax, image: np.ndarray, title: str | None = None) -> None:
    """Draw an RGB image on axes spanning [0, 1] × [0, 1] (row 0 at the top)."""
    ax.imshow(image, extent=(0, 1, 1, 0), interpolation="bilinear")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def parse_cells(text: str, grid: int, key: str) -> list[tuple[int, int]]:
    """"r,c;r,c" -> [(r, c), ...], each inside the grid."""
    cells = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        try:
            r, c = (int(x) for x in part.split(","))
        except ValueError:
            raise UserError(f"{key} takes ROW,COL pairs separated by ';', got '{text}'", key=key) from None
        if not (0 <= r < grid and 0 <= c < grid):
            raise UserError(
                f"{key} {r},{c} is outside the {grid}×{grid} patch grid "
                f"(rows and columns 0..{grid - 1})", key=key
            )
        cells.append((r, c))
    if not cells:
        raise UserError(f"{key} names no patch, got '{text}'", key=key)
    return cells


def checkpoint_name(ckpt: Path) -> str:
    """`run/latest.safetensors`: the file alone says little when every run has a `latest`."""
    return f"{ckpt.parent.name}/{ckpt.name}" if ckpt.parent.name else ckpt.name


def checkpoint_grid(meta: dict) -> int:
    """Patches per side of the grid a checkpoint was trained on, from its metadata alone."""
    from stoptool.models.archs import parse_arch

    return int(meta["img_size"]) // parse_arch(meta["arch"])[1]


def default_path(anchor: Path, name: str) -> Path:
    """`figures/<name>.png` in the run directory that holds `anchor` (a checkpoint or a run)."""
    base = anchor if anchor.is_dir() else anchor.parent
    return base / "figures" / f"{name}.png"
