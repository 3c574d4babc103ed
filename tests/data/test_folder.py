"""ImageFolder trees and subset files (the 1 % ImageNet subset format)."""

import numpy as np
import pytest
from PIL import Image

from stoptool.data.datasets import FolderDataset, open_dataset
from stoptool.errors import UserError


@pytest.fixture
def tree(tmp_path):
    for cls in ("n01", "n02", "n03"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / cls / f"{cls}_{i}.JPEG")
    return tmp_path


def test_all_images_with_class_labels(tree):
    ds = FolderDataset(tree)
    assert len(ds) == 12 and ds.classes == ["n01", "n02", "n03"]
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.load(5).size == (8, 8)


def test_subset_keeps_exactly_the_listed_images(tree, tmp_path_factory):
    listed = ["n01_2.JPEG", "n02_0.JPEG", "n03_3.JPEG", "n03_1.JPEG"]
    subset = tmp_path_factory.mktemp("s") / "1percent.txt"
    subset.write_text("\n".join(listed) + "\n\n")
    ds = FolderDataset(tree, subset)
    assert sorted(f.name for f in ds.files) == sorted(listed)
    assert dict(zip((f.name for f in ds.files), ds.labels.tolist())) == {
        "n01_2.JPEG": 0, "n02_0.JPEG": 1, "n03_1.JPEG": 2, "n03_3.JPEG": 2,
    }
    assert ds.classes == ["n01", "n02", "n03"]  # labels keep the full class list


def test_subset_by_relative_path(tree, tmp_path_factory):
    subset = tmp_path_factory.mktemp("s") / "rel.txt"
    subset.write_text("n02/n02_3.JPEG\n")
    assert [f.name for f in FolderDataset(tree, subset).files] == ["n02_3.JPEG"]


def test_subset_naming_no_image_is_a_user_error(tree, tmp_path_factory):
    subset = tmp_path_factory.mktemp("s") / "none.txt"
    subset.write_text("nothing.JPEG\n")
    with pytest.raises(UserError, match="names no image"):
        FolderDataset(tree, subset)


def test_a_subset_that_is_not_a_text_file_is_a_user_error(tree, tmp_path_factory):
    folder = tmp_path_factory.mktemp("s")
    binary = folder / "list.bin"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match="is not text: it lists image file names"):
        FolderDataset(tree, binary)
    with pytest.raises(UserError, match=f"subset file '{folder}' is not a file"):
        FolderDataset(tree, folder)


def test_an_image_too_large_to_open_safely_is_skipped_and_16_bit_grey_is_scaled(tmp_path, monkeypatch):
    """Pillow refuses images past its decompression-bomb limit with an error of its own (not an
    OSError); the loaders must skip such a file like any unreadable one. A 16-bit grey PNG
    keeps its shades instead of clipping to white."""
    from stoptool.data.loader import check_readable

    (tmp_path / "a").mkdir()
    Image.new("L", (40, 40), 90).save(tmp_path / "a" / "0_large.png")
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(tmp_path / "a" / "1_grey16.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40 × 40 is past twice the limit, 16 × 16 is not
    ds = FolderDataset(tmp_path)
    with pytest.raises(ValueError, match="decompression bomb"):
        ds.load(0)
    check_readable(ds)  # finds the readable second image
    grey = np.asarray(ds.load(1))
    assert grey.shape == (16, 16, 3)
    np.testing.assert_array_equal(grey[..., 0], np.rint(ramp / 257.0).astype(np.uint8))


def test_imagenet_by_name_says_to_give_the_path_of_its_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder named imagenet here
    with pytest.raises(UserError, match="not bundled: set dataset to the path of an ImageFolder tree"):
        open_dataset("imagenet")
