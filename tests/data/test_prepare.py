"""`stoptool prepare`: the shards, lists and index it writes, read back with plain `tarfile`,
numpy and Pillow; its refusals; and that nothing half-written is ever left."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.data.prepare import parse_size, partial_dir, prepare, target_size
from stoptool.errors import UserError

runner = CliRunner(env={"COLUMNS": "400"})
CLASSES = ["cat", "dog", "eel"]
SHORT = 32  # the --short-side of these tests: the 300×200 images are shrunk, the 40×30 ones not


def smooth(w: int, h: int, seed: int) -> np.ndarray:
    """Gradients and a slow wave: an image JPEG and resizing change little, so that pixels can
    be compared with a tight tolerance."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    wave = 60 * np.sin(x / w * 3 + seed) * np.cos(y / h * 2)
    channels = [x / w * 200 + 20 + wave, y / h * 200 + 20, np.full_like(x, 40.0 * seed % 256) + wave / 2]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def make_split(root: Path, per_class: int, seed: int = 0) -> None:
    """`per_class` small JPEGs per class, one large JPEG each, a PNG in the second class, and a
    corrupt file in the third."""
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(smooth(40, 30, seed + 10 * c + i)).save(root / cls / f"{cls}{i}.jpg", quality=90)
        Image.fromarray(smooth(300, 200, seed + c)).save(root / cls / f"{cls}-big.jpg", quality=95)
    Image.fromarray(smooth(40, 30, 99)).save(root / "dog" / "dog-png.png")
    (root / "eel" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    make_split(root / "train", per_class=4)
    make_split(root / "val", per_class=1, seed=50)
    return root


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "set"
    prepare(tree, out, short_side=SHORT, shard_size="1GB", workers=0)
    return out


def read_shards(out: Path, split: str, index: dict) -> list[tuple[str, tarfile.TarInfo, bytes]]:
    """(shard name, member, bytes) of every member of every shard of `split`, in order."""
    found = []
    for shard in index["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            found += [(shard["name"], m, tar.extractfile(m).read()) for m in tar.getmembers()]
    return found


def all_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ---------------------------------------------------------------------- what is written


def test_every_readable_image_is_in_the_shards_once_with_its_label(tree, prepared):
    index = json.loads((prepared / "index.json").read_text())
    assert index["format"] == "stoptool-shards" and index["classes"] == CLASSES
    assert index["settings"] == {"short_side": SHORT, "shard_size": 10**9, "quality": 90, "seed": 0}
    members = read_shards(prepared, "train", index)
    files = (prepared / "train.files.txt").read_text().splitlines()
    readable = sorted(p.relative_to(tree / "train").as_posix() for p in (tree / "train").rglob("*.*")
                      if p.name != "broken.jpg")
    assert sorted(files) == readable and len(readable) == 3 * 5 + 1
    assert index["splits"]["train"]["images"] == len(files)
    names = [m.name for _, m, _ in members]
    assert names == [f"{row:08d}.{ext}" for row in range(len(files)) for ext in ("jpg", "cls")]
    labels = [int(data) for _, m, data in members if m.name.endswith(".cls")]
    assert labels == [CLASSES.index(f.split("/")[0]) for f in files]
    assert {(m.mtime, m.mode) for _, m, _ in members} == {(0, 0o444)}


def test_members_index_fetches_exactly_each_jpeg(prepared):
    index = json.loads((prepared / "index.json").read_text())
    rows = np.load(prepared / "train.members.npy", allow_pickle=False)
    jpegs = [member for member in read_shards(prepared, "train", index) if member[1].name.endswith(".jpg")]
    assert rows.dtype == np.int64 and rows.shape == (len(jpegs), 4)
    shard_names = [s["name"] for s in index["splits"]["train"]["shards"]]
    for (shard, member, data), (number, offset, size, _) in zip(jpegs, rows.tolist()):
        assert shard_names[number] == shard and (offset, size) == (member.offset_data, len(data))
        with open(prepared / shard, "rb") as f:
            f.seek(offset)
            assert f.read(size) == data
    labels = [CLASSES.index(f.split("/")[0]) for f in (prepared / "train.files.txt").read_text().splitlines()]
    assert rows[:, 3].tolist() == labels


def test_pixels_match_the_source_shrunk_and_small_jpegs_are_copied_unchanged(tree, prepared):
    index = json.loads((prepared / "index.json").read_text())
    jpegs = [data for _, m, data in read_shards(prepared, "train", index) if m.name.endswith(".jpg")]
    files = (prepared / "train.files.txt").read_text().splitlines()
    for name, data in zip(files, jpegs):
        source = tree / "train" / name
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and min(img.size) <= SHORT
            written = np.asarray(img.convert("RGB"), dtype=np.float64)
        if source.suffix == ".jpg" and "big" not in name:
            assert data == source.read_bytes(), name  # small enough: no second JPEG generation
            continue
        with Image.open(source) as src:
            expected = src.convert("RGB").resize(target_size(src.size, SHORT), Image.Resampling.BICUBIC)
        assert written.shape[:2] == (expected.height, expected.width), name
        # JPEG at quality 90 and the JPEG decoder's reduced scale: a few levels on these smooth images
        assert np.abs(written - np.asarray(expected, dtype=np.float64)).mean() < 3, name
    shrunk = [len(data) for name, data in zip(files, jpegs) if "big" in name]
    assert len(shrunk) == 3


def test_unreadable_file_is_skipped_counted_and_listed(prepared):
    index = json.loads((prepared / "index.json").read_text())
    assert index["splits"]["train"]["skipped"] == 1 and index["splits"]["val"]["skipped"] == 1
    lines = (prepared / "train.skipped.txt").read_text().splitlines()
    assert len(lines) == 1
    path, reason = lines[0].split("\t")
    assert path == "eel/broken.jpg" and reason
    assert "broken" not in (prepared / "train.files.txt").read_text()


def test_images_are_shuffled_once_so_shards_mix_the_classes(prepared):
    labels = np.load(prepared / "train.members.npy")[:, 3].tolist()
    assert labels != sorted(labels) and sorted(labels) == [0] * 5 + [1] * 6 + [2] * 5


def test_small_shard_size_gives_several_shards_each_within_the_limit(tree, tmp_path):
    limit = 20_000
    index = prepare(tree, tmp_path / "set", short_side=SHORT, shard_size="20KB", workers=0)
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 1
    assert sum(s["images"] for s in shards) == index["splits"]["train"]["images"]
    for s in shards:
        assert s["bytes"] == (tmp_path / "set" / s["name"]).stat().st_size
        assert s["bytes"] <= limit or s["images"] == 1
    rows = np.load(tmp_path / "set" / "train.members.npy")
    assert rows[:, 0].tolist() == sorted(rows[:, 0].tolist())
    assert rows[:, 0].tolist() == [n for n, s in enumerate(shards) for _ in range(s["images"])]
    one_each = prepare(tree, tmp_path / "tiny", short_side=SHORT, shard_size=1, workers=0)
    assert {s["images"] for s in one_each["splits"]["train"]["shards"]} == {1}


def test_same_bytes_with_any_number_of_workers_and_on_every_run(tree, prepared, tmp_path):
    prepare(tree, tmp_path / "two", short_side=SHORT, shard_size="1GB", workers=2)
    prepare(tree, tmp_path / "again", short_side=SHORT, shard_size="1GB", workers=0)
    assert all_files(tmp_path / "two") == all_files(prepared) == all_files(tmp_path / "again")


def test_the_seed_changes_the_order_only(tree, prepared, tmp_path):
    prepare(tree, tmp_path / "s1", short_side=SHORT, seed=1, workers=0)
    ours = (prepared / "train.files.txt").read_text().splitlines()
    theirs = (tmp_path / "s1" / "train.files.txt").read_text().splitlines()
    assert ours != theirs and sorted(ours) == sorted(theirs)


# ---------------------------------------------------------------------- sources


def test_train_and_val_tree_gives_both_splits(prepared):
    index = json.loads((prepared / "index.json").read_text())
    assert list(index["splits"]) == ["train", "val"]
    assert index["splits"]["val"]["images"] == 3 * 2 + 1
    val = (prepared / "val.files.txt").read_text().splitlines()
    assert sorted(val) == ["cat/cat-big.jpg", "cat/cat0.jpg", "dog/dog-big.jpg", "dog/dog-png.png",
                           "dog/dog0.jpg", "eel/eel-big.jpg", "eel/eel0.jpg"]


def test_bare_class_tree_is_the_train_split(tree, tmp_path):
    index = prepare(tree / "val", tmp_path / "set", short_side=SHORT, workers=0)
    assert list(index["splits"]) == ["train"] and index["classes"] == CLASSES
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "index.json", "train-000000.tar", "train.files.txt", "train.members.npy", "train.skipped.txt"]


def test_val_with_other_classes_is_refused(tmp_path):
    make_split(tmp_path / "src" / "train", per_class=1)
    make_split(tmp_path / "src" / "val", per_class=1)
    (tmp_path / "src" / "val" / "cat").rename(tmp_path / "src" / "val" / "cow")
    with pytest.raises(UserError, match="only in train: cat; only in val: cow"):
        prepare(tmp_path / "src", tmp_path / "set", workers=0)
    assert not (tmp_path / "set").exists()


def fake_cifar10(root: Path, per_batch: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A CIFAR-10 release folder of tiny batches (pickled by this Python, which the reader
    accepts as it does the original)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    made = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = np.stack([smooth(32, 32, int(seed)) for seed in rng.integers(0, 100, per_batch)])
        labels = rng.integers(0, 10, per_batch).tolist()
        data = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=4))
        split = "test" if name == "test_batch" else "train"
        made[split][0].append(images)
        made[split][1].extend(labels)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    return {split: (np.concatenate(images), labels) for split, (images, labels) in made.items()}


