"""The synthetic counting set: every image holds as many objects as its label says, the same
pixels on every call, equal shares of every count."""

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.data.count import COUNTS, IMG, SIZES, count_dataset, draw_image
from stoptool.data.datasets import open_dataset
from stoptool.errors import UserError
from stoptool.io.checkpoint import read_meta
from stoptool.probe.run import ProbeConfig, open_splits


def objects_in(image: np.ndarray) -> int:
    """Connected regions (8-neighbours) that differ from the background, read at a corner."""
    background = image[0, 0].astype(int)
    differs = np.abs(image.astype(int) - background).sum(-1) > 80
    return ndimage.label(differs, structure=np.ones((3, 3)))[1]


def test_each_image_holds_as_many_objects_as_its_label():
    test = count_dataset("test")
    counted = np.array([objects_in(img) for img in test.images])
    labelled = np.array(COUNTS)[test.labels]
    assert (counted == labelled).all(), np.flatnonzero(counted != labelled)[:10]


def test_splits_are_fixed_sized_balanced_and_distinct():
    train, test = count_dataset("train"), count_dataset("test")
    assert (len(train), len(test)) == (SIZES["train"], SIZES["test"]) == (5000, 1000)
    assert train.images.shape == (5000, IMG, IMG, 3) and train.images.dtype == np.uint8
    assert train.classes == [str(c) for c in COUNTS] == ["1", "2", "3", "4", "5", "6"]
    for data in (train, test):
        shares = np.bincount(data.labels, minlength=len(COUNTS))
        assert shares.max() - shares.min() <= 1
        assert len(set(data.labels[:30].tolist())) > 1  # shuffled, not sorted by count
    assert not np.array_equal(train.images[:1000], test.images)
    assert train.load(0).size == (IMG, IMG) and train.describe()["name"] == "count/train"


def test_images_are_the_same_pixels_on_every_draw():
    """Image i of a split depends on (split, i) alone: not on the process or the order."""
    test = count_dataset("test")
    for i in (0, 17, 999):
        again = draw_image("test", i, COUNTS[test.labels[i]])
        assert np.array_equal(again, test.images[i])
    assert not np.array_equal(draw_image("train", 17, 3), draw_image("test", 17, 3))


def test_open_dataset_names_it_and_refuses_a_subset():
    assert open_dataset("count", "test").name == "count/test"
    with pytest.raises(UserError, match="subset keeps images of an ImageFolder tree; count has none"):
        open_dataset("count", "train", subset="list.txt")


def test_probe_takes_it_by_name_and_other_splits_are_refused():
    train, test, tag = open_splits(ProbeConfig(dataset="count"))
    assert (len(train), len(test), tag) == (5000, 1000, "count")
    assert np.array_equal(test.images, count_dataset("test").images)
    with pytest.raises(UserError, match="the count data set has the splits train and test, not 'val'"):
        open_dataset("count", "val")


def test_pretrain_on_it_records_the_data_set(tmp_path):
    args = ["pretrain", "--dataset", "count", "--arch", "vit_n2", "--img-size", "16", "--pred-width",
            "48", "--pred-depth", "1", "--batch-size", "8", "--precision", "fp32", "--steps", "1",
            "--eval-every", "0", "-q", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = read_meta(tmp_path / "run" / "latest.safetensors")["data"]
    assert data == {"name": "count/train", "size": 5000, "classes": 6}
