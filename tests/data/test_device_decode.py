"""decode=gpu's code path, run on the CPU: the worker's draws, the batch decoded by
torchvision on the device it is moved to, and the refusals without a GPU."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from stoptool.data.base import open_image
from stoptool.data.device_decode import DeferredTransform, Encoded, EncodedBatch, check_device
from stoptool.data.transforms import PretrainTransform, crop_box
from stoptool.errors import UserError


def _file(seed: int, fmt: str) -> bytes:
    y, x = np.mgrid[0:60, 0:80].astype(np.float64)
    r = 128 + 90 * np.sin(x / 9 + seed) * np.cos(y / 6)
    buf = io.BytesIO()
    Image.fromarray(np.stack([r, 255 - r, r / 2], -1).astype(np.uint8)).save(buf, fmt, quality=95)
    return buf.getvalue()


def test_the_device_decodes_the_crops_the_cpu_path_would_have_made():
    """The same draws, so the same crops and flips; the same bilinear filter, computed in float
    on the device and in uint8 on the CPU: one level apart at most. A PNG travels as pixels.
    (At 40 px out of 80 × 60 no crop is large enough for the CPU path's reduced-scale decoding.)"""
    transform = PretrainTransform(40, hflip=0.5)
    deferred = DeferredTransform(transform)
    files = [_file(s, "JPEG") for s in range(6)] + [_file(9, "PNG")]
    items = [deferred(open_image(f), random.Random(i)) for i, f in enumerate(files)]
    assert [e.jpeg is None for e in items] == [False] * 6 + [True]
    assert items[0].box == crop_box(80, 60, transform.crop_scale, random.Random(0))
    assert torch.equal(items[0].jpeg, torch.frombuffer(bytearray(files[0]), dtype=torch.uint8))
    assert {e.flip for e in items[:6]} == {True, False}
    got = EncodedBatch(items).to(torch.device("cpu"))
    want = torch.stack([transform(open_image(f), random.Random(i)) for i, f in enumerate(files)])
    assert got.dtype == torch.uint8 and got.shape == want.shape == (7, 3, 40, 40)
    assert (got.int() - want.int()).abs().max() <= 1
    assert torch.equal(got[6], want[6])


def test_a_batch_moves_through_the_loader_like_a_tensor():
    batch = EncodedBatch([Encoded(None, 4, pixels=torch.zeros(3, 4, 4, dtype=torch.uint8))])
    assert batch.pin_memory() is batch and len(batch) == 1
    assert batch.to("cpu").shape == (1, 3, 4, 4)


def test_gpu_decoding_is_refused_without_a_cuda_device():
    check_device("cpu", torch.device("cpu"))  # nothing to check
    with pytest.raises(UserError, match="decode=gpu decodes JPEGs on a CUDA device, and this run's device"):
        check_device("gpu", torch.device("cpu"))


def test_gpu_decoding_with_blur_or_bicubic_is_refused_before_anything_runs(tiny_cfg):
    for extra in ({"blur": 0.5}, {"gray": 0.2}, {"interpolation": "bicubic"}):
        with pytest.raises(UserError, match="blur, gray and bicubic resizing need decode=cpu"):
            tiny_cfg(decode="gpu", **extra)
