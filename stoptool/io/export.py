"""Export an encoder for timm: one safetensors file that timm's VisionTransformer loads (the
hub folders, `--to hf` and `--to transformers`, are `io/hub.py`'s).

A stoptool encoder *is* a timm `VisionTransformer(class_token=False, global_pool="avg",
fc_norm=False, ...)`, so the export writes its state dict under timm's names and nothing
else. A fine-tuned classifier (`stoptool finetune`) is the same network with a linear `head`
on the pooled tokens, i.e. that VisionTransformer with `num_classes` set: its export adds the
head, and timm gives its logits. The safetensors metadata also says what the file is (`format:
stoptool`, `kind: timm-encoder` or `timm-classifier`), which timm ignores and `stoptool info` /
`load_model` read.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stoptool.errors import UserError
from stoptool.io.checkpoint import (
    TIMM_CLASSIFIER,
    TIMM_ENCODER,
    Checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    stoptool_view,
)
from stoptool.io.models import WHICH, check_finite, classifier_head, encoder_part
from stoptool.io.official import check_state, encoder_shapes
from stoptool.io.paths import check_checkpoint_out, report_path, write_report
from stoptool.models.archs import parse_arch

# A registered timm name per size letter; the shape keyword arguments make it the right network.
TIMM_NAMES = {
    "n": "vit_tiny_patch16_224", "t": "vit_tiny_patch16_224", "s": "vit_small_patch16_224",
    "b": "vit_base_patch16_224", "l": "vit_large_patch16_224", "h": "vit_huge_patch14_224",
    "g": "vit_giant_patch14_224",
}


@dataclass
class Exported:
    out: Path
    meta: dict[str, Any]
    params: int
    line: str  # the Python that loads it with timm.create_model
    report: Path  # the JSON written beside it

    def rows(self) -> dict[str, Any]:
        """The table `stoptool export --to timm` prints."""
        m = self.meta
        return {"file": self.out, "encoder": m["which"], "arch": m["arch"], "img_size": m["img_size"],
                "params": f"{self.params:,}", "timm model": m["timm_model"], "report": self.report}


def timm_model_args(arch: str, img_size: int, num_classes: int = 0) -> tuple[str, dict[str, Any]]:
    """A registered model name and the keyword arguments that make it this encoder (with a
    linear head of `num_classes` outputs: the fine-tuned classifier)."""
    spec, patch = parse_arch(arch)
    size = {"n": "nano", "t": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge", "g": "giant"}
    letter = arch[len("vit_")]
    exact = f"vit_{size[letter]}_patch{patch}_{img_size}"
    try:
        import timm

        name = exact if timm.is_model(exact) else TIMM_NAMES[letter]
    except ImportError:
        name = TIMM_NAMES[letter]
    kwargs: dict[str, Any] = dict(
        num_classes=num_classes, class_token=False, global_pool="avg", fc_norm=False, img_size=img_size,
        patch_size=patch, embed_dim=spec.width, depth=spec.depth, num_heads=spec.heads,
    )
    if spec.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = spec.mlp_ratio
    return name, kwargs


def timm_line(name: str, kwargs: dict[str, Any], path: Path) -> str:
    # the class count (0: the encoder alone) in the overlay too: timm then loads strictly (it
    # turns strict off when the model's class count differs from the pretrained config's,
    # hiding a missing key).
    # custom_load=False: the registered config of some names (vit_small_patch16_224's) marks its
    # weights as JAX .npz files, and timm before 1.0.31 keeps that mark for an overlaid file.
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    classes = kwargs.get("num_classes", 0)
    overlay = f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes={classes}, custom_load=False)"
    return f"import timm; model = timm.create_model({name!r}, pretrained=True, {overlay}, {args})"


def check_which(which: str) -> None:
    if which not in WHICH:
        raise UserError(f"which must be target or context, got '{which}'", key="which")


def read_encoder(ckpt_path: Path, which: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The `which` encoder of a checkpoint as timm's state dict (fp32; every key of timm's
    encoder, no other, each of its shape, all finite: never a half-filled export), with a
    fine-tuned classifier's `head.weight` and `head.bias`; what an export says of it (which,
    source, arch, image size, σ, method, step, epoch, data; a classifier's classes); and the
    checkpoint's own metadata."""
    ckpt = stoptool_view(load_checkpoint(ckpt_path))
    meta = ckpt.meta
    part = encoder_part(ckpt, which, ckpt_path)
    if "arch" not in meta or "img_size" not in meta:
        raise UserError(f"'{ckpt_path}' does not say its arch and image size")
    expected = encoder_shapes(meta["arch"], meta["img_size"])
    state = ckpt.part(part)
    check_state(expected, state, f"{which} encoder", ckpt_path, meta["arch"])
    check_finite({f"{part}.{k}": v for k, v in state.items()}, f"'{ckpt_path}'")
    tensors = {k: state[k].to(torch.float32).contiguous() for k in expected}
    head = classifier_head(ckpt, parse_arch(meta["arch"])[0].width, ckpt_path)
    tensors.update({f"head.{k}": v.to(torch.float32).contiguous() for k, v in head.items()})
    facts = {"which": which, "source": ckpt_path.name, "arch": meta["arch"], "img_size": meta["img_size"],
             "patch": parse_arch(meta["arch"])[1]}
    for key in ("sigma", "method", "step", "epoch", "data", "num_classes", "classes", "finetuned"):
        if key in meta:
            facts[key] = meta[key]
    return tensors, facts, meta


def export_timm(ckpt_path: str | Path, out: str | Path, which: str = "target") -> Exported:
    """Write the `which` encoder ("target" or "context") of `ckpt_path` to `out` for timm; of a
    fine-tuned classifier, its encoder and head."""
    ckpt_path, out = resolve_checkpoint(ckpt_path), Path(out)
    check_which(which)
    check_checkpoint_out(out, ckpt_path, "export")
    tensors, facts, _ = read_encoder(ckpt_path, which)
    name, kwargs = timm_model_args(facts["arch"], facts["img_size"], facts.get("num_classes", 0))
    kind = TIMM_CLASSIFIER if "head.weight" in tensors else TIMM_ENCODER
    out_meta = {"kind": kind, **facts, "timm_model": name, "timm_kwargs": kwargs}
    save_checkpoint(out, Checkpoint(out_meta, tensors))
    line = timm_line(name, kwargs, out.resolve())
    params = sum(t.numel() for t in tensors.values())
    report = write_report(report_path(out, "export"), {
        "file": str(out), "checkpoint": str(ckpt_path), **out_meta, "params": params, "load": line,
    })
    return Exported(out, out_meta, params, line, report)
