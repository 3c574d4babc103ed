"""Model folders as the Hugging Face Hub holds them, read back: timm's (`config.json` with
`architecture`, `model_args` and `pretrained_cfg`, what `timm.create_model("local-dir:DIR")`
reads) and transformers' I-JEPA (`config.json` with `model_type: ijepa`, what
`IJepaModel.from_pretrained(DIR)` reads). Both hold one encoder in `model.safetensors`.

transformers' `IJepaModel` is the same network as timm's `VisionTransformer(class_token=False)`
under other names, with the fused `attn.qkv` projection split into query, key and value; the
two maps below are the whole difference. `official` (import) and `hub` (export) both use them.
The names are those of the files on the Hub (`encoder.layer.{i}.attention.attention.query`):
transformers 5 names its modules otherwise (`layers.{i}.attention.q_proj`) but still writes and
reads files under these; its own names are read too.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from stoptool.errors import UserError

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
FILES = (CONFIG, WEIGHTS, CARD)  # what an export writes into a folder, and all it writes
_WEIGHT_FILES = (WEIGHTS, "pytorch_model.bin")  # in the order timm and transformers prefer them
LAYOUTS = {"timm": "timm folder (local-dir: / hf-hub:)", "transformers": "transformers IJepaModel folder"}

# timm name -> transformers name, outside the blocks and inside block i (weight and bias alike)
_TOP = {
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")  # the thirds of timm's qkv rows, in order
_TOP_BACK = {v: k for k, v in _TOP.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
# transformers 5's module names -> the file names above (it converts them so itself)
_V5_NAMES = [(re.compile(p), r) for p, r in (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)]
_TIMM_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
_IJEPA_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")


def timm_to_ijepa(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm encoder state dict under `IJepaModel`'s names. A key of neither is kept as it
    is, for the shape check to name."""
    out = {}
    for name, t in state.items():
        m = _TIMM_KEY.fullmatch(name)
        if name in _TOP:
            out[_TOP[name]] = t
        elif m and m[2] == "attn.qkv":
            for part, rows in zip(_QKV, t.chunk(3)):
                # a copy: safetensors refuses tensors that share memory
                out[f"encoder.layer.{m[1]}.attention.attention.{part}.{m[3]}"] = rows.clone()
        elif m and m[2] in _BLOCK:
            out[f"encoder.layer.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"] = t
        else:
            out[name] = t
    return out


