"""The three networks of I-JEPA/StoP in one module: context encoder, target encoder, predictor."""

import copy

from torch import nn

from stoptool.models.archs import default_init, parse_arch
from stoptool.models.encoder import build_encoder, encode
from stoptool.models.predictor import Predictor


def predict(encoder: nn.Module, predictor: nn.Module, images, ctx_idx, tgt_idx):
    """g_φ(f_θ(context patches of `images`)) at the target positions: [B, M, K, d_e]."""
    return predictor(encode(encoder, images, ctx_idx), ctx_idx, tgt_idx)


class JEPA(nn.Module):
    """`encoder` (f_θ, context), `target_encoder` (f̄_θ, EMA of f_θ), `predictor` (g_φ)."""

    def __init__(
        self, encoder: nn.Module, predictor: nn.Module | None, target_encoder: nn.Module | None = None
    ):
        super().__init__()
        self.encoder = encoder
        self.target_encoder = target_encoder if target_encoder is not None else copy.deepcopy(encoder)
        self.target_encoder.requires_grad_(False)
        self.predictor = predictor


def build_jepa(cfg, drawn: bool = True) -> JEPA:
    """Build from a PretrainConfig (or anything with the same model fields); `drawn=False`
    for weights that are loaded next (see `build_encoder`)."""
    spec, patch = parse_arch(cfg.arch)
    init = getattr(cfg, "init", None) or default_init(cfg.arch)
    encoder = build_encoder(cfg.arch, cfg.img_size, init, drawn)
    predictor = Predictor(
        grid=cfg.img_size // patch,
        embed_dim=spec.width,
        pred_dim=cfg.pred_width,
        depth=cfg.pred_depth,
        num_heads=spec.heads,
        sigma=cfg.sigma,
        noise_on=cfg.noise_on,
        cov=cfg.cov,
        pred_pos=cfg.pred_pos,
        init=init,
        drawn=drawn,
    )
    return JEPA(encoder, predictor)
