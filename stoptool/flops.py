"""FLOPs of the I-JEPA/StoP training step, counted from the shapes.

A multiply-add counts as 2 FLOPs. Counted: every matmul (patch embedding, qkv, attention
scores and values, output projection, MLP, predictor input/output projections). Not counted:
norms, activations, softmax, adds and the optimizer (a few percent at most). A backward pass
costs twice its forward (gradients for inputs and for weights); the target encoder runs
forward only.
"""

from dataclasses import dataclass

from stoptool.models.archs import parse_arch


def block_flops(tokens: int, width: int, mlp_ratio: float, seqs: int = 1) -> int:
    """Forward FLOPs of one transformer block on `seqs` sequences of `tokens` tokens."""
    n, d = tokens, width
    hidden = int(d * mlp_ratio)
    linear = 2 * n * d * (3 * d) + 2 * n * d * d + 2 * (2 * n * d * hidden)
    attention = 2 * (2 * n * n * d)  # q kᵀ and attn · v over all heads
    return seqs * (linear + attention)


def encoder_flops(arch: str, img_size: int, tokens: int | None = None) -> int:
    """Forward FLOPs of the encoder for one image, its blocks run on `tokens` patches."""
    spec, patch = parse_arch(arch)
    n_all = (img_size // patch) ** 2
    n = n_all if tokens is None else tokens
    embed = 2 * n_all * (3 * patch * patch) * spec.width  # every patch is embedded
    return embed + spec.depth * block_flops(n, spec.width, spec.mlp_ratio)


def predictor_flops(embed_dim: int, pred_dim: int, depth: int, n_ctx: int, n_tgt: int, blocks: int) -> int:
    """Forward FLOPs of the predictor for one image with `blocks` target blocks."""
    embed = 2 * n_ctx * embed_dim * pred_dim  # A s + b, once per image
    noise = 2 * blocks * n_tgt * embed_dim * pred_dim  # A n for the masked tokens
    body = depth * block_flops(n_ctx + n_tgt, pred_dim, 4.0, seqs=blocks)
    proj = 2 * blocks * n_tgt * pred_dim * embed_dim
    return embed + noise + body + proj


@dataclass(frozen=True)
class StepFlops:
    target_forward: int
    context_forward_backward: int
    predictor_forward_backward: int

    @property
    def total(self) -> int:
        return self.target_forward + self.context_forward_backward + self.predictor_forward_backward


def train_step_flops(
    arch: str,
    img_size: int,
    pred_dim: int,
    pred_depth: int,
    n_ctx: int,
    n_tgt: int,
    blocks: int = 4,
    sigma: float = 0.25,
) -> StepFlops:
    """FLOPs per image of one training step with the given mask sizes."""
    spec, _ = parse_arch(arch)
    pred = predictor_flops(spec.width, pred_dim, pred_depth, n_ctx, n_tgt, blocks)
    if sigma == 0:
        pred -= 2 * blocks * n_tgt * spec.width * pred_dim
    return StepFlops(
        target_forward=encoder_flops(arch, img_size),
        context_forward_backward=3 * encoder_flops(arch, img_size, n_ctx),
        predictor_forward_backward=3 * pred,
    )
