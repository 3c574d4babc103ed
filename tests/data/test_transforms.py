"""The pretraining crop against straightforward Pillow references, and the uint8 hand-off."""

import io
import random

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from stoptool.data.base import open_image
from stoptool.data.transforms import (
    MEAN,
    STD,
    PretrainTransform,
    crop_box,
    draft_factor,
    normalize,
    resized_crop,
    to_tensor,
)


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _photo() -> bytes:
    """A real photograph (512 × 600) that ships with matplotlib."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return f.read()


def _reference(raw: bytes, box, size: int) -> np.ndarray:
    """Decode in full, crop, resize bilinear (antialiased in Pillow): what torchvision's
    RandomResizedCrop does to a PIL image."""
    full = Image.open(io.BytesIO(raw)).convert("RGB")
    return np.asarray(full.crop(box).resize((size, size), Image.BILINEAR)).astype(int)


def _ours(raw: bytes, box, size: int) -> tuple[np.ndarray, tuple]:
    img = open_image(raw)
    out = resized_crop(img, box, size)
    assert out.dtype == torch.uint8 and out.shape == (3, size, size)
    return out.permute(1, 2, 0).numpy().astype(int), img.size


@pytest.mark.parametrize("size", [224, 48])  # 48: the crop is upsampled from small images too
def test_bilinear_crop_matches_pillow_where_the_image_is_decoded_in_full(size):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(noise).resize((25, 19)).resize((500, 375), Image.BICUBIC))
    small = np.asarray(Image.fromarray(smooth).resize((40, 30)))
    r = random.Random(0)
    for pixels in (noise, smooth, small):
        raw = _jpeg(pixels)
        h, w = pixels.shape[:2]
        for _ in range(10):
            box = crop_box(w, h, (0.3, 1.0), r)
            if draft_factor(box, size) > 1:
                continue
            got, decoded = _ours(raw, box, size)
            assert decoded == (w, h)
            diff = np.abs(got - _reference(raw, box, size))
            # the same filter: the two round their fixed-point sums one level apart at most
            assert diff.max() <= 1 and diff.mean() < 0.5


def test_reduced_scale_decoding_stays_within_its_stated_bound_of_the_full_decode():
    """Where a crop keeps at least twice the output size, the JPEG is decoded at 1/2, 1/4 or
    1/8 scale and the crop's edges snap to that grid. Against a full decode resized from the
    same snapped box, a photo's pixels differ by at most 4 levels (of 255) on average: about
    what any two-stage resample (a box reduction, then the resize) differs by."""
    raw = _photo()
    w, h = Image.open(io.BytesIO(raw)).size
    r = random.Random(1)
    factors = set()
    for size in (128, 64, 32):
        for _ in range(12):
            box = crop_box(w, h, (0.3, 1.0), r)
            f = draft_factor(box, size)
            snapped = tuple(f * round(v / f) for v in box)
            got, decoded = _ours(raw, box, size)
            assert decoded == (-(-w // f), -(-h // f))  # decoded at 1/f
            assert np.abs(got - _reference(raw, snapped, size)).mean() <= 4.0
            factors.add(f)
    assert factors >= {2, 4, 8}


def test_bicubic_is_pillows_resize_of_the_decoded_image():
    raw = _photo()
    box = (10, 20, 300, 330)
    want = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB").resize((64, 64), Image.BICUBIC, box=box))
    got = resized_crop(open_image(raw), box, 64, "bicubic")
    assert torch.equal(got, torch.from_numpy(want.copy()).permute(2, 0, 1))


def test_the_transform_hands_out_uint8_and_normalising_it_is_the_float_path():
    img = Image.open(io.BytesIO(_photo()))
    x = PretrainTransform(32, interpolation="bicubic")(img, random.Random(3))
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    # bit for bit what the workers computed before they handed out uint8
    hwc = np.asarray(x.permute(1, 2, 0).numpy(), dtype=np.float32)
    before = (hwc / 255.0 - np.float32(MEAN)) / np.float32(STD)
    assert torch.equal(normalize(x[None])[0], torch.from_numpy(before).permute(2, 0, 1))
    assert torch.equal(to_tensor(Image.fromarray(x.permute(1, 2, 0).numpy())), normalize(x))
    floats = torch.randn(2, 3, 4, 4)
    assert normalize(floats) is floats


def test_flip_and_grey_act_on_the_crop_and_the_draws_repeat():
    data = _photo()
    plain = PretrainTransform(32)(open_image(data), random.Random(5))
    flipped = PretrainTransform(32, hflip=1.0)(open_image(data), random.Random(5))
    assert torch.equal(flipped, plain.flip(2))
    grey = PretrainTransform(32, gray=1.0)(open_image(data), random.Random(5))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    again = PretrainTransform(32, hflip=0.5, blur=0.5)
    assert torch.equal(again(open_image(data), random.Random(9)), again(open_image(data), random.Random(9)))