def ijepa_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`IJepaModel` weights (or `IJepaForImageClassification`'s, under `ijepa.`) under timm's
    names. A key of neither, or a query without its key and value, is kept as it is."""
    out: dict[str, torch.Tensor] = {}
    thirds: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        name = name.removeprefix("ijepa.")
        if name.startswith("layers."):
            for pattern, replacement in _V5_NAMES:
                name = pattern.sub(replacement, name)
        m = _IJEPA_KEY.fullmatch(name)
        if name in _TOP_BACK:
            out[_TOP_BACK[name]] = t
        elif m and m[2].startswith("attention.attention.") and m[2].rsplit(".", 1)[1] in _QKV:
            thirds.setdefault((m[1], m[3]), {})[m[2].rsplit(".", 1)[1]] = t
        elif m and m[2] in _BLOCK_BACK:
            out[f"blocks.{m[1]}.{_BLOCK_BACK[m[2]]}.{m[3]}"] = t
        else:
            out[name] = t
    for (i, kind), parts in thirds.items():
        if len(parts) == len(_QKV):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in _QKV])
        else:
            out.update({f"encoder.layer.{i}.attention.attention.{p}.{kind}": t for p, t in parts.items()})
    return out


def has_ijepa_names(state: dict[str, Any]) -> bool:
    return any(k.startswith(("embeddings.", "ijepa.embeddings.")) for k in state)


# -- a folder --------------------------------------------------------------------------------


@dataclass
class Folder:
    path: Path
    layout: str  # "timm" or "transformers"
    config: dict[str, Any]
    weights: Path
    facts: dict[str, Any]  # what stoptool wrote of the encoder (arch, σ, step, ...); {} if not ours
    notes: list[str] = field(default_factory=list)


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def open_folder(path: str | Path) -> Folder:
    """The layout, config and weights file of a model folder; UserError for anything else."""
    path = Path(path)
    if not is_model_folder(path):
        run = (path / "latest.safetensors").is_file()
        hint = " (a run directory? its checkpoint is latest.safetensors)" if run else ""
        raise UserError(f"'{path}' is a folder without {CONFIG}: not a timm or transformers model "
                        f"folder{hint}")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"'{path / CONFIG}' is not readable JSON: {str(err).splitlines()[0][:120]}") from None
    if not isinstance(config, dict):
        raise UserError(f"'{path / CONFIG}' holds a {type(config).__name__}, not a JSON object")
    notes = []
    model_type = config.get("model_type")
    if model_type == "ijepa":
        layout = "transformers"
        act, eps = config.get("hidden_act", "gelu"), config.get("layer_norm_eps", 1e-12)
        if act != "gelu":  # timm's ViT has the exact GELU: another activation is another network
            raise UserError(f"'{path}': hidden_act is {act!r}; stoptool's encoders use 'gelu'")
        if eps != 1e-6:
            notes.append(f"layer_norm_eps is {eps} in {CONFIG}, stoptool's LayerNorms use 1e-6: "
                         "features differ slightly from the folder's model")
    elif model_type is not None:
        raise UserError(f"'{path}' holds a transformers '{model_type}' model; stoptool reads I-JEPA "
                        "encoders (model_type ijepa) and timm ViT folders")
    elif isinstance(config.get("architecture"), str):
        layout = "timm"
    else:
        raise UserError(f"'{path / CONFIG}' names neither a timm architecture nor a transformers model_type")
    weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise UserError(f"'{path}' holds no weights: neither {' nor '.join(_WEIGHT_FILES)}")
    return Folder(path, layout, config, weights, read_facts(weights), notes)


def read_facts(weights: Path) -> dict[str, Any]:
    """What stoptool recorded in a folder's safetensors metadata: the block of a stoptool
    checkpoint (a timm folder's file is one) or the `stoptool` entry (transformers wants
    `format: pt` there, so its folder keeps the facts beside it)."""
    if weights.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).splitlines()[0][:120]
        raise UserError(f"'{weights}' is not a readable safetensors file: {first}") from None
    text = raw.get("meta") if raw.get("format") == "stoptool" else raw.get("stoptool")
    try:
        facts = json.loads(text) if text else {}
    except ValueError:
        return {}
    return facts if isinstance(facts, dict) else {}


def _params(weights: Path) -> int | None:
    """Parameters in a safetensors file, from its header (no tensor is read)."""
    if weights.suffix != ".safetensors":
        return None
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for k in f.keys():
            n = 1
            for s in f.get_slice(k).get_shape():
                n *= s
            total += n
    return total


def card_license(path: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, if any."""
    try:
        lines = (path / CARD).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None


def describe_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """What `stoptool info` shows of a model folder: table rows, and the whole as JSON."""
    folder = open_folder(path)
    cfg, facts = folder.config, folder.facts
    files = sorted(p.name for p in folder.path.iterdir())
    rows: dict[str, Any] = {"folder": folder.path, "kind": LAYOUTS[folder.layout], "files": ", ".join(files)}
    if folder.layout == "timm":
        rows["timm architecture"] = cfg["architecture"]
        args = cfg["model_args"] if isinstance(cfg.get("model_args"), dict) else {}
        shape = {k: args.get(k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    else:
        rows["model_type"] = "ijepa"
        shape = {"img_size": cfg.get("image_size"), "patch_size": cfg.get("patch_size"),
                 "embed_dim": cfg.get("hidden_size"), "depth": cfg.get("num_hidden_layers"),
                 "num_heads": cfg.get("num_attention_heads")}
    for key in ("arch", "img_size", "patch", "which", "sigma", "method", "step", "epoch", "source",
                "stoptool_version"):
        if key in facts:
            rows[key] = facts[key]
    if isinstance(facts.get("data"), dict):
        rows["data"] = ", ".join(f"{k}={v}" for k, v in facts["data"].items())
    if "arch" not in facts:  # a folder from elsewhere: its config says the shape
        rows["shape"] = ", ".join(f"{k}={v}" for k, v in shape.items() if v is not None)
    params = _params(folder.weights)
    if params is not None:
        rows["encoder params"] = f"{params:,}"
    license_ = card_license(folder.path)
    rows["license"] = license_ or "not stated"
    for note in folder.notes:
        rows["note"] = note
    as_json = {"folder": str(folder.path), "layout": folder.layout, "files": files, "config": cfg,
               "meta": facts, "params": params, "license": license_}
    return rows, as_json