def test_cifar_train_and_test_become_train_and_val(tmp_path):
    made = fake_cifar10(tmp_path / "data")
    index = prepare("cifar10", tmp_path / "set", workers=0, data_root=tmp_path / "data")
    assert index["classes"] == [f"class{i}" for i in range(10)] and index["source"] == "cifar10"
    for split, source in (("train", "train"), ("val", "test")):
        images, labels = made[source]
        files = (tmp_path / "set" / f"{split}.files.txt").read_text().splitlines()
        assert sorted(files) == sorted(f"cifar10/{source}[{i}]" for i in range(len(labels)))
        rows = np.load(tmp_path / "set" / f"{split}.members.npy")
        shard = (tmp_path / "set" / f"{split}-000000.tar").read_bytes()
        for name, (_, offset, size, label) in zip(files, rows.tolist()):
            i = int(name.split("[")[1].rstrip("]"))
            assert label == labels[i]
            pixels = np.asarray(Image.open(io.BytesIO(shard[offset:offset + size])), dtype=np.float64)
            assert pixels.shape == (32, 32, 3) and np.abs(pixels - images[i]).mean() < 3  # JPEG's loss


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, size", [("1GB", 10**9), ("500MB", 500 * 10**6), ("64KB", 64_000),
                                        ("2000000", 2_000_000), ("1GiB", 2**30), ("512 MiB", 2**29),
                                        ("1.5mb", 1_500_000), ("64KiB", 65_536)])
