"""Import the released I-JEPA / StoP checkpoints, and encoder weights: a state dict under timm's
names or transformers' `IJepaModel`'s, or a model folder of either (`io/folders.py`).

The official code (facebookresearch/ijepa, amirbar/StoP) saves a `torch.save` dict with
`encoder`, `predictor`, `target_encoder`, `opt`, `scaler`, `epoch`, ...; its state-dict keys
may start with `module.` (DDP). The encoder keys are timm's ViT keys and the predictor keys
are our `Predictor`'s, so the tensors copy across unchanged. What the import decides:

* the arch, image size, and predictor depth and width, from the tensor shapes;
* the method, which fixes the mask token m̃. The StoP code builds a masked token as
  ψ + predictor_embed(n) = ψ + A n + b and never uses its `mask_token`, so m̃ := b; I-JEPA
  builds ψ + mask_token, so m̃ := mask_token (`method_evidence` says how it is told apart);
* σ, the noise standard deviation StoP trained with (0.25; 0.2 for ViT-H), 0 for I-JEPA.

Only tensors and plain containers are unpickled (`torch.load(weights_only=True)`), every
key is checked against the networks stoptool builds, and nothing is written until all of
it has passed.
"""

import json
import math
import pickletools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from stoptool.errors import UserError
from stoptool.io.checkpoint import FORMAT, Checkpoint, save_checkpoint
from stoptool.io.folders import has_ijepa_names, ijepa_to_timm, is_model_folder, open_folder
from stoptool.io.models import check_finite
from stoptool.io.paths import check_checkpoint_out, check_file, report_path, write_report
from stoptool.models.archs import ARCHS, parse_arch
from stoptool.models.encoder import timm_kwargs
from stoptool.models.pos_embed import sincos_2d
from stoptool.models.predictor import Predictor

METHODS = ("stop", "ijepa")
PARTS = ("encoder", "target_encoder", "predictor")
# The published checkpoints, by file name (the READMEs of facebookresearch/ijepa and amirbar/StoP).
PUBLISHED = {
    "IN1K-vit.h.14-300e.pth.tar": "ijepa",
    "IN1K-vit.h.16-448px-300e.pth.tar": "ijepa",
    "IN22K-vit.h.14-900e.pth.tar": "ijepa",
    "IN22K-vit.g.16-600e.pth.tar": "ijepa",
    "vit-b16.pth.tar": "stop",
    "vit-l16.pth.tar": "stop",
    "vit-h16.pth.tar": "stop",
}
_SCALARS = ("epoch", "loss", "batch_size", "world_size", "lr")
GIVEN = "given by the user"  # the `method_from` of a method passed in, not read from the file


@dataclass
class Imported:
    out: Path
    meta: dict[str, Any]
    parts: list[str]
    params: dict[str, int]
    notes: list[str] = field(default_factory=list)
    report: Path | None = None  # the JSON written beside `out`

    def rows(self) -> dict[str, Any]:
        """The table `stoptool import` prints."""
        meta = self.meta
        rows = {"checkpoint": self.out, "source": meta["source"], "arch": meta["arch"],
                "img_size": meta["img_size"], "patch": meta["patch"]}
        if "method" in meta:
            rows["kind"] = f"{meta['method']}: {meta['method_from']}"
        if "predictor" in self.parts:
            rows.update({"sigma": meta["sigma"], "predictor": f"{meta['pred_depth']} × {meta['pred_width']}",
                         "pred_pos": meta["pred_pos"], "m̃ from": meta["mask_token_from"]})
        if "epoch" in meta:
            rows["epoch"] = meta["epoch"]
        rows.update({f"{part} params": f"{n:,}" for part, n in self.params.items()})
        rows["report"] = self.report
        return rows


def default_sigma(method: str, arch: str) -> float:
    """σ the released runs used: 0 for I-JEPA; 0.25 for StoP ViT-B/L, 0.2 for ViT-H."""
    if method == "ijepa":
        return 0.0
    return 0.2 if arch.startswith("vit_h") else 0.25


# -- reading -------------------------------------------------------------------------------


