"""The FLOP counter equals a hand count, and torch's own counter for a forward pass."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stoptool.flops import encoder_flops, predictor_flops, train_step_flops
from stoptool.models.encoder import build_encoder
from stoptool.models.predictor import Predictor


def test_hand_count_for_a_tiny_encoder():
    # vit_t4 at 8 px: 4 patches of 4×4×3 = 48 values, width 192, 12 blocks, MLP 768
    n, d, h = 4, 192, 768
    embed = 2 * n * 48 * d
    block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * h + 2 * 2 * n * n * d
    assert encoder_flops("vit_t4", 8) == embed + 12 * block
    # context of 3 tokens: the patch embedding still runs on all 4 patches
    block3 = 2 * 3 * d * 3 * d + 2 * 3 * d * d + 2 * 2 * 3 * d * h + 2 * 2 * 9 * d
    assert encoder_flops("vit_t4", 8, tokens=3) == embed + 12 * block3


def test_step_is_target_forward_plus_three_forwards_of_the_rest():
    f = train_step_flops("vit_t4", 32, 96, 2, n_ctx=30, n_tgt=9, blocks=4)
    assert f.target_forward == encoder_flops("vit_t4", 32)
    assert f.context_forward_backward == 3 * encoder_flops("vit_t4", 32, 30)
    assert f.predictor_forward_backward == 3 * predictor_flops(192, 96, 2, 30, 9, 4)
    assert f.total == f.target_forward + f.context_forward_backward + f.predictor_forward_backward


def _torch_count(fn) -> int:
    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        fn()
    return mode.get_total_flops()


@pytest.mark.parametrize("arch, size", [("vit_t4", 32), ("vit_s16", 64)])
def test_encoder_forward_matches_torch_counter(arch, size):
    model = build_encoder(arch, size).eval()
    for blk in model.blocks:  # the counter sees attention as matmuls on the unfused path
        blk.attn.fused_attn = False
    x = torch.randn(2, 3, size, size)
    ours = 2 * encoder_flops(arch, size)
    theirs = _torch_count(lambda: model.forward_features(x))
    assert abs(ours - theirs) / theirs < 0.02


def test_predictor_forward_matches_torch_counter():
    torch.manual_seed(0)
    pred = Predictor(grid=8, embed_dim=192, pred_dim=96, depth=2, num_heads=3, sigma=0.25).train()
    for blk in pred.predictor_blocks:
        blk.attn.fused_attn = False
    B, M, Nc, K = 2, 4, 30, 9
    ctx, ctx_idx = torch.randn(B, Nc, 192), torch.randint(0, 64, (B, Nc))
    tgt = torch.randint(0, 64, (B, M, K))
    ours = B * predictor_flops(192, 96, 2, Nc, K, M)
    theirs = _torch_count(lambda: pred(ctx, ctx_idx, tgt))
    assert abs(ours - theirs) / theirs < 0.02


def test_whole_training_step_matches_torch_counter(tiny_cfg):
    """Forward and backward of the loss, counted by torch, against the count from the shapes
    (the backward of the first layer and of A n skips the input gradient: within 2 %)."""
    from stoptool.masks import MaskSampler
    from stoptool.models.jepa import build_jepa
    from stoptool.train.distributed import Nets
    from stoptool.train.runtime import autocast_factory, set_attention
    from stoptool.train.step import StepInputs, jepa_loss

    cfg = tiny_cfg(sigma=0.25, pred_width=48, pred_depth=2)  # narrower than the 96-wide encoder
    torch.manual_seed(0)
    model = build_jepa(cfg.model).train()
    set_attention(model, "math")
    B = 4
    ctx, tgt = MaskSampler(cfg.mask_config())(B, torch.Generator().manual_seed(0))
    side = cfg.model.img_size
    inputs = StepInputs(torch.randn(B, 3, side, side), ctx, tgt)
    mode = FlopCounterMode(display=False)
    with mode:
        jepa_loss(Nets.plain(model), inputs, autocast_factory(torch.device("cpu"), "fp32")).backward()
    theirs = mode.get_total_flops()
    ours = B * train_step_flops(
        cfg.model.arch, side, 48, 2, ctx.shape[1], tgt.shape[2], tgt.shape[1], 0.25
    ).total
    assert abs(ours - theirs) / theirs < 0.02
