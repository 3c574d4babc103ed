"""The predictor g_φ, and StoP: stochastic positions for the masked tokens.

Symbols of the paper (Bar et al., 2024) and where they live:

    A, b   predictor_embed.weight, predictor_embed.bias   (d_p × d_e input projection)
    ψ      predictor_pos_embed                             (fixed sine-cosine, or learned)
    m̃      mask_token                                      (shared by all masked positions)
    σ      sigma: standard deviation of the noise n ~ N(0, σ² I_{d_e})

    context tokens  c_i = A s_i + b + ψ_i
    masked tokens   m_j = ψ_j + m̃ + A n_j          (StoP: `masked_tokens`)

Parameter names follow the released I-JEPA/StoP code so their checkpoints load directly.
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from stoptool.models.archs import Covariance, NoiseOn, PredPos
from stoptool.models.blocks import Block, run_blocks
from stoptool.models.encoder import init_like_released_code
from stoptool.models.pos_embed import sincos_2d


class Predictor(nn.Module):
    def __init__(
        self,
        grid: int,
        embed_dim: int,
        pred_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        sigma: float = 0.0,
        noise_on: NoiseOn = "masked",
        cov: Covariance = "learned",
        pred_pos: PredPos = "sincos",
        init_std: float = 0.02,
        init: str = "released",
        drawn: bool = True,
    ):
        super().__init__()
        self.grid, self.embed_dim, self.pred_dim = grid, embed_dim, pred_dim
        self.sigma, self.noise_on, self.cov, self.pred_pos = sigma, noise_on, cov, pred_pos
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.predictor_pos_embed = nn.Parameter(
            torch.zeros(1, grid * grid, pred_dim), requires_grad=pred_pos == "learned"
        )
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.predictor_blocks = nn.ModuleList(
            Block(pred_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.predictor_norm = norm(pred_dim)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        self.grad_checkpointing = False
        self._init_weights(init_std, init, drawn)

    def _init_weights(self, std: float, init: str, drawn: bool = True) -> None:
        """The weights drawn as `init` says; `drawn=False`: only the fixed positions set (every
        other weight is loaded next, see `build_encoder`)."""
        if not drawn:
            if self.pred_pos == "sincos":
                with torch.no_grad():
                    self.predictor_pos_embed.copy_(sincos_2d(self.pred_dim, self.grid)[None])
            return
        init_like_released_code(self, std)
        if init == "timm":  # depth-rescaled output projections, as the encoder's timm init
            for layer, block in enumerate(self.predictor_blocks, start=1):
                block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))
        trunc_normal_(self.mask_token, std=std)
        with torch.no_grad():
            if self.pred_pos == "sincos":
                self.predictor_pos_embed.copy_(sincos_2d(self.pred_dim, self.grid)[None])
            else:
                trunc_normal_(self.predictor_pos_embed, std=std)

    @property
    def A(self) -> torch.Tensor:
        return self.predictor_embed.weight

    def _noise(self, shape: torch.Size, like: torch.Tensor, width: int) -> torch.Tensor:
        return torch.randn(*shape[:-1], width, device=like.device, dtype=like.dtype) * self.sigma

    def _stochastic(self, where: str) -> bool:
        return self.training and self.sigma > 0 and self.noise_on in (where, "both")

    def context_tokens(self, context: torch.Tensor, ctx_idx: torch.Tensor) -> torch.Tensor:
        """c_i = A s_i + b + ψ_i  (plus A n_i in the noise-on-context ablation)."""
        if self._stochastic("context") and self.cov == "learned":
            context = context + self._noise(context.shape, context, self.embed_dim)
        tokens = self.predictor_embed(context) + self.predictor_pos_embed[0][ctx_idx]
        if self._stochastic("context") and self.cov == "fixed":
            tokens = tokens + self._noise(tokens.shape, tokens, self.pred_dim)
        return tokens

    def masked_tokens(self, tgt_idx: torch.Tensor) -> torch.Tensor:
        """m_j = ψ_j + m̃ + A n_j with n_j ~ N(0, σ² I) drawn fresh per token, block and step.

        With cov="fixed" the noise is N(0, σ² I) added in predictor width instead (Σ = σ² I).
        No noise in eval mode or at σ = 0.
        """
        pos = self.predictor_pos_embed[0][tgt_idx]
        tokens = pos + self.mask_token.to(pos.dtype)
        if self._stochastic("masked"):
            if self.cov == "learned":
                tokens = tokens + F.linear(self._noise(pos.shape, pos, self.embed_dim), self.A)
            else:
                tokens = tokens + self._noise(pos.shape, pos, self.pred_dim)
        return tokens

    def forward(self, context: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        """Predict target features.

        context: [B, Nc, d_e] context-encoder features s; ctx_idx: [B, Nc] their patch indices;
        tgt_idx: [B, M, K] patch indices of M target blocks. Returns [B, M, K, d_e].
        """
        B, M, K = tgt_idx.shape
        ctx = self.context_tokens(context, ctx_idx)
        # Each target block is predicted from the same context, independently.
        ctx = ctx.unsqueeze(1).expand(-1, M, -1, -1).reshape(B * M, -1, self.pred_dim)
        masked = self.masked_tokens(tgt_idx.reshape(B * M, K)).to(ctx.dtype)
        x = torch.cat([ctx, masked], dim=1)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.predictor_blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = run_blocks(self.predictor_blocks, x)
        x = self.predictor_proj(self.predictor_norm(x[:, -K:]))
        return x.reshape(B, M, K, self.embed_dim)
