"""`--fraction`: class-balanced, of the requested size, reproducible."""

import numpy as np
import pytest

from stoptool.errors import UserError
from stoptool.probe.subset import balanced_subset


def labels(counts):
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5])
def test_balanced_and_of_the_requested_size(fraction):
    y = np.random.default_rng(0).permutation(labels([500] * 10))
    idx = balanced_subset(y, fraction, seed=0)
    assert len(idx) == round(fraction * len(y)) and len(set(idx.tolist())) == len(idx)
    counts = np.bincount(y[idx], minlength=10)
    assert counts.max() - counts.min() <= 1


def test_uneven_classes_stay_as_even_as_they_can():
    y = labels([3, 50, 60, 70])
    idx = balanced_subset(y, 0.25, seed=0)  # 46 images: the small class gives all it has
    counts = np.bincount(y[idx])
    assert len(idx) == 46 and counts[0] == 3 and counts[1:].max() - counts[1:].min() <= 1


def test_every_class_keeps_at_least_one_image():
    y = labels([20] * 10)
    counts = np.bincount(y[balanced_subset(y, 0.001, seed=0)], minlength=10)
    assert (counts == 1).all()


def test_reproducible_and_seeded():
    y = np.random.default_rng(1).integers(0, 10, 2000)
    a, b = balanced_subset(y, 0.1, seed=7), balanced_subset(y, 0.1, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, balanced_subset(y, 0.1, seed=8))


def test_fraction_one_keeps_everything_in_order():
    y = labels([4, 5])
    np.testing.assert_array_equal(balanced_subset(y, 1.0), np.arange(9))


@pytest.mark.parametrize("fraction", [0, -0.5, 1.01])
def test_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(UserError, match=r"fraction must be in \(0, 1\]"):
        balanced_subset(np.zeros(10, int), fraction)