def _safe_numpy_globals() -> list:
    """NumPy scalars and dtypes: a training script's `loss` or `lr` may be one. They rebuild
    a number from bytes and run no code, so they are safe to allow."""
    try:
        import numpy as np

        scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
        dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
        # numbers and booleans only: no object, string or void dtypes
        dtypes = [d for d in dtypes if issubclass(getattr(d, "type", object), (np.number, np.bool_))]
        return [scalar, np.dtype, *dtypes]
    except (ImportError, AttributeError):
        return []


def _unsafe_globals(path: Path) -> list[str]:
    """What the file would import and call, read from the pickle without running it."""
    allowed = _safe_numpy_names()
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an older torch, or a file it cannot parse: fall back to the message
        return []
    return sorted(set(found) - allowed)


def _pickle_globals(path: Path) -> list[str]:
    """The callables a bare pickle names, read opcode by opcode without running any (for
    pickles torch's own scan does not parse), less those torch's safe loader allows."""
    found: set[str] = set()
    try:
        with open(path, "rb") as f:
            while f.peek(1):  # torch's legacy format is several pickles, then raw bytes
                found |= _globals_of_one_pickle(f)
    except Exception:  # the raw bytes, or a damaged pickle: keep what was found before
        pass
    try:
        allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    except Exception:  # a torch without this private table: report everything
        allowed = set()
    return sorted(found - allowed - _safe_numpy_names())


def _safe_numpy_names() -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" for g in _safe_numpy_globals()}


def _globals_of_one_pickle(f) -> set[str]:
    """GLOBAL carries "module name"; STACK_GLOBAL takes the two strings pushed before it, which
    protocol 4 and up often fetch from the memo (a module named twice is written once)."""
    found, pushed, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(f):
        if op.name == "GLOBAL":
            found.add(str(arg).replace(" ", "."))
            pushed.append(None)
        elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
            found.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(None)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.stack_after:  # anything else that pushes: a string is all we need
            pushed.append(arg if isinstance(arg, str) else None)
    return found


def _torch_load(path: Path) -> Any:
    def load(mmap: bool) -> Any:
        with torch.serialization.safe_globals(_safe_numpy_globals()), warnings.catch_warnings():
            # torch warns of pickle protocols it did not write; what it cannot read is refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)  # a ViT-H checkpoint with its optimizer is ~10 GB
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            return load(mmap=False)  # the legacy (non-zip) format
    except Exception as err:  # torch raises many kinds here, all meaning "cannot read"
        text = str(err)
        found = []
        if "Weights only load failed" in text:
            found = (_unsafe_globals(path) or sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))
                     or _pickle_globals(path))
        if found:
            raise UserError(
                f"'{path}' needs arbitrary unpickling to load (it references "
                f"{', '.join(found)}); stoptool only reads tensors and plain containers "
                "(torch.load(weights_only=True)) and refuses it"
            ) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "")
        first = detail[:120] or type(err).__name__
        raise UserError(f"'{path}' is not a readable PyTorch checkpoint: {first}") from None


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") == FORMAT and _kind(meta) != "timm-encoder":
                raise UserError(f"'{path}' is already a stoptool checkpoint; nothing to import")
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"'{path}' is not a readable safetensors file: {str(err).splitlines()[0][:120]}"
        ) from None


def _kind(meta: dict[str, str]) -> str | None:
    try:
        return json.loads(meta.get("meta", "{}")).get("kind")
    except (ValueError, AttributeError):
        return None


