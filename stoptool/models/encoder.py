"""The encoder f_θ: timm's VisionTransformer with no class token and fixed 2-D sine-cosine
positions, so a stoptool encoder's state dict *is* a timm state dict.

`encode` runs it on all patches (the target encoder) or on the context patches only (the
context encoder), gathering tokens after the positions are added.
"""

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from stoptool.errors import UserError
from stoptool.models.archs import INITS, check_img_size, default_init, parse_arch
from stoptool.models.blocks import Block, run_blocks
from stoptool.models.pos_embed import sincos_2d


def timm_kwargs(arch: str, img_size: int) -> dict:
    """Keyword arguments that build the same network with timm.VisionTransformer."""
    spec, patch = parse_arch(arch)
    return dict(
        img_size=img_size,
        patch_size=patch,
        embed_dim=spec.width,
        depth=spec.depth,
        num_heads=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def init_like_released_code(module: nn.Module, std: float = 0.02) -> None:
    """The initialization the released I-JEPA and StoP training scripts end up with: every
    linear layer and the patch-embedding convolution drawn from a truncated normal of std 0.02
    with zero bias, LayerNorms at one and zero. (Their model classes first divide each block's
    output projections by sqrt(2 * layer), but the scripts then redraw every linear layer, so
    that rescaling does not survive; the convolution keeps its 0.02 draw.)"""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_encoder(arch: str, img_size: int, init: str | None = None, drawn: bool = True) -> VisionTransformer:
    """The encoder of `arch` at `img_size`, its weights drawn by `init`; `drawn=False` skips
    the draw (timm's trunc-normal init is most of the build's time) for a caller that loads
    every weight next. The positions are set either way."""
    spec = parse_arch(arch)[0]
    patch = check_img_size(arch, img_size)
    init = init or default_init(arch)
    if init not in INITS:
        raise UserError(f"init must be one of {', '.join(INITS)}, got '{init}'")
    # timm: trunc-normal linears, PyTorch's default for the patch convolution, and (fix_init)
    # each block's output projections divided by sqrt(2 * layer)
    # (stoptool's Block is timm's, its idle dropouts off the call path: the same weights and names)
    if not drawn:
        model = VisionTransformer(**timm_kwargs(arch, img_size), block_fn=Block, weight_init="skip")
    else:
        model = VisionTransformer(**timm_kwargs(arch, img_size), fix_init=init == "timm", block_fn=Block)
    if drawn and init == "released":
        init_like_released_code(model)
    grid = img_size // patch
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(spec.width, grid)[None])
    model.pos_embed.requires_grad_(False)
    return model


def encode(model: VisionTransformer, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Token features [B, N, D] of `images`; with `keep` [B, K] only those patches are encoded."""
    x = model.patch_embed(images) + model.pos_embed
    if keep is not None:
        x = x.gather(1, keep[..., None].expand(-1, -1, x.size(-1)))
    if model.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(model.blocks, x)
    else:
        x = run_blocks(model.blocks, x)
    return model.norm(x)


def block_outputs(model: VisionTransformer, images: torch.Tensor, last: int = 1) -> list[torch.Tensor]:
    """Outputs of the last `last` blocks, each through the closing norm."""
    x = model.patch_embed(images) + model.pos_embed
    outputs = []
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        x = block(x)
        if i >= n - last:
            outputs.append(model.norm(x))
    return outputs
