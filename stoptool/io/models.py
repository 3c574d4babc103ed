"""Build networks from a checkpoint file: the one loader every command uses.

It reads pretrain checkpoints, imported ones (`stoptool import`, possibly encoder-only),
encoders exported for timm (`stoptool export --to timm`: timm's bare names, seen here as the
one encoder they hold) and fine-tuned classifiers (`stoptool finetune`, and their timm
export), whose encoder every command reads as it reads any other and whose linear head
`classifier_head` gives.
"""

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from stoptool.errors import UserError, plural
from stoptool.io.checkpoint import (
    FINETUNE,
    TIMM_CLASSIFIER,
    Checkpoint,
    load_checkpoint,
    stoptool_view,
)
from stoptool.models.encoder import build_encoder
from stoptool.models.jepa import JEPA, build_jepa


@dataclass
class Loaded:
    model: JEPA  # predictor is None for encoder-only files
    meta: dict
    checkpoint: Checkpoint


WHICH = {"target": "target_encoder", "context": "encoder"}  # --which: the part it names
CLASSIFIERS = (FINETUNE, TIMM_CLASSIFIER)  # kinds that hold a fine-tuned encoder and its head


def encoder_part(ckpt: Checkpoint, which: str, path) -> str:
    """The part of `ckpt` (a stoptool view) that holds the `which` encoder. A fine-tuned
    classifier holds one encoder, trained end to end from one of the pair: it stands for either.
    A checkpoint that lacks the `which` encoder (e.g. the context encoder of a file exported
    with the target encoder alone) is refused, naming the one it holds."""
    held = [w for w, part in WHICH.items() if ckpt.has(part)]
    if not held:
        raise UserError(f"'{path}' holds no encoder weights")
    check_stoptool_encoder(ckpt.meta, path)
    if ckpt.meta.get("kind") in CLASSIFIERS:
        return WHICH[held[0]]
    if ckpt.has(WHICH[which]):
        return WHICH[which]
    raise UserError(f"'{path}' holds only the {held[0]} encoder; take which={held[0]}", key="which")


def check_stoptool_encoder(meta: dict, path) -> None:
    """Refuse a classifier `stoptool finetune` trained from a timm model (`timm:NAME`): its
    weights are that model's (class token, its own blocks), not an encoder of a stoptool arch."""
    if "timm_model" in meta and meta.get("kind") in CLASSIFIERS:
        raise UserError(f"'{path}' is timm's {meta['timm_model']} fine-tuned, not a stoptool encoder: "
                        "stoptool finetune resumes it; other commands read stoptool's encoders")


def check_holds(ckpt: Checkpoint, which: str, path) -> None:
    """Refuse a checkpoint that lacks the `which` encoder (see `encoder_part`)."""
    encoder_part(ckpt, which, path)


def classifier_head(ckpt: Checkpoint, width: int, path) -> dict[str, torch.Tensor]:
    """The linear head of a fine-tuned classifier (`weight` [classes, width], `bias`
    [classes]), checked against the class count its metadata records; {} for an encoder. A
    head norm the run trained with (a BatchNorm without scale and shift, `head_norm.*`) is
    folded into it: the standardisation x -> (x - mean) / std it was trained behind."""
    head = ckpt.part("head")
    if ckpt.meta.get("kind") not in CLASSIFIERS:
        return {}
    classes = ckpt.meta["num_classes"]
    _check_shapes(head, {"weight": (classes, width), "bias": (classes,)}, f"a head of {classes} classes",
                  path)
    check_finite({f"head.{k}": v for k, v in head.items()}, f"'{path}'")
    if ckpt.meta.get("head_norm", "none") == "none":
        return head
    stats = ckpt.part("head_norm")
    _check_shapes(stats, {"mean": (width,), "std": (width,)}, "a head norm", path)
    check_finite({f"head.{k}": v for k, v in stats.items()}, f"'{path}'")
    weight = head["weight"].double() / stats["std"].double()
    bias = head["bias"].double() - weight @ stats["mean"].double()
    return {"weight": weight.to(head["weight"].dtype), "bias": bias.to(head["bias"].dtype)}


def _check_shapes(tensors: dict[str, torch.Tensor], want: dict[str, tuple], what: str, path) -> None:
    if {k: tuple(v.shape) for k, v in tensors.items()} != want:
        found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items())) or "none"
        raise UserError(f"'{path}' should hold {what} ({', '.join(f'{k} {v}' for k, v in want.items())}), "
                        f"but holds {found} (a damaged or hand-made file)")


def model_from_checkpoint(ckpt: Checkpoint, source: str = "checkpoint") -> JEPA:
    meta = ckpt.meta
    check_stoptool_encoder(meta, source)
    if ckpt.has("predictor"):
        fields = {
            "arch": meta["arch"], "img_size": meta["img_size"], "sigma": meta.get("sigma", 0.0),
            "pred_depth": meta["pred_depth"], "pred_width": meta["pred_width"],
            "pred_pos": meta.get("pred_pos", "sincos"), "noise_on": meta.get("noise_on", "masked"),
            "cov": meta.get("cov", "learned"),
        }
        model = build_jepa(SimpleNamespace(**fields), drawn=False)  # every weight is loaded below
        model.predictor.load_state_dict(ckpt.part("predictor"))
    else:
        model = JEPA(build_encoder(meta["arch"], meta["img_size"], drawn=False), None)
    if not ckpt.has("encoder") and not ckpt.has("target_encoder"):
        raise UserError(f"{source} holds no encoder weights")
    encoder_part = "encoder" if ckpt.has("encoder") else "target_encoder"
    target_part = "target_encoder" if ckpt.has("target_encoder") else "encoder"
    model.encoder.load_state_dict(ckpt.part(encoder_part))
    model.target_encoder.load_state_dict(ckpt.part(target_part))
    check_finite(ckpt.tensors, source)
    return model


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse network weights holding NaN or inf (a file from a diverged run, say): every
    feature, prediction and probe made from them would be NaN. Optimizer state is not looked at."""
    parts = ("encoder.", "target_encoder.", "predictor.", "head.")
    bad = [k for k, v in tensors.items()
           if k.startswith(parts) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{source} holds weights that are not finite (NaN or inf) in "
                        f"{plural(len(bad), 'tensor')}, first '{bad[0]}': it cannot be used")


def load_model(path: str | Path, need_predictor: bool = False) -> Loaded:
    """Load a stoptool checkpoint into a JEPA in eval mode on the CPU."""
    ckpt = stoptool_view(load_checkpoint(path))
    if need_predictor and not ckpt.has("predictor"):
        raise UserError(f"'{path}' holds an encoder only; this command needs a predictor too")
    model = model_from_checkpoint(ckpt, f"'{path}'").eval()
    return Loaded(model, ckpt.meta, ckpt)