def read_source(path: str | Path) -> dict[str, Any]:
    """The top-level dict of `path` (.pth.tar/.pth/.pt/.bin via torch, or .safetensors), or the
    weights of a timm or transformers model folder."""
    path = Path(path)
    if is_model_folder(path):
        path = open_folder(path).weights
    check_file(path, "source file")
    with open(path, "rb") as f:
        head = f.read(16)
    looks_safetensors = path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{")
    if not looks_safetensors and not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise UserError(
            f"'{path}' is not a checkpoint: torch.save writes a zip archive or a pickle, and "
            "safetensors files start with a JSON header; this file is none of them"
        )
    raw = _read_safetensors(path) if looks_safetensors else _torch_load(path)
    if not isinstance(raw, Mapping):
        raise UserError(f"'{path}' holds a {type(raw).__name__}, not a dict of state dicts")
    return dict(raw)


def _state_dict(obj: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"'{path}': '{what}' is not a state dict (a mapping of names to tensors)")
    out = {}
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _encoder_state(obj: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    """A bare encoder's state dict under timm's names (transformers' IJepaModel names renamed)."""
    sd = _state_dict(obj, what, path)
    return ijepa_to_timm(sd) if has_ijepa_names(sd) else sd


def split_parts(raw: dict[str, Any], path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """The state dicts of `raw` by part, and the layout: "official" or "state-dict"."""
    if any(p in raw for p in PARTS):
        parts = {p: _state_dict(raw[p], p, path) for p in PARTS if raw.get(p) is not None}
        if "encoder" not in parts and "target_encoder" not in parts:
            raise UserError(f"'{path}' has a predictor but no encoder or target_encoder")
        return parts, "official"
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        # a bare encoder (timm's or transformers' names): stored as the target encoder, the evaluated one
        return {"target_encoder": _encoder_state(raw, "state dict", path)}, "state-dict"
    for wrapper in ("state_dict", "model"):
        if isinstance(raw.get(wrapper), Mapping):
            return {"target_encoder": _encoder_state(raw[wrapper], wrapper, path)}, "state-dict"
    keys = ", ".join(sorted(map(str, raw))[:8])
    raise UserError(
        f"'{path}' is neither an I-JEPA/StoP checkpoint (encoder, predictor, target_encoder, ...) "
        f"nor an encoder state dict; its top-level keys are: {keys}"
    )


# -- shapes --------------------------------------------------------------------------------


def _block_count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _require(sd: dict[str, torch.Tensor], keys: tuple[str, ...], what: str, path: Path) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise UserError(f"'{path}': the {what} is missing {', '.join(missing)}")


def infer_arch(sd: dict[str, torch.Tensor], path: Path) -> tuple[str, int]:
    """(arch, image size) of an encoder state dict with timm's names."""
    _require(sd, ("pos_embed", "patch_embed.proj.weight"), "encoder", path)
    pos, proj = sd["pos_embed"], sd["patch_embed.proj.weight"]
    if pos.ndim != 3 or proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise UserError(f"'{path}': pos_embed {tuple(pos.shape)} / patch_embed.proj.weight "
                        f"{tuple(proj.shape)} are not a ViT's")
    width, patch = pos.shape[-1], proj.shape[-1]
    # The widths of the family are distinct, so the width names the size; a block too many
    # or too few then shows up as named keys when the shapes are checked.
    letter = next((k for k, s in ARCHS.items() if s.width == width), None)
    if letter is None:
        sizes = ", ".join(f"vit_{k}: {s.width}" for k, s in ARCHS.items())
        raise UserError(f"'{path}': a ViT {width} wide is none of stoptool's archs ({sizes})")
    return f"vit_{letter}{patch}", _grid(pos.shape[1], path) * patch


def _grid(n: int, path: Path) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise UserError(f"'{path}': pos_embed holds {n} positions, not a square grid "
                        "(a class token? stoptool's encoders have none)")
    return g


def check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str,
                path: Path, arch: str) -> None:
    """Missing, unexpected and misshapen keys, all listed: never a partial load."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in got and got[k].shape != v.shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise UserError(f"'{path}': the {what} does not match {arch}: " + "; ".join(problems))


def encoder_shapes(arch: str, img_size: int) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):  # shapes only: no memory, no init
        return VisionTransformer(**timm_kwargs(arch, img_size)).state_dict()


def _predictor_shapes(grid: int, arch: str, width: int, depth: int, pos: str) -> dict:
    spec, _ = parse_arch(arch)
    with torch.device("meta"):
        return Predictor(grid=grid, embed_dim=spec.width, pred_dim=width, depth=depth,
                         num_heads=spec.heads, pred_pos=pos).state_dict()


# -- which method trained the predictor ----------------------------------------------------


def _mask_token_trained(raw: dict[str, Any], parts: dict) -> bool | None:
    """Whether `mask_token` ever had a nonzero gradient, read from the AdamW state: in the StoP
    code it has no moments (no gradient) or zero ones (a zero gradient from DDP). None when
    the optimizer state cannot say.

    The official `init_opt` makes four groups from `named_parameters()`: encoder weights,
    predictor weights, encoder biases/1-D, predictor biases/1-D (weights: not 'bias' in the
    name and not 1-D). Parameter order equals state-dict order for these modules.
    """
    opt = raw.get("opt")
    if not isinstance(opt, Mapping) or "encoder" not in parts or "predictor" not in parts:
        return None
    groups, state = opt.get("param_groups"), opt.get("state")
    if not isinstance(groups, list) or len(groups) != 4 or not isinstance(state, Mapping):
        return None

    def decayed(sd):
        return [k for k, v in sd.items() if "bias" not in k and v.ndim != 1]

    enc_w, pred_w = decayed(parts["encoder"]), decayed(parts["predictor"])
    try:
        ids = [list(g["params"]) for g in groups]
    except (KeyError, TypeError):
        return None
    if len(ids[0]) != len(enc_w) or len(ids[1]) != len(pred_w) or "mask_token" not in pred_w:
        return None

    def moved(name: str) -> bool | None:
        """Whether `name` has AdamW moments from a nonzero gradient (None: not AdamW's)."""
        slots = state.get(ids[1][pred_w.index(name)])
        if slots is None:
            return False  # no gradient ever reached it
        second = slots.get("exp_avg_sq") if isinstance(slots, Mapping) else None
        if not isinstance(second, torch.Tensor):
            return None
        return bool(second.abs().max() > 0)

    if not moved("predictor_embed.weight"):
        return None  # the predictor never stepped (or not with AdamW): no evidence
    return moved("mask_token")


def method_evidence(raw: dict[str, Any], parts: dict, path: Path) -> tuple[str, str] | None:
    """(method, why) from the optimizer state, then the file name; None if neither says."""
    trained = _mask_token_trained(raw, parts)
    if trained is not None:
        if trained:
            return "ijepa", "the optimizer state shows mask_token was trained, as in I-JEPA"
        return "stop", "the optimizer state shows mask_token never got a gradient, as in StoP"
    if path.name in PUBLISHED:
        method = PUBLISHED[path.name]
        repo = "amirbar/StoP" if method == "stop" else "facebookresearch/ijepa"
        return method, f"the file name is that of a checkpoint published in {repo}"
    tokens = set(re.split(r"[^a-z0-9]+", path.name.lower()))
    if "stop" in tokens:
        return "stop", "the file name says stop"
    if tokens & {"ijepa", "jepa"}:
        return "ijepa", "the file name says jepa"
    return None


# -- the import ----------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        value = value.item()  # numpy scalar
    return value if isinstance(value, (int, float, str, bool)) else None


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    arch: str | None = None,
    method: str | None = None,
    sigma: float | None = None,
) -> Imported:
    """Convert `src` into the stoptool checkpoint `out` (kind "imported")."""
    src, out = Path(src), Path(out)
    if method is not None and method not in METHODS:
        raise UserError(f"method (what trained the checkpoint) must be one of {', '.join(METHODS)}, "
                        f"got '{method}'")
    if sigma is not None and (sigma < 0 or not math.isfinite(sigma)):
        raise UserError(f"sigma must be >= 0 (it is the noise standard deviation), got {sigma}")
    check_checkpoint_out(out, src, "import")

    raw = read_source(src)
    parts, layout = split_parts(raw, src)
    folder = open_folder(src) if is_model_folder(src) else None
    facts = _folder_facts(folder.facts) if folder else {}
    if folder:
        layout = f"{folder.layout}-folder"
        if facts.get("which") == "context" and list(parts) == ["target_encoder"]:  # as exported
            parts = {"encoder": parts.pop("target_encoder")}
    encoders = [p for p in ("target_encoder", "encoder") if p in parts]
    first = parts[encoders[0]]
    if arch is None:
        arch, img_size = infer_arch(first, src)
    else:  # checked against every shape below
        _require(first, ("pos_embed",), "encoder", src)
        img_size = _grid(first["pos_embed"].shape[1], src) * parse_arch(arch)[1]
    expected = encoder_shapes(arch, img_size)
    for p in encoders:
        check_state(expected, parts[p], p.replace("_", " "), src, arch)

    patch = parse_arch(arch)[1]
    grid = img_size // patch
    notes: list[str] = folder.notes if folder else []
    meta: dict[str, Any] = {
        "kind": "imported", "source": src.name, "source_layout": layout,
        "arch": arch, "img_size": img_size, "patch": patch, **facts,
    }

    if "predictor" in parts:
        pred, found = _import_predictor(raw, parts, src, arch, grid, method, sigma)
        meta.update(found)
        parts = {**parts, "predictor": pred}
    else:
        if method is not None:
            meta.update({"method": method, "method_from": GIVEN})
        if sigma is not None:
            notes.append("sigma ignored: the file holds no predictor")
        notes.append("encoder only: commands that need a predictor (viz heatmap, viz similarity) "
                     "cannot use it")

    for key in _SCALARS:
        value = _scalar(raw.get(key)) if layout == "official" else None
        if value is not None:
            meta[key if key == "epoch" else f"source_{key}"] = value
    tensors = _flat_tensors(parts)
    check_finite(tensors, f"'{src}'")  # a diverged run's file: refused now, not at every later use
    save_checkpoint(out, Checkpoint(meta, tensors))
    params = {p: sum(v.numel() for v in sd.values()) for p, sd in parts.items()}
    report = write_report(report_path(out, "import"), {
        "checkpoint": str(out), "source_file": str(src), **meta, "params": params, "notes": notes,
    })
    return Imported(out, meta, list(parts), params, notes, report)


def _import_predictor(raw: dict, parts: dict, src: Path, arch: str, grid: int, method: str | None,
                      sigma: float | None) -> tuple[dict, dict]:
    """The predictor's state dict (m̃ set by the method) and what the metadata says of it."""
    spec = parse_arch(arch)[0]
    pred = dict(parts["predictor"])
    _require(pred, ("predictor_embed.weight", "predictor_pos_embed"), "predictor", src)
    width = pred["predictor_embed.weight"].shape[0]
    depth = _block_count(pred, "predictor_blocks")
    if width % spec.heads:
        raise UserError(f"'{src}': predictor width {width} is not divisible by the "
                        f"{spec.heads} heads of {arch}")
    pos = pred["predictor_pos_embed"]
    sincos = pos.shape == (1, grid * grid, width) and width % 4 == 0 and torch.allclose(
        pos[0].float(), sincos_2d(width, grid), atol=1e-5)
    pred_pos = "sincos" if sincos else "learned"
    check_state(_predictor_shapes(grid, arch, width, depth, pred_pos), pred, "predictor", src, arch)
    if method is not None:
        why = GIVEN
    else:
        found = method_evidence(raw, parts, src)
        if found is None:
            raise UserError(
                f"cannot tell whether '{src}' was trained with StoP or I-JEPA (no optimizer "
                "state to read, and the file name does not say): pass the method, stop or "
                "ijepa; it decides the mask token (b for StoP, mask_token for I-JEPA)"
            )
        method, why = found
    if method == "stop":
        # official StoP: masked token = ψ + A n + b, mask_token unused, so m̃ := b
        pred["mask_token"] = pred["predictor_embed.bias"].reshape(1, 1, width).clone()
    return pred, {
        "method": method, "method_from": why,
        "mask_token_from": "predictor_embed.bias" if method == "stop" else "mask_token",
        "sigma": default_sigma(method, arch) if sigma is None else sigma,
        "pred_depth": depth, "pred_width": width, "pred_pos": pred_pos,
        "noise_on": "masked", "cov": "learned",
    }


def _folder_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """What an exported folder says of its encoder's training, where the values are of their
    types (a hand-edited value is dropped, not carried into a checkpoint that would be refused)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    checks = {
        "sigma": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf,
        "method": lambda v: v in METHODS, "which": lambda v: v in ("target", "context"),
        "step": count, "epoch": count, "data": lambda v: isinstance(v, dict),
    }
    return {k: facts[k] for k, ok in checks.items() if k in facts and ok(facts[k])}


def _flat_tensors(parts: dict) -> dict[str, torch.Tensor]:
    """Every part's tensors under `part.name`, in fp32, each stored once."""
    tensors, seen = {}, set()
    for p, sd in parts.items():
        for k, v in sd.items():
            v = v.float() if v.is_floating_point() else v
            ptr = v.untyped_storage().data_ptr()
            # torch.save keeps shared storage shared (an encoder saved as its own EMA copy);
            # safetensors stores each tensor once, so copy the second user of a storage
            tensors[f"{p}.{k}"] = v.clone() if ptr in seen else v
            seen.add(ptr)
    return tensors
