"""The transformer block of every stoptool network: timm's ViT block (its modules, names and
weights), with each dropout of rate 0 (pretraining's, and the released code's) taken off the
call path, where it would still be one operator dispatched per call, and its linear layers fed
2-D `[tokens, width]` tensors (see `Block.forward`)."""

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn


class NoDropout(nn.Identity):
    """A dropout that drops nothing: the identity, with the rate `p` that code reads (timm's
    fused attention passes `attn_drop.p` to scaled_dot_product_attention)."""

    p = 0.0


def without_idle_dropout(module: nn.Module) -> nn.Module:
    """`module` with every nn.Dropout of rate 0 inside it replaced by NoDropout (in place)."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout and child.p == 0:
                setattr(parent, name, NoDropout())
    return module


class Block(TimmBlock):
    """timm's `Block`, whose dropouts of rate 0 are not called (see `without_idle_dropout`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        without_idle_dropout(self)
        a, idle = self.attn, nn.Identity()
        # the plain block (no layer scale, stochastic depth, gate or norms inside the attention):
        # what stoptool builds; anything else, or a timm whose modules differ, runs timm's forward
        parts = (self.ls1, self.ls2, self.drop_path1, self.drop_path2, a.q_norm, a.k_norm,
                 getattr(a, "norm", idle), a.proj_drop, self.mlp.drop1, self.mlp.drop2,
                 getattr(self.mlp, "norm", idle))
        self.flat = (all(isinstance(m, nn.Identity) for m in parts) and getattr(a, "gate", None) is None
                     and a.num_heads * a.head_dim == a.qkv.out_features // 3)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                tokens: tuple[int, int] | None = None) -> torch.Tensor:
        """timm's block, computed with the tokens as one 2-D `[B * N, width]` matrix: the same
        operators on the same numbers (a linear layer flattens a 3-D input to exactly this
        matrix), but each linear's backward no longer reshapes its input and its gradient back
        and forth. `tokens=(B, N)`: `x` is that matrix already (see `run_blocks`), and so is the
        result."""
        if not self.flat or attn_mask is not None:
            return super().forward(x, attn_mask=attn_mask)
        if tokens is None:
            B, N, C = x.shape
            return self.forward(x.reshape(B * N, C), tokens=(B, N)).reshape(B, N, C)
        B, N = tokens
        a = self.attn
        qkv = a.qkv(self.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if a.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        else:
            o = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        x = x + a.proj(o.transpose(1, 2).reshape(B * N, a.num_heads * a.head_dim))
        return x + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.norm2(x))))


def run_blocks(blocks, x: torch.Tensor) -> torch.Tensor:
    """`x` [B, N, C] through `blocks` in turn: flattened to [B * N, C] once for all of them
    where they are stoptool's plain blocks (each called as a module, so hooks such as FSDP's
    run), else block by block as they come."""
    if not all(isinstance(b, Block) and b.flat for b in blocks):
        for block in blocks:
            x = block(x)
        return x
    B, N, C = x.shape
    h = x.reshape(B * N, C)
    for block in blocks:
        h = block(h, tokens=(B, N))
    return h.reshape(B, N, C)
