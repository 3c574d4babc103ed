"""The encoder is timm's VisionTransformer: same parameter counts, names, fixed positions."""

import math

import pytest
import timm
import torch

from stoptool.errors import UserError
from stoptool.io.official import infer_arch
from stoptool.models.archs import ARCHS, parse_arch
from stoptool.models.encoder import build_encoder, encode
from stoptool.models.pos_embed import sincos_2d

TIMM_SAME_SHAPE = {
    "vit_t16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_l16": "vit_large_patch16_224",
    "vit_h14": "vit_huge_patch14_224",
    "vit_g14": "vit_giant_patch14_224",
}


@pytest.mark.parametrize("arch, timm_name", TIMM_SAME_SHAPE.items())
def test_parameter_count_equals_timm(arch, timm_name):
    with torch.device("meta"):
        ours = build_encoder(arch, 224)
        ref = timm.create_model(
            timm_name,
            pretrained=False,
            class_token=False,
            global_pool="avg",
            fc_norm=False,
            num_classes=0,
        )
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_pos_embed_is_fixed_sincos():
    model = build_encoder("vit_t4", 32)
    assert not model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0], sincos_2d(192, 8))
    assert model.cls_token is None


def test_sincos_values_by_hand():
    emb = sincos_2d(8, 3)  # width 8: 2 frequencies per (row|col) × (sin|cos)
    row, col = 2, 1
    p = emb[row * 3 + col]
    freqs = [1.0, 1.0 / 10000**0.5]
    expect = [math.sin(col * f) for f in freqs] + [math.cos(col * f) for f in freqs]
    expect += [math.sin(row * f) for f in freqs] + [math.cos(row * f) for f in freqs]
    assert torch.allclose(p, torch.tensor(expect), atol=1e-6)


def test_context_encoder_sees_only_kept_patches():
    torch.manual_seed(0)
    model = build_encoder("vit_t4", 16).eval()
    x = torch.randn(1, 3, 16, 16)
    keep = torch.tensor([[0, 1, 4, 5]])  # the top-left 2×2 patches (8×8 pixels)
    y = x.clone()
    y[..., 8:, :] = torch.randn(1, 3, 8, 16)  # change pixels outside the kept patches
    a, b = encode(model, x, keep), encode(model, y, keep)
    assert a.shape == (1, 4, 192)
    assert torch.allclose(a, b)
    assert not torch.allclose(encode(model, x), encode(model, y))


@pytest.mark.parametrize("name", ["vit_x16", "resnet50", "vit_b0", "vit_b"])
def test_unknown_arch_is_a_user_error(name):
    with pytest.raises(UserError, match="unknown arch"):
        parse_arch(name)


def test_each_size_has_a_width_of_its_own_and_nano_is_four_narrow_blocks(tmp_path):
    """Import names a checkpoint's size by its width alone; the smoke-test size `n` is 4 blocks
    96 wide, and a state dict of it is named back as vit_n."""
    widths = [spec.width for spec in ARCHS.values()]
    assert len(set(widths)) == len(widths)
    model = build_encoder("vit_n2", 16)
    assert len(model.blocks) == 4 and model.embed_dim == 96 and model.blocks[0].attn.num_heads == 3
    assert infer_arch(model.state_dict(), tmp_path / "enc.pth") == ("vit_n2", 16)
    assert infer_arch(build_encoder("vit_t2", 16).state_dict(), tmp_path / "enc.pth") == ("vit_t2", 16)


def test_image_size_must_divide_by_patch():
    with pytest.raises(UserError, match="not a positive multiple of the patch size"):
        build_encoder("vit_b16", 200)


def _std(t):
    return float(t.detach().float().std())


def test_released_init_matches_the_released_scripts():
    """Every linear layer and the patch convolution ~ N(0, 0.02²), biases 0, no depth rescaling."""
    torch.manual_seed(0)
    model = build_encoder("vit_s16", 224, "released")
    assert abs(_std(model.patch_embed.proj.weight) - 0.02) < 0.001
    for block in (model.blocks[0], model.blocks[-1]):
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert abs(_std(linear.weight) - 0.02) < 0.001
            assert not linear.bias.any()
        assert torch.equal(block.norm1.weight, torch.ones(384)) and not block.norm1.bias.any()


def test_timm_init_rescales_output_projections_by_depth():
    torch.manual_seed(0)
    model = build_encoder("vit_s16", 224, "timm")
    for layer in (1, 12):
        block = model.blocks[layer - 1]
        assert abs(_std(block.attn.qkv.weight) - 0.02) < 0.001
        expected = 0.02 / math.sqrt(2 * layer)
        assert abs(_std(block.mlp.fc2.weight) - expected) < 0.05 * expected
    # the patch convolution keeps PyTorch's default: uniform with bound 1/sqrt(fan_in)
    fan_in = 3 * 16 * 16
    assert abs(_std(model.patch_embed.proj.weight) - 1 / math.sqrt(3 * fan_in)) < 0.001


def test_default_init_by_arch():
    from stoptool.config import ModelConfig
    from stoptool.models.archs import default_init

    assert default_init("vit_b16") == ModelConfig(arch="vit_b16").init == "released"
    assert default_init("vit_t4") == ModelConfig(arch="vit_t4").init == "timm"
    with pytest.raises(UserError, match="init must be one of released, timm, got 'xavier'"):
        build_encoder("vit_t4", 32, "xavier")
