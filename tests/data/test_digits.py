"""The bundled digits: read without importing scikit-learn, equal to what scikit-learn gives."""

import importlib.util

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from stoptool.data import datasets
from stoptool.io.paths import asset


def _reference(split: str) -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    images = np.repeat(np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=-1)
    train, test = train_test_split(np.arange(len(images)), test_size=0.25, random_state=0,
                                   stratify=data.target)
    idx = {"train": train, "test": test, "all": np.arange(len(images))}[split]
    return images[idx], data.target[idx]


@pytest.mark.parametrize("split, size", [("train", 1347), ("test", 450), ("all", 1797)])
@pytest.mark.parametrize("through_sklearn", [False, True])
def test_digits_equal_scikit_learns_split_in_order(split, size, through_sklearn, monkeypatch):
    if through_sklearn:  # the data file not where it is expected: load_digits reads it
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    ds = datasets.digits(split)
    images, labels = _reference(split)
    assert len(ds) == size and ds.name == f"digits/{split}"
    assert ds.images.dtype == np.uint8 and ds.images.shape == (size, 8, 8, 3)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype.kind == "i" and ds.classes == [str(d) for d in range(10)]


def test_the_stored_split_is_disjoint_covers_every_image_and_is_stratified():
    with np.load(asset("digits_split.npz")) as stored:
        train, test = stored["train"].astype(np.int64), stored["test"].astype(np.int64)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    labels = load_digits().target
    share = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
    assert np.abs(share - 0.25).max() < 0.01
