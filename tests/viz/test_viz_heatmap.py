"""The heatmap probabilities (paper Fig. 6), computed apart from any drawing."""

import pytest
import torch
import torch.nn.functional as F

from stoptool.errors import UserError
from stoptool.masks import MaskConfig, MaskSampler
from stoptool.models.encoder import encode
from stoptool.models.jepa import build_jepa
from stoptool.viz.heatmap import block_centres, heatmap_probs, locate, predictions_and_targets

GRID = 8


@pytest.fixture(scope="module")
def setup():
    from types import SimpleNamespace

    torch.manual_seed(0)
    cfg = SimpleNamespace(arch="vit_n2", img_size=16, sigma=0.5, pred_depth=1, pred_width=48,
                          pred_pos="sincos", noise_on="masked", cov="learned")
    model = build_jepa(cfg).eval()
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx, tgt = MaskSampler(MaskConfig(grid=GRID))(1, torch.Generator().manual_seed(0))
    return model, image, ctx[0], tgt[0]


def test_each_map_is_a_distribution_over_the_grid(setup):
    model, image, ctx, tgt = setup
    patches = [p.index for p in block_centres(tgt, GRID)]
    probs = heatmap_probs(model, image, ctx, tgt, patches)
    assert probs.shape == (len(patches), GRID, GRID)
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum((1, 2)), torch.ones(len(patches)), atol=1e-5)


@pytest.mark.parametrize("known", [0, 27, 63])
def test_a_prediction_equal_to_a_target_token_peaks_there(setup, known):
    """Hand-built predictor: its output is the layer-normed target token at `known`."""
    model, image, ctx, tgt = setup
    with torch.no_grad():
        h = encode(model.target_encoder, image[None])
        token = F.layer_norm(h, h.shape[-1:])[0, known]
    saved = {k: v.clone() for k, v in model.predictor.predictor_proj.state_dict().items()}
    try:
        with torch.no_grad():
            model.predictor.predictor_proj.weight.zero_()
            model.predictor.predictor_proj.bias.copy_(token)
        patches = tgt[:, 0].tolist()
        probs = heatmap_probs(model, image, ctx, tgt, patches, temperature=0.05)
    finally:
        model.predictor.predictor_proj.load_state_dict(saved)
    for p in probs:
        assert int(p.argmax()) == known
        assert float(p.flatten()[known]) > 2 * float(p.flatten().topk(2).values[1])


def test_no_noise_even_if_the_model_is_in_train_mode(setup):
    model, image, ctx, tgt = setup
    patches = [int(tgt[0, 0])]
    expected = heatmap_probs(model, image, ctx, tgt, patches)
    model.train()
    try:
        again = heatmap_probs(model, image, ctx, tgt, patches)
        assert model.training  # the caller's mode is given back
    finally:
        model.eval()
    assert torch.equal(expected, again)


def test_temperature_sharpens(setup):
    model, image, ctx, tgt = setup
    patches = [int(tgt[1, 0])]
    hot = heatmap_probs(model, image, ctx, tgt, patches, temperature=1.0)
    cold = heatmap_probs(model, image, ctx, tgt, patches, temperature=0.05)
    assert cold.max() > hot.max()
    assert int(cold.argmax()) == int(hot.argmax())


def test_patch_must_be_in_a_target_block(setup):
    model, image, ctx, tgt = setup
    with pytest.raises(UserError, match="is not in a target block"):
        heatmap_probs(model, image, ctx, tgt, [int(ctx[0])])
    hit = locate(tgt, int(tgt[2, 3]), GRID)
    assert int(tgt[hit.block, hit.position]) == int(tgt[2, 3])


def test_block_centres_lie_inside_their_blocks(setup):
    _, _, _, tgt = setup
    for centre in block_centres(tgt, GRID):
        assert centre.index in tgt[centre.block].tolist()


def test_targets_are_the_layer_normed_target_encoder_tokens(setup):
    model, image, ctx, tgt = setup
    pred, targets = predictions_and_targets(model, image, ctx, tgt)
    with torch.no_grad():
        h = encode(model.target_encoder, image[None])
    assert torch.allclose(targets, F.layer_norm(h, h.shape[-1:])[0], atol=1e-5)
    assert pred.shape == (*tgt.shape, h.shape[-1])


def test_the_legend_names_every_mark_in_its_colour(setup):
    """The white box, the context's outline and each target block's outline each get an entry."""
    import numpy as np
    from matplotlib.colors import to_rgba

    from stoptool.viz.common import CONTEXT_COLOR, TARGET_COLORS
    from stoptool.viz.heatmap import draw_heatmap

    model, image, ctx, tgt = setup
    patches = [p.index for p in block_centres(tgt, GRID)]
    probs = heatmap_probs(model, image, ctx, tgt, patches)
    display = np.zeros((64, 64, 3), dtype=np.uint8)
    fig = draw_heatmap(display, probs, patches, ctx, tgt, 0.1)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    # (this mask's blocks 1 and 3 happen to cover the same patches: one outline, one entry)
    groups: dict[frozenset, list[int]] = {}
    for m, block in enumerate(tgt):
        groups.setdefault(frozenset(block.tolist()), []).append(m)
    assert sorted(len(g) for g in groups.values()) == [1, 1, 2]
    same = " (the same patches)"
    named = [f"target block {' = '.join(str(m + 1) for m in g)}" + (same if len(g) > 1 else "")
             for g in groups.values()]
    assert labels == ["masked patch whose prediction is mapped", "context block (targets removed)", *named]
    edges = [h.get_edgecolor() for h in legend.legend_handles]
    expected = ["white", CONTEXT_COLOR, *[TARGET_COLORS[g[0] % len(TARGET_COLORS)] for g in groups.values()]]
    assert edges == [to_rgba(c) for c in expected]
    # the query patch's entry is drawn as the panels draw the patch: a white box, no fill, a dark rim
    query = legend.legend_handles[0]
    assert query.get_facecolor()[3] == 0 and query.get_path_effects()
    boxes = [c for c in fig.axes[1].collections if c.get_path_effects()]
    assert len(boxes) == 1 and to_rgba(boxes[0].get_edgecolor()[0]) == to_rgba("white")
    titles = [ax.get_title() for ax in fig.axes[1:1 + len(patches)]]
    for title, patch in zip(titles, patches, strict=True):
        r, c = divmod(patch, GRID)
        assert title.startswith(f"patch ({r}, {c}) of target {locate(tgt, patch, GRID).block + 1}  max ")


def test_target_blocks_sampled_onto_the_same_patches_are_one_outline_and_one_entry(setup):
    import numpy as np

    from stoptool.viz.heatmap import draw_heatmap

    model, image, ctx, tgt = setup
    other = next(b for b in tgt if set(b.tolist()) != set(tgt[0].tolist()))
    same = torch.stack([tgt[0], other, tgt[0].flip(0)])  # block 3 is block 1 again, in another order
    patches = [p.index for p in block_centres(same, GRID)][:2]
    probs = heatmap_probs(model, image, ctx, same, patches)
    fig = draw_heatmap(np.zeros((64, 64, 3), dtype=np.uint8), probs, patches, ctx, same, 0.1)
    labels = [t.get_text() for t in fig.legends[0].get_texts()][2:]
    assert labels == ["target block 1 = 3 (the same patches)", "target block 2"]
    assert len(fig.axes[0].collections) == 3  # the mask panel: the context and two block outlines
