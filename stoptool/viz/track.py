"""Video object segmentation drawn (the task of the paper's Table 3): frames of a DAVIS
sequence with the propagated masks over them, above the same frames with the ground truth,
each titled with its J&F; optionally every frame, prediction beside truth, as an animated GIF.

Reads what `stoptool track` writes (OUT/SEQ/00000.png ... and `results-SPLIT.json`, which
names the DAVIS folder), or any folder of masks in DAVIS's layout given with --davis.
"""

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from stoptool.data.datasets import read_rgb
from stoptool.errors import UserError
from stoptool.io.paths import atomic_write, check_writable
from stoptool.track.davis import Sequence, open_sequence, palette, read_ids
from stoptool.track.metrics import boundary, boundary_f, jaccard
from stoptool.viz.common import FigureResult, check_dpi, check_out, save_figure, write_json

PANEL_INCHES = 3.2
GIF_WIDTH = 427  # each half of a GIF frame: DAVIS's 854 px frames at half size
GIF_MS = 100  # per frame: DAVIS is 24 frames/s; a tenth of a second reads better


def find_masks(run_or_dir: str | Path, seq: str) -> Path:
    """The folder holding SEQ/: RUN_OR_DIR itself, or the newest `*.davis-*` folder in it."""
    path = Path(run_or_dir)
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise UserError(f"'{path}' {state}: give what stoptool track wrote, or the run directory it wrote "
                        "beside")
    if (path / seq).is_dir():
        return path
    found = sorted((p for p in path.glob("*.davis-*") if (p / seq).is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"'{path}' holds no '{seq}/' folder of masks, nor a *.davis-* folder with one: give "
                        "what stoptool track wrote")
    return found[-1]


def davis_root(masks: Path, davis: str | Path | None) -> Path:
    """--davis, else the DAVIS folder recorded in the masks folder's results JSON."""
    if davis is not None:
        return Path(davis)
    recorded = None
    for report in sorted(masks.glob("results-*.json")):
        try:
            recorded = json.loads(report.read_text()).get("davis") or recorded
        except (OSError, ValueError, AttributeError):
            continue
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
    if recorded:
        raise UserError(f"the DAVIS folder '{recorded}' that '{masks}' records is gone: give --davis PATH",
                        key="davis")
    raise UserError(f"'{masks}' records no DAVIS folder (no results JSON of stoptool track): give --davis "
                    "PATH", key="davis")


def overlay(frame: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`frame` with each object's pixels tinted its DAVIS colour and its boundary drawn solid."""
    colours = palette()
    out = frame.astype(np.float32)
    objects = ids > 0
    out[objects] = (1 - alpha) * out[objects] + alpha * colours[ids[objects]]
    for o in np.unique(ids[objects]):
        out[boundary(ids == o)] = colours[o]
    return out.astype(np.uint8)


def frame_score(truth: np.ndarray, pred: np.ndarray, objects: int) -> dict[str, float]:
    """J, F and their mean on one frame, each averaged over the sequence's objects."""
    j = [jaccard(truth == o, pred == o) for o in range(1, objects + 1)]
    f = [boundary_f(truth == o, pred == o) for o in range(1, objects + 1)]
    return {"J": float(np.mean(j)), "F": float(np.mean(f)), "J&F": float((np.mean(j) + np.mean(f)) / 2)}


def predicted_paths(masks: Path, seq: Sequence) -> list[Path]:
    paths = [masks / seq.name / f"{f.stem}.png" for f in seq.frames]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"'{missing[0]}' is missing: the folder holds masks for {len(paths) - len(missing)} "
                        f"of the {len(paths)} frames of '{seq.name}'")
    return paths


def make_track(run_or_dir: str | Path, seq_name: str, davis: str | Path | None = None, frames: int = 5,
               gif: str | Path | None = None, out: str | Path | None = None, dpi: int = 150) -> FigureResult:
    check_dpi(dpi)
    if not 2 <= frames <= 12:
        raise UserError(f"frames must be between 2 and 12, got {frames}", key="frames")
    masks = find_masks(run_or_dir, seq_name)
    seq = open_sequence(davis_root(masks, davis), seq_name)
    paths = predicted_paths(masks, seq)
    fig_path = check_out(out, masks / "figures" / f"track-{seq_name}.png")
    gif_path = _check_gif(gif)
    shown = sorted({int(i) for i in np.linspace(0, len(seq.frames) - 1, frames).round()})
    fig, scores = _figure(seq, paths, shown)
    save_figure(fig, fig_path, dpi)
    if gif_path is not None:
        write_gif(seq, paths, gif_path)
    data = {"sequence": seq_name, "masks": str(masks), "objects": seq.objects, "frames": scores,
            "figure": str(fig_path), "gif": str(gif_path) if gif_path else None}
    json_path = write_json(fig_path.with_suffix(".json"), data)
    rows = {"sequence": f"{seq_name} ({len(seq.frames)} frames, {seq.objects} objects)", "masks": str(masks),
            "frames shown": ", ".join(s["frame"] for s in scores)}
    if gif_path is not None:
        rows["gif"] = str(gif_path)
    return FigureResult(fig_path, json_path, rows)


def _check_gif(gif: str | Path | None) -> Path | None:
    if gif is None:
        return None
    path = Path(gif)
    if path.suffix.lower() != ".gif" or path.is_dir():
        raise UserError(f"gif '{path}' must be a file name ending in .gif", key="gif")
    return check_writable(path)


def _figure(seq: Sequence, paths: list[Path], shown: list[int]) -> tuple[Figure, list[dict]]:
    h, w = seq.size
    fig = Figure(figsize=(PANEL_INCHES * len(shown), 2 * PANEL_INCHES * h / w + 0.8), layout="constrained")
    axes = fig.subplots(2, len(shown), squeeze=False)
    scores = []
    for col, i in enumerate(shown):
        frame, pred = np.asarray(read_rgb(seq.frames[i])), read_ids(paths[i])
        truth = read_ids(seq.annotations[i]) if seq.scored or i == 0 else None
        entry = {"frame": seq.frames[i].stem}
        title = f"frame {seq.frames[i].stem}"
        if i == 0:
            title += " (given)"
        elif truth is not None:
            entry.update(frame_score(truth, pred, seq.objects))
            title += f"\nJ&F {100 * entry['J&F']:.1f}"
        scores.append(entry)
        _panel(axes[0, col], overlay(frame, pred), title)
        _panel(axes[1, col], overlay(frame, truth) if truth is not None else frame,
               None if truth is not None else "no ground truth")
    axes[0, 0].set_ylabel("prediction")
    axes[1, 0].set_ylabel("ground truth")
    fig.suptitle(f"{seq.name}: propagated masks (top) and ground truth (bottom)", fontsize=10)
    return fig, scores


def _panel(ax, image: np.ndarray, title: str | None) -> None:
    ax.imshow(image, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def write_gif(seq: Sequence, paths: list[Path], path: Path) -> Path:
    """Every frame, prediction (left) beside ground truth (right, or the bare frame where there
    is none), each half GIF_WIDTH pixels wide."""
    h, w = seq.size
    size = (GIF_WIDTH, max(1, round(GIF_WIDTH * h / w)))
    images = []
    for i, frame_path in enumerate(seq.frames):
        frame = np.asarray(read_rgb(frame_path))
        truth = read_ids(seq.annotations[i]) if seq.scored or i == 0 else None
        left = Image.fromarray(overlay(frame, read_ids(paths[i])))
        right = Image.fromarray(overlay(frame, truth) if truth is not None else frame)
        both = Image.new("RGB", (2 * size[0], size[1]))
        both.paste(left.resize(size, Image.BILINEAR), (0, 0))
        both.paste(right.resize(size, Image.BILINEAR), (size[0], 0))
        images.append(both)
    return atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True,
                                                          append_images=images[1:], duration=GIF_MS, loop=0),
                        suffix=".gif")