def test_sizes_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1 GBs", "-1MB", "1e9", "MB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(UserError, match="a shard size is bytes"):
        parse_size(text)


# ---------------------------------------------------------------------- the command line


def test_command_prints_one_summary_line(tree, tmp_path):
    (tmp_path / "set").mkdir()  # an empty directory is a fine destination
    result = runner.invoke(app, ["prepare", str(tree), str(tmp_path / "set"), "--short-side", str(SHORT),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (f"prepared train 16 images in 1 shard, val 7 images in 1 shard; "
                                     f"{_total(tmp_path / 'set')}; 2 unreadable skipped (listed in "
                                     f"train.skipped.txt, val.skipped.txt); in {tmp_path / 'set'}")
    assert "prepare train 17/17 images" in result.stderr  # the progress lines of a non-terminal


def _total(out: Path) -> str:
    return f"{sum(p.stat().st_size for p in out.glob('*.tar')) / 1000:.1f} KB"


def _one_line_error(args: list[str], cwd: Path, expected: str, progress: bool = False) -> None:
    """Exit 2 and one line on stderr (after the progress lines of a run that got that far)."""
    before = sorted(p.name for p in cwd.iterdir())
    result = runner.invoke(app, ["prepare", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert expected in lines[-1] and lines[-1].startswith("error: "), result.stderr
    assert all(line.startswith("prepare ") for line in lines[:-1]) and (progress or len(lines) == 1), lines
    assert sorted(p.name for p in cwd.iterdir()) == before  # no DST, no partial directory


def test_bad_input_exits_2_with_one_line_and_leaves_nothing(tree, tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    dst = str(tmp_path / "set")
    _one_line_error([str(tmp_path / "empty"), dst], tmp_path, "holds no images")
    _one_line_error([str(tmp_path / "nothing"), dst], tmp_path, "is not a directory")
    _one_line_error([str(tree), str(tmp_path / "full")], tmp_path, "is not empty")
    _one_line_error([str(tree), str(tmp_path / "file")], tmp_path, "exists and is not a directory")
    _one_line_error([str(tree), dst, "--shard-size", "lots"], tmp_path, "got 'lots' (--shard-size)")
    _one_line_error([str(tree), dst, "--shard-size", "0"], tmp_path, "more than 0 bytes")
    _one_line_error([str(tree), dst, "--short-side", "8"], tmp_path, "16 pixels, got 8 (--short-side)")
    _one_line_error([str(tree), dst, "--quality", "101"], tmp_path, "1 to 100, got 101 (--quality)")
    assert (tmp_path / "full" / "notes.txt").read_text() == (tmp_path / "file").read_text() == "mine"


def test_a_prepared_set_is_never_overwritten(tree, prepared):
    before = all_files(prepared)
    _one_line_error([str(tree), str(prepared)], prepared.parent, "already holds a prepared set")
    assert all_files(prepared) == before


def test_a_split_with_no_readable_image_fails_and_leaves_nothing(tmp_path):
    (tmp_path / "src" / "cls").mkdir(parents=True)
    (tmp_path / "src" / "cls" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "out").mkdir()
    args = [str(tmp_path / "src"), str(tmp_path / "out" / "set"), "--workers", "0"]
    _one_line_error(args, tmp_path / "out", "no readable image in", progress=True)


def test_a_stale_partial_directory_is_removed_by_the_next_run(tree, prepared, tmp_path):
    dst = tmp_path / "set"
    stale = partial_dir(dst)
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"cut short")
    (stale / "leftover").write_text("from an interrupted run")
    prepare(tree, dst, short_side=SHORT, workers=0)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert all_files(dst) == all_files(prepared)
