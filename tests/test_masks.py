"""Multi-block masks: disjointness, block sizes, equal lengths, min_keep, determinism."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stoptool.errors import UserError
from stoptool.masks import MaskConfig, MaskSampler, block_size


def _grid_coords(idx: torch.Tensor, grid: int):
    return idx // grid, idx % grid


@settings(max_examples=40, deadline=None)
@given(
    grid=st.integers(6, 16),
    t_lo=st.floats(0.1, 0.2),
    t_span=st.floats(0.0, 0.1),
    c_lo=st.floats(0.7, 1.0),
    batch=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_multiblock_invariants(grid, t_lo, t_span, c_lo, batch, seed):
    cfg = MaskConfig(grid=grid, target_scale=(t_lo, t_lo + t_span), context_scale=(c_lo, 1.0))
    try:
        sampler = MaskSampler(cfg)
    except UserError:
        return  # blocks too small for min_keep on this grid: rejected up front
    ctx, tgt = sampler(batch, torch.Generator().manual_seed(seed))
    B, M, K = tgt.shape
    assert (B, M) == (batch, 4) and ctx.shape[0] == batch
    # all masks of a kind have one length (they stack), and keep more than min_keep patches
    assert ctx.shape[1] > cfg.keep and K > cfg.keep
    for b in range(batch):
        assert not set(ctx[b].tolist()) & set(tgt[b].flatten().tolist())
        assert len(set(ctx[b].tolist())) == ctx.shape[1]
        for m in range(M):
            rows, cols = _grid_coords(tgt[b, m], grid)
            h = int(rows.max() - rows.min() + 1)
            w = int(cols.max() - cols.min() + 1)
            assert h * w == K  # a whole rectangle
            assert (h, w) in _allowed_sizes(grid, cfg.target_scale, cfg.target_aspect)


def _allowed_sizes(grid, scale, aspect):
    """Every (h, w) the I-JEPA rule can give: scale and aspect from one draw u in [0, 1]."""
    out = set()
    for i in range(2001):
        u = i / 2000
        out.add(block_size(grid, scale[0] + u * (scale[1] - scale[0]), *aspect, u))
    return out


def test_allowed_sizes_match_the_rule_by_hand():
    # 14×14, scale 0.15 → area int(29.4) = 29, aspect 0.75 → h = round(4.66) = 5, w = round(6.22) = 6
    assert block_size(14, 0.15, 0.75, 1.5, 0.0) == (5, 6)
    # scale 0.2, aspect 1.5 → area 39 → h = round(7.65) = 8, w = round(5.10) = 5
    assert block_size(14, 0.2, 0.75, 1.5, 1.0) == (8, 5)


def test_block_sizes_follow_scale_and_aspect_on_imagenet_grid():
    cfg = MaskConfig(grid=14)
    sampler = MaskSampler(cfg)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        (th, tw), (ch, cw) = sampler._sizes(gen)
        seen.add((th, tw))
        # by hand: area int(196 · [0.15, 0.2]) = 29..39 patches, aspect 0.75..1.5, sides rounded
        assert 29 <= th * tw <= 40 and 0.8 <= th / tw <= 1.6
        assert ch == cw and 12 <= ch <= 13  # scale 0.85–1.0, aspect 1, capped at grid - 1
    # scale and aspect grow together (one draw): the smallest and the tallest block both occur
    assert seen == {(5, 6), (6, 5), (6, 6), (7, 5), (8, 5)}


def test_same_seed_same_masks_and_different_seed_differs():
    sampler = MaskSampler(MaskConfig(grid=14))
    a = sampler(8, torch.Generator().manual_seed(3))
    b = sampler(8, torch.Generator().manual_seed(3))
    c = sampler(8, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_min_keep_scales_with_grid():
    assert MaskConfig(grid=14).keep == 10
    assert MaskConfig(grid=16).keep == MaskConfig(grid=28).keep == 10  # 224 px with 14-px or 8-px patches
    assert MaskConfig(grid=8).keep == 3
    assert MaskConfig(grid=8, min_keep=5).keep == 5


def test_random_mode_disjoint_and_sized():
    cfg = MaskConfig(grid=8, mode="random")
    ctx, tgt = MaskSampler(cfg)(4, torch.Generator().manual_seed(0))
    # 4 targets, each as many patches as a block of scale 0.15–0.2 on 8×8 (int(64 · s) = 9..12)
    assert tgt.shape[:2] == (4, 4) and 8 <= tgt.shape[2] <= 12
    assert ctx.shape[1] > cfg.keep
    for b in range(4):
        t = tgt[b].flatten().tolist()
        assert len(set(t)) == len(t)
        assert not set(ctx[b].tolist()) & set(t)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_scale": (0.0, 0.2)}, "target_scale must satisfy"),
        ({"context_scale": (0.5, 1.2)}, "context_scale must satisfy"),
        ({"target_scale": (0.01, 0.02)}, "hold 1 patch, not more than min_keep 3"),
        ({"mode": "checkerboard"}, "mask_mode must be one of multiblock, random"),
        ({"mode": "random", "num_targets": 8}, "random masking with 8 targets of up to 12 patches"),
    ],
)
def test_bad_mask_configs_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        MaskSampler(MaskConfig(grid=8, **kwargs))


def test_first_k_counts_past_the_int16_range():
    """Grids past 181 × 181 have more patches than an int16 counts: the first k of each row
    must still be the first k True entries in raster order."""
    from stoptool.masks import _first_k

    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 200 * 200, generator=gen) < 0.9
    k = int(mask.sum(-1).min())
    expected = torch.stack([row.nonzero()[:k, 0] for row in mask])
    assert k > 32767 and torch.equal(_first_k(mask, k), expected)


def test_a_grid_past_512_patches_a_side_is_refused():
    MaskConfig(grid=512).validate()
    with pytest.raises(UserError, match="makes a 513×513 grid of patches; at most 512 a side work"):
        MaskConfig(grid=513).validate()
