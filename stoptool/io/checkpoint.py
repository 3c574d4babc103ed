"""stoptool checkpoints: one safetensors file, tensors plus a JSON metadata block.

Tensor names are prefixed by their part: `encoder.`, `target_encoder.`, `predictor.`,
`opt.state.<i>.<name>` (AdamW moments) and the random states `rng.cpu` (`rng.cuda` on a GPU;
under torchrun `rng.cpu.rank<r>` and `rng.cuda.rank<r>` for the other processes too); a
fine-tuned classifier holds its encoder under `encoder.` and its linear layer under `head.`.
The metadata block holds `{"format": "stoptool", "meta": "<json>"}`, where the JSON names what
the file holds (`kind`: `pretrain`, `imported`, `finetune`, or, exported for timm,
`timm-encoder` and `timm-classifier`), the arch, image size, patch, σ,
ablation flags, step, epoch, config, data description and stoptool version; `sha256` is the
digest of every tensor's name and bytes, checked whenever the tensors are read, so a file
damaged after it was written is refused instead of loaded. Writes go to a temporary file that
is renamed over the target, so a reader never sees a half-written checkpoint.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stoptool import __version__
from stoptool.errors import UserError
from stoptool.io.paths import atomic_write, check_file
from stoptool.models.archs import Covariance, NoiseOn, PredPos

FORMAT = "stoptool"
TIMM_ENCODER = "timm-encoder"  # the `kind` of an encoder exported for timm
TIMM_CLASSIFIER = "timm-classifier"  # a fine-tuned classifier (encoder and head) exported for timm
FINETUNE = "finetune"  # a `stoptool finetune` run's checkpoint: encoder and head, trained end to end


@dataclass
class Checkpoint:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    digest: str | None = None  # the sha256 the tensors were checked against; None: none written

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state dict stored under `prefix.` (e.g. "encoder")."""
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def part_raw(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose full name starts with `prefix`, names kept."""
        return {k: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def has(self, prefix: str) -> bool:
        p = prefix + "."
        return any(k.startswith(p) for k in self.tensors)


def stoptool_view(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with its tensors under the usual part prefixes.

    An exported timm file names its tensors as timm does (`blocks.0.attn.qkv.weight`); it
    holds the target encoder, or the context encoder when exported with which="context"; an
    exported classifier's linear layer (`head.*`) keeps its name.
    """
    if ckpt.meta.get("kind") not in (TIMM_ENCODER, TIMM_CLASSIFIER):
        return ckpt
    part = "encoder" if ckpt.meta.get("which") == "context" else "target_encoder"
    named = {k if k.startswith("head.") else f"{part}.{k}": v for k, v in ckpt.tensors.items()}
    return Checkpoint(ckpt.meta, named, ckpt.digest)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    needed = sum(t.numel() * t.element_size() for t in tensors.values())  # (the header adds a little)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), sync=True, needed=needed)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of `tensors`, in name order (also the
    probe's key for an encoder's features)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    meta = dict(ckpt.meta)
    meta.setdefault("stoptool_version", __version__)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ckpt.tensors.items()}
    metadata = {"format": FORMAT, "meta": json.dumps(meta), "sha256": tensors_digest(tensors)}
    atomic_save_file(tensors, Path(path), metadata)


LATEST = "latest.safetensors"  # a run directory's resumable checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory standing for its latest checkpoint."""
    path = Path(path)
    if path.is_dir():
        if not (path / LATEST).is_file():
            raise UserError(f"'{path}' is a directory without a {LATEST} checkpoint")
        return path / LATEST
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a stoptool checkpoint, without reading its tensors."""
    return _open(path, tensors=False).meta


def load_checkpoint(path: str | Path) -> Checkpoint:
    return _open(path, tensors=True)


def _open(path: str | Path, tensors: bool) -> Checkpoint:
    path = check_file(resolve_checkpoint(path), "checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            if raw.get("format") != FORMAT or "meta" not in raw:
                raise UserError(
                    f"'{path}' is a safetensors file but not a stoptool checkpoint "
                    "(for plain encoder weights, run 'stoptool import' first)"
                )
            meta = json.loads(raw["meta"])
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"'{path}' is not a readable stoptool checkpoint (truncated or another format): "
            f"{str(err).splitlines()[0][:120]}"
        ) from None
    if not (isinstance(meta, dict) and isinstance(meta.get("arch"), str)
            and isinstance(meta.get("img_size"), int)):
        raise UserError(f"'{path}' is tagged as a stoptool checkpoint but its metadata lacks the arch "
                        "and image size (a damaged or hand-made file)")
    _check_meta(path, meta)
    if tensors and "sha256" in raw and tensors_digest(data) != raw["sha256"]:  # older files have none
        raise UserError(f"'{path}' is damaged: its tensors do not match the checksum written with them")
    return Checkpoint(meta, data, raw.get("sha256") if tensors else None)


KINDS = ("pretrain", "imported", FINETUNE, TIMM_ENCODER, TIMM_CLASSIFIER)
RESUMABLE = ("pretrain", FINETUNE)  # kinds a run resumes from
# read off the types the Predictor's arguments are declared with: an option the model gains
# is accepted here with it
PREDICTOR_CHOICES = {
    "pred_pos": get_args(PredPos), "noise_on": get_args(NoiseOn), "cov": get_args(Covariance),
}


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """The metadata values the loaders act on have their types and ranges: the checksum covers
    the tensors only, so an edited metadata block is caught here, not deep in a command."""
    def bad(key: str, want: str) -> UserError:
        value = meta.get(key)
        return UserError(f"'{path}' has metadata {key} = {value!r}, not {want} (a damaged or hand-made file)")

    if meta.get("kind", "pretrain") not in KINDS:
        raise bad("kind", "one of " + ", ".join(KINDS))
    sigma = meta.get("sigma", 0.0)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < math.inf:
        raise bad("sigma", "a number >= 0")
    for key in ("img_size", "pred_depth", "pred_width"):
        value = meta.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(key, "a positive integer")
    if meta.get("kind", "pretrain") in RESUMABLE:  # what a resume reads
        for key, least in (("step", 0), ("epoch", 0), ("iterations_per_epoch", 1)):
            value = meta.get(key, least)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise bad(key, f"an integer >= {least}")
        if not isinstance(meta.get("optimizer_groups", []), list):
            raise bad("optimizer_groups", "a list")
    for key, choices in PREDICTOR_CHOICES.items():
        if key in meta and meta[key] not in choices:
            raise bad(key, "one of " + ", ".join(choices))
    if meta.get("which", "target") not in ("target", "context"):
        raise bad("which", "target or context")
    if meta.get("kind") in (FINETUNE, TIMM_CLASSIFIER):  # the head's shape is read from it
        value = meta.get("num_classes")
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise bad("num_classes", "an integer >= 2")


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer state dict into named tensors plus JSON-able param groups."""
    tensors = {
        f"opt.state.{i}.{name}": torch.as_tensor(value)
        for i, slots in state["state"].items()
        for name, value in slots.items()
    }
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt.state."):
            idx, name = key[len("opt.state.") :].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}
