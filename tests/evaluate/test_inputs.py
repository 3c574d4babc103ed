"""What the evaluations feed the encoders: CLEVR squashed whole, training views seeded and
different, each encoder's own normalisation, and timm models pooled over patch tokens only."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from stoptool.data.datasets import open_dataset
from stoptool.probe.features import EvalImages, ImageTransform, pooled_features

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _red_left_third() -> Image.Image:
    """48 × 16: the left third red, the rest blue."""
    arr = np.zeros((16, 48, 3), dtype=np.uint8)
    arr[:, :16] = RED
    arr[:, 16:] = BLUE
    return Image.fromarray(arr)


def _pixels(x: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """[3, H, W] normalised -> [H, W, 3] in 0..255."""
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round()


def test_squash_keeps_the_whole_image_where_a_centre_crop_cuts_its_sides():
    img = _red_left_third()
    squashed = _pixels(ImageTransform(16, "squash")(img, 0))
    cropped = _pixels(ImageTransform(16, "crop")(img, 0))
    assert squashed.shape == cropped.shape == (16, 16, 3)
    assert np.allclose(squashed[:, 0], RED, atol=2) and np.allclose(squashed[:, -1], BLUE, atol=2)
    assert np.allclose(squashed[:, 5:, 2].mean(), 255, atol=40)  # a third of 16 columns is red, not more
    assert np.allclose(cropped, np.broadcast_to(BLUE, cropped.shape), atol=2)  # the centre is all blue


def test_clevr_is_squashed_by_default_and_other_sets_centre_cropped(data_root):
    clevr = open_dataset(f"clevr-dist:{data_root}", "val")
    images = EvalImages(clevr, 16)
    assert images.transform.resize == "squash"
    assert torch.equal(images[3][0], ImageTransform(16, "squash")(clevr.load(3), 3))
    assert EvalImages(open_dataset(f"inat18:{data_root / 'inat2018'}", "val"), 16).transform.resize == "crop"


def test_training_views_are_seeded_per_image_and_differ_between_views():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    view = ImageTransform(16, "crop", view=1, seed=3)
    assert torch.equal(view(img, 7), ImageTransform(16, "crop", view=1, seed=3)(img, 7))
    others = [ImageTransform(16, "crop", view=v, seed=3)(img, 7) for v in (0, 2, 3)]
    others.append(ImageTransform(16, "crop", view=1, seed=4)(img, 7))
    others.append(view(img, 8))
    assert all(not torch.equal(view(img, 7), o) for o in others)
    assert ImageTransform(16).key() is None  # the probe's evaluation features keep their cache keys
    assert ImageTransform(16, "crop", view=1, seed=3).key()["view"] == 1


def test_a_squashed_view_only_flips():
    img = _red_left_third()
    seen = {tuple(_pixels(ImageTransform(16, "squash", view=v)(img, 0))[8, 0]) for v in range(12)}
    assert seen == {RED, BLUE}  # red on the left, or flipped to the right: never cropped away


def test_the_encoders_own_normalisation_is_used():
    img = Image.new("RGB", (16, 16), (128, 128, 128))
    x = ImageTransform(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(img, 0)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-6)


@pytest.fixture(scope="module")
def test_vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32).eval()


def test_a_timm_model_is_pooled_over_its_patch_tokens_without_the_class_token(test_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = pooled_features(test_vit, x, "last")
        last4 = pooled_features(test_vit, x, "last4")
        tokens = test_vit.forward_features(x)  # [B, 1 + 4, 64]: the class token first
        by_hand, h = [], test_vit.patch_embed(x)
        h = test_vit._pos_embed(h)
        for i, block in enumerate(test_vit.blocks):
            h = block(h)
            if i >= len(test_vit.blocks) - 4:
                by_hand.append(test_vit.norm(h)[:, 1:].mean(1))
    assert tokens.shape == (2, 5, 64) and test_vit.num_prefix_tokens == 1
    torch.testing.assert_close(last, tokens[:, 1:].mean(1))
    assert not torch.allclose(last, tokens.mean(1))  # the class token is not averaged in
    torch.testing.assert_close(last4, torch.cat(by_hand, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last4[:, -64:], last, rtol=1e-4, atol=1e-5)
