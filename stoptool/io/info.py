"""What `stoptool info` shows of a checkpoint or a model folder: table rows, the whole as JSON,
and the run's config where the file holds one."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoptool.io.checkpoint import load_checkpoint, resolve_checkpoint, stoptool_view
from stoptool.io.folders import describe_folder, is_model_folder

PARTS = ("encoder", "target_encoder", "predictor", "head")
SHOWN = ("arch", "img_size", "patch", "sigma", "pred_depth", "pred_width", "pred_pos", "noise_on", "cov",
         "a_l1", "step", "epoch", "precision", "source", "method", "mask_token_from", "which", "timm_model",
         "stoptool_version")


@dataclass
class Description:
    title: str
    rows: dict[str, Any]
    data: dict[str, Any]  # what --json prints
    config: dict[str, Any] | None = None  # the run's resolved config, where the file holds one


def describe(path: str | Path) -> Description:
    """A checkpoint (a run directory stands for its latest) or a model folder, described."""
    path = Path(path)
    if is_model_folder(path):
        rows, whole = describe_folder(path)
        return Description(f"model folder {path.name}", rows, whole)
    path = resolve_checkpoint(path)
    ck = stoptool_view(load_checkpoint(path))
    meta = ck.meta
    rows = {"file": path, "kind": meta.get("kind", "?"), "size": f"{path.stat().st_size / 2**20:.1f} MiB"}
    rows.update({key: meta[key] for key in SHOWN if key in meta})
    if "method_from" in meta and "method" in rows:  # an imported checkpoint: which rule decided
        rows["method"] = f"{meta['method']} ({meta['method_from']})"
    if "data" in meta:
        rows["data"] = ", ".join(f"{k}={v}" for k, v in meta["data"].items())
    if "num_classes" in meta:  # a fine-tuned classifier
        rows.update(describe_classifier(meta))
    for part in PARTS:
        if ck.has(part):
            rows[f"{part} params"] = f"{sum(t.numel() for t in ck.part(part).values()):,}"
    rows["holds"] = ", ".join(p.replace("_", " ") for p in PARTS if ck.has(p)) + (
        "" if ck.has("predictor") else " (no predictor)")
    rows["tensors sha256"] = (f"{ck.digest} (checked)" if ck.digest
                              else "none (written before checkpoints carried one)")
    data = {**meta, "tensors_sha256": ck.digest}
    return Description(f"checkpoint {path.name}", rows, data, meta.get("config"))


def describe_classifier(meta: dict) -> dict[str, object]:
    """What `stoptool info` shows of a fine-tuned classifier's checkpoint, row name -> value."""
    names = meta.get("classes") or []
    shown = ", ".join(str(c) for c in names[:5]) + (", ..." if len(names) > 5 else "")
    rows: dict[str, object] = {"classes": f"{meta['num_classes']}" + (f" ({shown})" if shown else "")}
    done = meta.get("finetuned") or {}
    if done:
        count = done.get("train_images")
        used = f"{count:,} training images" if isinstance(count, int) else "training images"
        if done.get("subset"):
            used += f" (subset {done['subset']})"
        elif done.get("fraction", 1) < 1:
            used += f" ({done['fraction']:g} of the labels)"
        rows["fine-tuned"] = f"from {done.get('from', '?')} on {done.get('dataset', '?')}, {used}"
    return rows
