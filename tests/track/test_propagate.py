"""Label propagation: DINO's resize rule, features on a non-square grid with generated
sine-cosine positions, one propagation step against the protocol written out here in numpy,
and the mask read off the labels."""

import copy

import numpy as np
import pytest
import torch

from stoptool.errors import UserError
from stoptool.flops import encoder_flops
from stoptool.models.encoder import build_encoder, encode
from stoptool.models.pos_embed import sincos_2d
from stoptool.track.propagate import (
    check_sincos,
    first_labels,
    frame_flops,
    grid_features,
    input_size,
    propagate,
    to_ids,
)


def test_frames_are_resized_as_dino_does_and_rounded_to_the_patch():
    assert input_size(480, 854, 480, 16) == (480, 832)  # 854 -> 832, the multiple of 64 below
    assert input_size(480, 910, 480, 16) == (480, 896)
    assert input_size(480, 1152, 480, 16) == (480, 1152)
    assert input_size(854, 480, 480, 16) == (832, 480)  # portrait: the same rule on the height
    assert input_size(480, 854, 480, 8) == (480, 832)
    # ViT-H/14: 480 = 34.3 patches -> 476; 832 = 59.4 -> 826; 1152 = 82.3 -> 1148
    assert input_size(480, 854, 480, 14) == (476, 826)
    assert input_size(480, 1152, 480, 14) == (476, 1148)
    with pytest.raises(UserError, match="short_side 16 is too small"):
        input_size(480, 854, 16, 16)


@pytest.fixture(scope="module")
def vit_t4():
    torch.manual_seed(0)
    return build_encoder("vit_t4", 32).eval()


def test_grid_features_equal_the_encoder_on_a_square_grid(vit_t4):
    enc = vit_t4
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = grid_features(enc, images, sincos_2d(192, 8, 8))
        reference = encode(enc, images)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_a_non_square_grid_gets_each_patch_its_own_sine_cosine_position(vit_t4):
    # With the patch embedding and every block silenced, a token is norm(its position): the
    # token at (row r, column c) of a 3 × 7 grid must be the one at (r, c) of the square 8 × 8
    # table the encoder holds (positions are a function of (r, c) alone; an interpolated
    # table would differ).
    enc = copy.deepcopy(vit_t4)
    with torch.no_grad():
        enc.patch_embed.proj.weight.zero_()
        enc.patch_embed.proj.bias.zero_()
        for block in enc.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
        tokens = grid_features(enc, torch.randn(1, 3, 12, 28), sincos_2d(192, 3, 7))[0]
        square = enc.norm(enc.pos_embed[0]).reshape(8, 8, 192)
    assert torch.allclose(tokens.reshape(3, 7, 192), square[:3, :7], atol=1e-5)


def test_an_encoder_with_learned_positions_is_refused(vit_t4):
    enc = copy.deepcopy(vit_t4)
    check_sincos(enc)  # the fixed table passes
    with torch.no_grad():
        enc.pos_embed.add_(0.1 * torch.randn_like(enc.pos_embed))
    with pytest.raises(UserError, match="not the fixed 2-D sine-cosine table"):
        check_sincos(enc)


def dino_step(target, keys, values, grid, topk, radius, temperature):
    """One frame's labels by the protocol, in numpy: exp(cos / T) to every context patch, zero
    outside the (2·radius+1)² window, the top-k over all context patches kept, normalised,
    and the labels summed with those weights."""
    h, w = grid
    out = np.zeros((h * w, values[0].shape[1]))
    for q in range(h * w):
        weights, labels = [], []
        for key, value in zip(keys, values):
            for k in range(h * w):
                inside = abs(q // w - k // w) <= radius and abs(q % w - k % w) <= radius
                weights.append(np.exp(target[q] @ key[k] / temperature) if inside else 0.0)
                labels.append(value[k])
        weights = np.array(weights)
        kth = np.sort(weights)[-topk]
        weights = np.where(weights >= kth, weights, 0.0)
        out[q] = (weights / weights.sum()) @ np.array(labels)
    return out


def test_propagation_matches_the_protocol_written_out():
    rng = np.random.default_rng(0)
    grid, frames = (3, 4), 4
    feats = rng.normal(size=(frames, 12, 8))
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    first = np.eye(3)[rng.integers(0, 3, 12)]
    steps = list(propagate(torch.tensor(feats, dtype=torch.float32), torch.tensor(first, dtype=torch.float32),
                           grid, n_last_frames=1, topk=3, radius=1, temperature=0.1))
    assert len(steps) == frames - 1
    # frame 1: the first frame alone; frame 3: the first frame and frame 2 with its prediction
    want1 = dino_step(feats[1], [feats[0]], [first], grid, 3, 1, 0.1)
    want2 = dino_step(feats[2], [feats[0], feats[1]], [first, want1], grid, 3, 1, 0.1)
    want3 = dino_step(feats[3], [feats[0], feats[2]], [first, want2], grid, 3, 1, 0.1)
    for got, want in zip(steps, (want1, want2, want3)):
        assert np.allclose(got.numpy(), want, atol=1e-5)
    # radius 0 means no window at all (as DINO's size_mask_neighborhood 0)
    two = torch.tensor(feats[:2], dtype=torch.float32)
    (whole,) = propagate(two, torch.tensor(first, dtype=torch.float32), grid, 1, 3, 0, 0.1)
    assert np.allclose(whole.numpy(), dino_step(feats[1], [feats[0]], [first], grid, 3, 99, 0.1), atol=1e-5)


def test_the_first_mask_enters_on_the_patch_grid_with_void_voting_for_nothing():
    ids = np.zeros((8, 8), np.uint8)
    ids[:4, 4:] = 2
    ids[4:, :4] = 255
    labels = first_labels(ids, objects=2, grid=(2, 2), device=torch.device("cpu"))
    assert labels.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]]


def test_labels_become_ids_after_per_channel_min_max():
    # Background 0.6 everywhere but 0.5 at patch (0, 1); the object 0.3 there and 0 elsewhere.
    # Raw, the background wins everywhere; each channel stretched to [0, 1], the object takes
    # its patch (whose centre pixels the bilinear upsampling leaves at the patch's value).
    labels = torch.tensor([[0.6, 0.0], [0.5, 0.3], [0.6, 0.0], [0.6, 0.0]])
    ids = to_ids(labels, grid=(2, 2), patch=8, frame=(32, 32))
    assert ids.shape == (32, 32) and ids.dtype == np.uint8
    assert (ids[4:12, 20:28] == 1).all()  # patch (0, 1), frame twice the input: rows 0..15, cols 16..31
    assert (ids[16:, :] == 0).all() and (ids[:, :8] == 0).all()


def test_frame_flops_agree_with_the_encoder_count_on_a_square_frame():
    assert frame_flops("vit_b16", (224, 224)) == encoder_flops("vit_b16", 224)
    # 480 × 832 at /16 is 1,560 tokens; ViT-H/14 at 476 × 826, 2,006
    assert frame_flops("vit_b16", (480, 832)) > 6 * encoder_flops("vit_b16", 224)
