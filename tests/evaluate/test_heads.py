"""The paper protocol's heads: both kinds trained and recorded, the better one reported, the
views taken in turn, and VISSL's learning-rate schedule."""

import math

import numpy as np
import pytest

from stoptool.evaluate.heads import Recipe, best, train_heads
from stoptool.probe.features import Features

WIDTH, CLASSES = 8, 3


def _features(n: int, seed: int) -> Features:
    """`last4` rows of 4 blocks × 8: the class shows in the first and the last block, on a large
    common offset with a tiny spread. A plain linear layer trained by SGD cannot use such
    features; BatchNorm first brings them to unit scale."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0, 1, (n, 4 * WIDTH))
    x[np.arange(n), y] += 3.0
    x[np.arange(n), 3 * WIDTH + y] += 3.0
    return Features((200.0 + 0.01 * x).astype(np.float32), y)


def test_both_heads_of_both_layers_train_and_the_better_one_is_reported():
    train, test = _features(200, 0), _features(120, 1)
    asked = []

    def view(v):
        asked.append(v)
        return train

    recipe = Recipe(epochs=15, lr=1.0, batch_size=32)
    rows = train_heads(view, 2, test, WIDTH, CLASSES, ("last", "last4"), recipe)
    got = {(r["layers"], r["head"]): r for r in rows}
    assert set(got) == {(lay, kind) for lay in ("last", "last4") for kind in ("linear", "bn_linear")}
    assert got[("last", "linear")]["dim"] == WIDTH and got[("last4", "linear")]["dim"] == 4 * WIDTH
    for layers in ("last", "last4"):
        assert got[(layers, "bn_linear")]["top1"] >= 0.9  # normalised, the class is plain to see
        assert got[(layers, "linear")]["top1"] <= 0.6  # unnormalised, SGD gets nowhere near it
    assert best(rows)["head"] == "bn_linear" and best(rows)["top1"] == max(r["top1"] for r in rows)
    assert all(r["top5"] is None for r in rows)  # 3 classes: no top-5
    assert asked == [0, 1] * 7 + [0]  # epoch e reads view e mod 2


def test_only_the_layers_asked_for_get_heads():
    train = _features(40, 0)
    rows = train_heads(lambda v: train, 1, train, WIDTH, CLASSES, ("last4",), Recipe(epochs=1))
    assert [(r["layers"], r["head"]) for r in rows] == [("last4", "linear"), ("last4", "bn_linear")]


def test_best_keeps_the_first_of_equal_heads():
    rows = [{"head": "linear", "top1": 0.5}, {"head": "bn_linear", "top1": 0.5}]
    assert best(rows)["head"] == "linear"


@pytest.mark.parametrize("batch", [256, 1024])
def test_the_learning_rate_follows_vissls_cosine_from_the_scaled_rate_to_one_percent(batch):
    recipe = Recipe(epochs=10, lr=0.01, batch_size=batch)
    start = 0.01 * batch / 256  # linear scaling with the batch
    end = start / 100
    for epoch in range(11):
        want = end + (start - end) * (1 + math.cos(math.pi * epoch / 10)) / 2
        assert recipe.lr_at(epoch) == pytest.approx(want)
    assert recipe.lr_at(0) == pytest.approx(start) and recipe.lr_at(5) == pytest.approx((start + end) / 2)
