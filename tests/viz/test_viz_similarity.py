"""The similarity maps themselves (paper Fig. 5), computed apart from any drawing."""

import numpy as np
import pytest
import torch

from stoptool.errors import UserError
from stoptool.models.predictor import Predictor
from stoptool.viz.similarity import (
    default_queries,
    draw_comparison,
    draw_similarity,
    parse_queries,
    similarity_maps,
)

GRID = 8


def predictor_with_fixed_A(cov="learned") -> Predictor:
    """A predictor whose A is a fixed, seeded matrix: the maps depend on σ alone."""
    pred = Predictor(grid=GRID, embed_dim=96, pred_dim=48, depth=1, num_heads=3, cov=cov)
    with torch.no_grad():
        A = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) * 0.1
        pred.predictor_embed.weight.copy_(A)
    return pred


def support(m: torch.Tensor, margin: float = 0.1) -> int:
    """Positions whose similarity comes within `margin` of the peak."""
    return int((m >= m.max() - margin).sum())


def test_deterministic_maps_peak_at_the_query_with_value_one():
    pred = predictor_with_fixed_A()
    queries = [(0, 0), (3, 5), (7, 7), (6, 1)]
    maps = similarity_maps(pred, queries, sigma=0.0)
    assert maps.shape == (4, GRID, GRID)
    assert maps.min() >= -1 and maps.max() <= 1
    for m, (r, c) in zip(maps, queries, strict=True):
        assert divmod(int(m.argmax()), GRID) == (r, c)
        assert m[r, c] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("cov", ["learned", "fixed"])
def test_maps_spread_as_sigma_grows(cov):
    pred = predictor_with_fixed_A(cov)
    queries = [(2, 2), (4, 5)]
    peaks, supports = [], []
    for sigma in (0.0, 1.0, 2.0, 4.0):
        gen = torch.Generator().manual_seed(0)
        maps = similarity_maps(pred, queries, sigma, draws=512, generator=gen)
        assert maps.min() >= -1 and maps.max() <= 1
        peaks.append(float(maps.amax((1, 2)).mean()))
        supports.append(sum(support(m) for m in maps))
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0] - 0.2
    assert supports == sorted(supports) and supports[-1] > supports[0]


def test_similarities_of_draws_are_averaged_not_the_draws():
    """The mean of ψ_q + A n is ψ_q: averaging embeddings would give back the σ = 0 map."""
    pred = predictor_with_fixed_A()
    noisy = similarity_maps(pred, [(4, 4)], 3.0, draws=4096, generator=torch.Generator().manual_seed(0))
    assert float(noisy.max()) < 0.9


def test_noise_scales_with_A():
    """Σ = σ² A Aᵀ: with A = 0 the stochastic position is the deterministic one."""
    pred = predictor_with_fixed_A()
    with torch.no_grad():
        pred.predictor_embed.weight.zero_()
    clean = similarity_maps(pred, [(1, 6)], 0.0)
    noisy = similarity_maps(pred, [(1, 6)], 5.0, draws=8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(clean, noisy, atol=1e-5)


def test_draws_are_reproducible_from_the_generator():
    pred = predictor_with_fixed_A()
    a = similarity_maps(pred, [(2, 3)], 1.0, 64, torch.Generator().manual_seed(7))
    b = similarity_maps(pred, [(2, 3)], 1.0, 64, torch.Generator().manual_seed(7))
    c = similarity_maps(pred, [(2, 3)], 1.0, 64, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_query_parsing():
    assert default_queries(8) == [(r, c) for r in (1, 4, 6) for c in (1, 4, 6)]
    assert parse_queries(None, 14) == default_queries(14, 3)
    assert parse_queries("2", 8) == [(1, 1), (1, 6), (6, 1), (6, 6)]
    assert parse_queries("0,0; 3,4", 8) == [(0, 0), (3, 4)]
    with pytest.raises(UserError, match="outside the 8×8 patch grid"):
        parse_queries("8,0", 8)
    assert len(parse_queries("8", 8)) == 64
    with pytest.raises(UserError, match="queries 9 asks for a 9×9 spread of patches, but the patch "
                                        "grid is 8×8: give at most 8"):
        parse_queries("9", 8)
    assert parse_queries(None, 2) == default_queries(2, 2)  # the default spread fits small grids


def _images(sub):
    return [im for ax in sub.axes for im in ax.get_images()]


def test_one_checkpoints_figure_adds_the_difference_on_a_diverging_scale_of_its_own():
    pred = predictor_with_fixed_A()
    queries = [(2, 2), (5, 6)]
    det = similarity_maps(pred, queries, 0.0)
    sto = similarity_maps(pred, queries, 1.0, draws=64, generator=torch.Generator().manual_seed(0))
    fig = draw_similarity(det, sto, queries, 1.0, 64)
    left, right, _, diff, _ = fig.subfigs
    assert [s.get_suptitle() for s in (left, right, diff)] == [
        "σ = 0 (deterministic ψ)", "σ = 1 (StoP), mean of 64 draws", "difference: σ = 1 minus σ = 0"]
    lowest = float(min(det.min(), sto.min()))
    for im in _images(left) + _images(right):  # one scale for the two blocks of similarities
        assert im.get_clim() == pytest.approx((lowest, 1.0))
    reach = float((sto - det).abs().max())
    shown = _images(diff)
    assert len(shown) == 2 and all(im.get_clim() == pytest.approx((-reach, reach)) for im in shown)
    assert all(im.get_cmap().name == "RdBu_r" for im in shown)
    for im, d in zip(shown, sto - det, strict=True):
        np.testing.assert_allclose(im.get_array(), d.numpy())


def test_checkpoints_side_by_side_share_one_scale_and_each_panel_names_its_sigma():
    pred = predictor_with_fixed_A()
    queries = [(1, 1), (4, 4), (6, 2)]
    ijepa = similarity_maps(pred, queries, 0.0)
    stop = similarity_maps(pred, queries, 2.0, draws=64, generator=torch.Generator().manual_seed(0))
    fig = draw_comparison([("ijepa: I-JEPA, σ = 0", ijepa), ("stop: StoP, σ = 2", stop)], queries, "title")
    blocks = fig.subfigs[:2]
    assert [b.get_suptitle() for b in blocks] == ["ijepa: I-JEPA, σ = 0", "stop: StoP, σ = 2"]
    lowest = float(min(ijepa.min(), stop.min()))
    shown = [im for b in blocks for im in _images(b)]
    assert len(shown) == 6 and all(im.get_clim() == pytest.approx((lowest, 1.0)) for im in shown)
