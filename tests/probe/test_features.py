"""Pooled features: `last` and `last4` against hand computation from the blocks."""

import torch

from stoptool.data.datasets import ArrayDataset
from stoptool.models.encoder import build_encoder
from stoptool.probe.features import extract_features, pooled_features


def _encoder():
    torch.manual_seed(0)
    return build_encoder("vit_t2", 16).eval()  # 12 blocks: the last four are not all of them


def test_last4_is_four_times_last_and_equals_hand_concatenation():
    enc = _encoder()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        last = pooled_features(enc, x, "last")
        last4 = pooled_features(enc, x, "last4")
        # by hand: run the blocks one by one, pool the closing-norm output of the last four
        h = enc.patch_embed(x) + enc.pos_embed
        pooled = []
        for i, block in enumerate(enc.blocks):
            h = block(h)
            if i >= len(enc.blocks) - 4:
                pooled.append(enc.norm(h).mean(1))
        by_hand = torch.cat(pooled, dim=1)
        timm_pool = enc.forward_head(enc.forward_features(x))  # timm's own avg-pool head
    assert last.shape == (3, 192) and last4.shape == (3, 4 * 192)
    torch.testing.assert_close(last4, by_hand)
    torch.testing.assert_close(last, by_hand[:, -192:])
    torch.testing.assert_close(last, timm_pool, rtol=1e-4, atol=1e-5)


def test_extraction_keeps_order_labels_and_eval_mode():
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (7, 8, 8, 3), dtype=np.uint8)
    data = ArrayDataset("t", images, np.arange(7) % 3, ["a", "b", "c"])
    enc = _encoder().train()
    seen = []
    feats = extract_features(enc, data, 16, "last", batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert feats.x.shape == (7, 192) and feats.x.dtype == np.float32
    assert feats.y.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert not enc.training
    assert seen[-1] == (7, 7)
    one = extract_features(enc, ArrayDataset("t", data.images[4:5], data.labels[4:5], data.classes), 16)
    np.testing.assert_allclose(one.x[0], feats.x[4], rtol=1e-4, atol=1e-5)  # batching changes nothing
