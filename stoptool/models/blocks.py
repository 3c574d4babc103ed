"""The transformer block of every stoptool network: timm's ViT block (its modules, names and
weights), with each dropout of rate 0 (pretraining's, and the released code's) taken off the
call path, where it would still be one operator dispatched per call."""

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
