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


def test_subset_lines_that_name_no_image_are_counted_and_named(tree, tmp_path_factory):
    subset = tmp_path_factory.mktemp("s") / "1percent.txt"
    subset.write_text("n01_2.JPEG\nn09_7.JPEG\nn02/n02_0.JPEG\nn01_2.JPEG\nn02/missing.JPEG\n")
    ds = FolderDataset(tree, subset)
    assert sorted(f.name for f in ds.files) == ["n01_2.JPEG", "n02_0.JPEG"]
    assert ds.subset_lines == 4  # the repeated line counts once
    assert ds.subset_unmatched == ["n09_7.JPEG", "n02/missing.JPEG"]  # in the file's order
    assert ds.subset_note() == (f"2 of 4 lines of the subset file '{subset}' name no image under '{tree}' "
                                "and are ignored (first: n09_7.JPEG)")
    assert FolderDataset(tree).subset_note() is None
    every = tmp_path_factory.mktemp("s") / "all.txt"
    every.write_text("n01_2.JPEG\nn03/n03_1.JPEG\n")
    assert FolderDataset(tree, every).subset_note() is None


def test_the_training_sizes_known_by_name_are_the_sets_own():
    from stoptool.data.datasets import digits, train_images

    assert train_images("digits") == len(digits("train")) == 1347
    assert train_images("imagenet") == 1_281_167  # ImageNet-1k's train split, as the presets name it


def test_a_missing_path_and_an_unknown_name_get_their_own_message(tmp_path):
    with pytest.raises(UserError, match=f"^dataset path does not exist: {tmp_path}/nope$"):
        open_dataset(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="^unknown dataset 'nope': use digits, count, cifar10, cifar100 "):
        open_dataset("nope")
