"""Pretrained timm models as encoders to evaluate: a checkpoint argument `timm:NAME` (e.g.
`timm:vit_large_patch16_224.mae`) stands for timm's model of that name with its published
weights, so baselines such as MAE are measured by the same protocol as a stoptool run.

`load_timm("timm:NAME")` returns a `TimmEncoder`: the network without its classifier, and
what a caller needs to feed it and to name it: the image size and patch size it was trained
at, how many prefix (class, register) tokens come before the patch tokens, the normalisation
of its `pretrained_cfg`, the stoptool arch of the same shape where there is one, and a source
string for reports and cache keys.

Weights come from the local caches first (the Hugging Face hub cache, then torch hub's
checkpoints folder for weights timm fetches by URL), so a machine without network uses what
is there. Without them and without network, one UserError line says so and how to fix it.

For tests only: with the environment variable `STOPTOOL_TIMM_RANDOM_WEIGHTS=1` the model is
built without weights (seeded, so its features are repeatable); its source says so.
"""

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from stoptool.errors import UserError
from stoptool.models.archs import ARCHS

PREFIX = "timm:"
RANDOM_WEIGHTS_ENV = "STOPTOOL_TIMM_RANDOM_WEIGHTS"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class TimmEncoder:
    net: torch.nn.Module  # eval mode, no classifier (num_classes=0)
    name: str  # timm's model name, e.g. vit_large_patch16_224.mae
    img_size: int
    patch_size: int
    prefix_tokens: int  # tokens before the patch tokens (class, registers): left out of pooling
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # "timm:NAME", with " (random weights)" when built without weights
    arch: str | None  # stoptool's arch of the same width, depth and patch (vit_l16), if any
    pretrained: bool
    meta: dict = field(default_factory=dict)


def is_timm(arg: str | os.PathLike) -> bool:
    return str(arg).startswith(PREFIX)


def random_weights() -> bool:
    return os.environ.get(RANDOM_WEIGHTS_ENV, "") not in ("", "0")


def check_name(arg: str) -> str:
    """The timm model name of `timm:NAME`, once timm knows it (no model is built)."""
    import timm

    name = str(arg)[len(PREFIX):]
    if not name or not timm.is_model(name):
        raise UserError(f"'{arg}' names no timm model: list them with python -c \"import timm; "
                        f"print(timm.list_models('vit_*', pretrained=True))\"")
    return name


def check_source(arg: str) -> str:
    """`timm:NAME` once it is known that it can be built: timm knows the name and its weights are
    cached or can be downloaded (or the test-only switch is on). Cheap: nothing is built."""
    name = check_name(arg)
    if not random_weights():
        _weights(name)
    return arg


def load_timm(arg: str, img_size: int | None = None) -> TimmEncoder:
    """The model `arg` = `timm:NAME` with its pretrained weights (see the module's docstring),
    at `img_size` when given (timm resamples the position embeddings)."""
    import timm

    name = check_name(arg)
    kwargs = {"num_classes": 0, **({"img_size": img_size} if img_size is not None else {})}
    pretrained = not random_weights()
    try:
        if pretrained:
            net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=_weights(name), **kwargs)
        else:
            torch.manual_seed(0)
            net = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:  # a model that takes no img_size
        raise UserError(f"{arg}: {err}", key="img_size") from None
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{arg}: its weights could not be loaded: {str(err).splitlines()[0][:200]}") from None
    return describe(net.eval(), name, arg, pretrained)


def describe(net: torch.nn.Module, name: str, arg: str, pretrained: bool) -> TimmEncoder:
    if not all(hasattr(net, a) for a in ("forward_intermediates", "num_prefix_tokens", "patch_embed")):
        raise UserError(f"{arg} is not a vision transformer whose patch tokens can be pooled "
                        f"({type(net).__name__}); give a ViT-style timm model")
    cfg = dict(net.pretrained_cfg)
    patch = int(net.patch_embed.patch_size[0])
    img_size = int(net.patch_embed.img_size[0])
    width, depth = int(net.embed_dim), len(net.blocks)
    arch = next((f"vit_{k}{patch}" for k, s in ARCHS.items() if (s.width, s.depth) == (width, depth)), None)
    source = f"{PREFIX}{name}" + ("" if pretrained else " (random weights)")
    meta = {"timm_model": name, "pretrained": pretrained, "width": width, "depth": depth,
            **{k: cfg[k] for k in ("tag", "hf_hub_id", "license") if cfg.get(k)}}
    mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    return TimmEncoder(net, name, img_size, patch, int(net.num_prefix_tokens), mean, std, source, arch,
                       pretrained, meta)


def _weights(name: str) -> dict:
    """A `pretrained_cfg_overlay` that loads the cached weights file of `name` if there is one;
    empty (timm downloads) when the network can be reached; else a UserError."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    cached = _cached_file(cfg)
    if cached is not None:
        return {"file": str(cached)}
    hosts = [h for h in ("huggingface.co" if cfg.get("hf_hub_id") else None,
                         urlparse(cfg.get("url") or "").hostname) if h]
    if not hosts:
        raise UserError(f"timm:{name} has no published weights (no hub id, no URL in its pretrained_cfg)")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not any(_reachable(h) for h in hosts):
        raise UserError(f"timm:{name}: its weights are not in the local caches (Hugging Face: "
                        f"{_hub_cache()}; torch hub: {Path(torch.hub.get_dir()) / 'checkpoints'}) and "
                        f"{' / '.join(hosts)} cannot be reached: load it once where there is network "
                        f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy "
                        "the cache here")
    return {}


def _cached_file(cfg: dict) -> Path | None:
    """The weights file of a pretrained cfg in the local caches, if it is there."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HUB_FILES
        for filename in names:
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return path
    return None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _reachable(host: str) -> bool:
    """Whether `host`'s name resolves: without network it fails at once, where a download would
    retry for a minute before giving up."""
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
