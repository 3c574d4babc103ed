"""`stoptool track`: propagate each DAVIS sequence's first-frame masks with a frozen encoder,
write the masks in DAVIS's layout and score them; `--score-only` scores any method's masks.

Everything a user can get wrong (paths, the release's layout, sizes, options) is checked
before the first file is written. The results go where the official evaluation puts them, in
its layout: `global_results-SPLIT.csv` and `per-sequence_results-SPLIT.csv` (one row per object,
named SEQ_ID), with everything else in `results-SPLIT.json`.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stoptool.errors import UserError, plural
from stoptool.io.checkpoint import load_checkpoint, stoptool_view, tensors_digest
from stoptool.io.models import check_holds, model_from_checkpoint
from stoptool.io.paths import check_writable, write_report, write_text_atomic
from stoptool.models.archs import parse_arch
from stoptool.runs import RunLock
from stoptool.track.config import TrackConfig
from stoptool.track.davis import (
    VOID,
    Sequence,
    open_davis,
    prediction_paths,
    read_ids,
    read_prediction,
    write_ids,
)
from stoptool.track.metrics import STATISTICS, ObjectScore, score_sequence, summarize
from stoptool.track.propagate import (
    LONG_SIDE_MULTIPLE,
    MEAN,
    STD,
    check_sincos,
    extract,
    first_labels,
    frame_flops,
    input_size,
    propagate,
    propagation_flops,
    to_ids,
)
from stoptool.train.runtime import (
    attention_impl,
    autocast_factory,
    device_sync,
    resolve_device,
    resolve_precision,
    set_attention,
)

Progress = Callable[[str, int, int], None]  # progress(what, done, total): "sequences" and "frames"


@dataclass
class TrackReport:
    scores: list[ObjectScore]
    summary: dict[str, float] | None  # None: no sequence had ground truth past its first frame
    info: dict
    out: Path
    written: list[Path]
    notes: list[str] = field(default_factory=list)

    COLUMNS = ("Sequence", "J-Mean", "F-Mean", "J&F-Mean")

    def title(self) -> str:
        i = self.info
        what = f"{i['encoder']} ({i['which']}, {i['arch']})" if "arch" in i else i["predictions"]
        return f"DAVIS 2017 {i['split']}: {what}"

    def table(self) -> list[tuple[str, ...]]:
        """One row per object, as the official per-sequence results (in %)."""
        return [(s.name, _pc(s.j_mean), _pc(s.f_mean), _pc((s.j_mean + s.f_mean) / 2)) for s in self.scores]

    def rows(self) -> dict[str, str]:
        """The global results (in %) and what they were computed over."""
        i = self.info
        rows = {k: _pc(v) for k, v in (self.summary or {}).items()}
        if self.summary is None:
            rows["scores"] = "none: no sequence has ground truth past its first frame"
        rows["objects"] = f"{len(self.scores)} in {plural(i['sequences'], 'sequence')}"
        rows["frames"] = f"{i['frames']:,} ({i['scored_frames']:,} scored)"
        if "input_sizes" in i:
            rows["input"] = ", ".join(f"{s} ({n})" for s, n in i["input_sizes"].items())
            rows["device"] = f"{i['device']}, {i['precision']}"
            g = i["gflops"]
            rows["compute"] = (f"{_flop(g['extraction'])} encoder, {_flop(g['propagation'])} propagation "
                               "(counted)")
            s = i["seconds"]
            rows["time"] = (f"{s['total']:.1f} s: extraction {s['extract']:.1f}, propagation "
                            f"{s['propagate']:.1f}, scoring {s['score']:.1f} "
                            f"({i['frames_per_s']:.1f} frames/s)")
        return rows

    def closing(self) -> str:
        where = [p.name for p in self.written]
        masks = f"masks in {self.out}/SEQ/; " if "arch" in self.info else ""
        return f"{masks}results in {self.out}: {', '.join(where)}"


def _pc(value: float) -> str:
    return f"{100 * value:.1f}"


def _flop(gflop: float) -> str:
    return f"{gflop / 1e3:,.1f} TFLOP" if gflop >= 1e3 else f"{gflop:,.1f} GFLOP"


def run_track(cfg: TrackConfig, progress: Progress | None = None) -> TrackReport:
    """Propagate and score per `cfg`, or score `cfg.score_only`'s masks."""
    cfg.validate()
    if cfg.score_only is not None:
        return score_only(cfg, progress)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, fp16=False)
    sequences = open_davis(cfg.davis, cfg.split, cfg.sequence)  # (reading the release costs less)
    out = check_out(cfg.out_dir(), Path(cfg.davis))
    encoder, info = load_encoder(cfg)
    patch = parse_arch(info["arch"])[1]
    sizes = {s.name: input_size(*s.size, cfg.short_side, patch) for s in sequences}
    encoder = encoder.to(device)
    set_attention(encoder, attention_impl("auto", device, precision, training=False))
    autocast = autocast_factory(device, precision)
    info.update(_run_info(cfg, sequences, sizes, info["arch"], device, precision))
    lock = RunLock(out, "track")
    note = lock.acquire()
    try:
        tracked = _track_all(cfg, sequences, sizes, encoder, patch, device, autocast, out, progress)
        info["seconds"] = tracked.seconds
        info["frames_per_s"] = info["frames"] / max(tracked.seconds["total"], 1e-9)
        report = finish(out, cfg.split, tracked.scores, info)
    finally:
        lock.release()
    report.notes += [n for n in (note, _unscored_note(sequences)) if n]
    return report


def load_encoder(cfg: TrackConfig) -> tuple[torch.nn.Module, dict]:
    """The encoder `cfg.which` of the checkpoint (asked for before any network is built)."""
    ckpt = stoptool_view(load_checkpoint(cfg.ckpt))
    check_holds(ckpt, cfg.which, cfg.ckpt)
    model = model_from_checkpoint(ckpt, f"'{cfg.ckpt}'")
    net = model.target_encoder if cfg.which == "target" else model.encoder
    check_sincos(net)
    meta = ckpt.meta
    keep = ("kind", "arch", "img_size", "sigma", "step", "epoch", "source")
    return net.eval(), {"encoder": cfg.ckpt, "which": cfg.which, "arch": meta["arch"],
                        "encoder_sha256": tensors_digest(net.state_dict()),
                        "checkpoint_meta": {k: meta[k] for k in keep if k in meta}}


def check_out(out: Path, davis: Path) -> Path:
    """The output folder: a directory (or none yet) that can be written, and not inside the
    release's own frames or masks (a prediction must never overwrite the ground truth)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file; give a folder", key="out")
    inside = [davis / part for part in ("Annotations", "JPEGImages")]
    resolved = out.resolve()
    if resolved == davis.resolve() or any(resolved.is_relative_to(p.resolve()) for p in inside):
        raise UserError(f"output '{out}' is inside the DAVIS release: write the masks elsewhere", key="out")
    check_writable(out / "results.json")
    return out


@dataclass
class _Tracked:
    scores: list[ObjectScore]
    seconds: dict[str, float]


def _track_all(cfg: TrackConfig, sequences: list[Sequence], sizes: dict, encoder, patch: int,
               device: torch.device, autocast, out: Path, progress: Progress | None) -> _Tracked:
    total_frames = sum(len(s.frames) for s in sequences)
    seconds = {"extract": 0.0, "propagate": 0.0, "score": 0.0}
    scores: list[ObjectScore] = []
    done = 0
    start = time.perf_counter()

    def frames_done(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("frames", done, total_frames)

    for i, seq in enumerate(sequences):
        if progress:
            progress("sequences", i, len(sequences))
        ids = track_sequence(seq, encoder, patch, sizes[seq.name], cfg, device, autocast, frames_done,
                             seconds)
        for frame, mask in zip(seq.frames, ids):
            write_ids(out / seq.name / f"{frame.stem}.png", mask)
        if seq.scored:
            t = time.perf_counter()
            truth = (read_ids(a) for a in seq.annotations[1:-1])
            scores += score_sequence(seq.name, truth, ids[1:-1], seq.objects)
            seconds["score"] += time.perf_counter() - t
    if progress:
        progress("sequences", len(sequences), len(sequences))
    seconds["total"] = time.perf_counter() - start
    return _Tracked(scores, seconds)


def track_sequence(seq: Sequence, encoder, patch: int, size: tuple[int, int], cfg: TrackConfig,
                   device: torch.device, autocast, frames_done: Callable[[int], None],
                   seconds: dict[str, float]) -> list[np.ndarray]:
    """The object ids of every frame of `seq`: the first annotation (void made background),
    then the propagated masks. Adds its extraction and propagation time to `seconds`."""
    t = time.perf_counter()
    with torch.inference_mode():
        features = extract(encoder, seq.frames, size, device, autocast, cfg.batch_size, frames_done)
        device_sync(device)
        seconds["extract"] += time.perf_counter() - t
        t = time.perf_counter()
        grid = (size[0] // patch, size[1] // patch)
        first_ids = read_ids(seq.annotations[0])
        first = first_labels(first_ids, seq.objects, grid, device)
        ids = [np.where(first_ids == VOID, 0, first_ids).astype(np.uint8)]
        steps = propagate(features, first, grid, cfg.n_last_frames, cfg.topk, cfg.radius, cfg.temperature)
        ids += [to_ids(labels, grid, patch, seq.size) for labels in steps]
    seconds["propagate"] += time.perf_counter() - t
    return ids


def _run_info(cfg: TrackConfig, sequences: list[Sequence], sizes: dict, arch: str, device,
              precision: str) -> dict:
    per_size: dict[str, int] = {}
    for size in sizes.values():
        key = f"{size[1]}×{size[0]}"
        per_size[key] = per_size.get(key, 0) + 1
    extraction = sum(len(s.frames) * frame_flops(arch, sizes[s.name]) for s in sequences)
    # (the first frames have a shorter context than n_last_frames + 1: an upper bound)
    propagation = sum((len(s.frames) - 1) * propagation_flops(arch, sizes[s.name], cfg.n_last_frames + 1,
                                                              s.objects + 1) for s in sequences)
    return {
        "davis": str(Path(cfg.davis).expanduser().resolve()), "split": cfg.split, "sequences": len(sequences),
        "frames": sum(len(s.frames) for s in sequences),
        "scored_frames": sum(len(s.frames) - 2 for s in sequences if s.scored),
        "protocol": {"short_side": cfg.short_side, "long_side_multiple": LONG_SIDE_MULTIPLE,
                     "n_last_frames": cfg.n_last_frames, "topk": cfg.topk, "radius": cfg.radius,
                     "temperature": cfg.temperature, "mean": MEAN, "std": STD},
        "input_sizes": per_size, "device": str(device), "precision": precision,
        "gflops": {"extraction": extraction / 1e9, "propagation": propagation / 1e9},
    }


def _unscored_note(sequences: list[Sequence]) -> str | None:
    unscored = [s.name for s in sequences if not s.scored]
    if not unscored:
        return None
    return (f"{plural(len(unscored), 'sequence')} with the first frame's annotation alone (as in test-dev) "
            f"propagated but not scored: {', '.join(unscored[:5])}{' ...' if len(unscored) > 5 else ''}")


def score_only(cfg: TrackConfig, progress: Progress | None = None) -> TrackReport:
    """Score the masks in `cfg.score_only` against the release's ground truth. Every predicted
    mask is read and checked before the results are written."""
    sequences = open_davis(cfg.davis, cfg.split, cfg.sequence)
    bare = [s.name for s in sequences if not s.scored]
    if bare:
        raise UserError(f"sequence '{bare[0]}' has the first frame's annotation alone: there is nothing to "
                        "score against (test-dev's masks are scored by the challenge's server)")
    pred_dir = Path(cfg.score_only)
    paths = {s.name: prediction_paths(pred_dir, s) for s in sequences}
    out = check_out(cfg.out_dir(), Path(cfg.davis))
    start = time.perf_counter()
    scores: list[ObjectScore] = []
    for i, seq in enumerate(sequences):
        if progress:
            progress("sequences", i, len(sequences))
        truth = (read_ids(a) for a in seq.annotations[1:-1])
        pred = (read_prediction(p, seq) for p in paths[seq.name])
        scores += score_sequence(seq.name, truth, pred, seq.objects)
    if progress:
        progress("sequences", len(sequences), len(sequences))
    info = {"predictions": str(pred_dir), "davis": str(Path(cfg.davis).expanduser().resolve()),
            "split": cfg.split, "sequences": len(sequences), "frames": sum(len(s.frames) for s in sequences),
            "scored_frames": sum(len(s.frames) - 2 for s in sequences),
            "seconds": {"score": time.perf_counter() - start}}
    return finish(out, cfg.split, scores, info)


def finish(out: Path, split: str, scores: list[ObjectScore], info: dict) -> TrackReport:
    """Write the results (the official CSVs where anything was scored, and the JSON) and
    return the report."""
    summary = summarize(scores) if scores else None
    written = []
    if summary is not None:
        written += write_csvs(out, split, summary, scores)
    by_sequence: dict[str, list[ObjectScore]] = {}
    for s in scores:
        by_sequence.setdefault(s.sequence, []).append(s)
    sequences = [{"sequence": name, "objects": len(objs), "J-Mean": float(np.mean([o.j_mean for o in objs])),
                  "F-Mean": float(np.mean([o.f_mean for o in objs]))} for name, objs in by_sequence.items()]
    doc = {**info, "global": summary, "per_sequence": sequences, "per_object": [s.as_dict() for s in scores]}
    json_path = out / f"results-{split}.json"
    write_report(json_path, doc)
    return TrackReport(scores, summary, info, out, [*written, json_path])


def write_csvs(out: Path, split: str, summary: dict[str, float], scores: list[ObjectScore]) -> list[Path]:
    """The official evaluation's two result files: its column names, one row of global
    statistics, one row per object, three decimals."""
    global_csv = out / f"global_results-{split}.csv"
    values = ",".join(f"{summary[k]:.3f}" for k in STATISTICS)
    write_text_atomic(global_csv, ",".join(STATISTICS) + "\n" + values + "\n")
    lines = ["Sequence,J-Mean,F-Mean", *(f"{s.name},{s.j_mean:.3f},{s.f_mean:.3f}" for s in scores)]
    sequence_csv = out / f"per-sequence_results-{split}.csv"
    write_text_atomic(sequence_csv, "\n".join(lines) + "\n")
    return [global_csv, sequence_csv]
