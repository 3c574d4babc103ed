"""Reading prepared sets: every image once an epoch with its label, streams shuffled per seed
and epoch, processes and workers on disjoint images, corrupt members skipped, missing shards
refused, and pretraining and probing from them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.data.datasets import FolderDataset, open_dataset
from stoptool.data.loader import RunBatches, SkipReport, pretrain_loader
from stoptool.data.prepare import prepare
from stoptool.data.shards import ShardDataset, buffer_shuffle, files_name, members_name
from stoptool.data.transforms import PretrainTransform
from stoptool.errors import UserError
from stoptool.masks import MaskSampler
from stoptool.probe.run import ProbeConfig, open_splits

runner = CliRunner(env={"COLUMNS": "400"})
HERE = Path(__file__).parent
IMAGES = 48  # 3 classes × 16, as JPEGs of 40 × 30 with smooth content


def _image(seed: int) -> np.ndarray:
    y, x = np.mgrid[0:30, 0:40].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7 + seed) * np.cos(y / 5 + seed / 3)
    return np.clip(np.stack([r, 255 - r, np.full_like(r, 7 * seed % 256)], -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shard-src")
    for split, per_class in (("train", IMAGES // 3), ("val", 4)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_image(100 * c + i + (500 if split == "val" else 0))).save(
                    folder / f"{i}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shard-out") / "set"
    prepare(source, out, short_side=256, shard_size="12KB", workers=0)  # several shards
    return out


def _flat(batches) -> list[int]:
    return [row for keys in batches for _, _, row in keys]


def test_an_epoch_reads_every_image_once_with_its_label_and_pixels(source, prepared):
    data = ShardDataset(prepared, "train")
    assert len(data) == IMAGES and len(data.shards) >= 4 and data.classes == ["class0", "class1", "class2"]
    rows = _flat(data.epoch_batches(8, seed=0, epoch=0))
    assert sorted(rows) == list(range(IMAGES))
    folder = FolderDataset(source / "train")
    by_path = {str(f.relative_to(folder.root)): i for i, f in enumerate(folder.files)}
    sources = (prepared / files_name("train")).read_text().splitlines()
    for row, name in enumerate(sources):
        want = folder.labels[by_path[name]]
        assert data.labels[row] == want
        got = np.asarray(data.load(row), dtype=int)
        ref = np.asarray(folder.load(by_path[name]), dtype=int)
        assert got.shape == ref.shape and np.abs(got - ref).mean() < 1.0  # the same JPEG, copied


def test_shuffling_is_fixed_by_seed_and_epoch_and_resumes_at_any_batch(prepared):
    data = ShardDataset(prepared, "train")
    first = list(data.epoch_batches(8, seed=3, epoch=0))
    assert first == list(data.epoch_batches(8, seed=3, epoch=0))
    assert _flat(first) != _flat(data.epoch_batches(8, seed=3, epoch=1))
    assert _flat(first) != _flat(data.epoch_batches(8, seed=4, epoch=0))
    assert list(data.epoch_batches(8, seed=3, epoch=0, start=4)) == first[4:]  # a resumed epoch
    run = RunBatches(len(data), 8, 3, first=4, last=9, order=data.epoch_batches)
    assert list(run) == first[4:] + list(data.epoch_batches(8, seed=3, epoch=1))[:3]


def test_the_shuffle_buffer_moves_rows_no_further_back_than_its_size():
    import random

    rows = np.arange(1000)
    out = buffer_shuffle(rows, random.Random(0), size=50)
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    # a row leaves the buffer only after it entered: position >= row - 50 for the streamed part
    assert all(pos >= row - 50 for pos, row in enumerate(out[:950]))


def test_two_processes_times_two_workers_read_disjoint_images_covering_the_epoch(prepared, tmp_path):
    """A 2-process gloo launch, each process with a loader of 2 workers; each worker writes
    which rows it opened."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(HERE / "shard_ranks.py"), str(prepared), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = {}
    for f in sorted(tmp_path.glob("rank*-worker*.txt")):
        seen[f.stem] = [int(r) for r in f.read_text().split()]
    assert sorted(seen) == ["rank0-worker0", "rank0-worker1", "rank1-worker0", "rank1-worker1"]
    everything = [r for rows in seen.values() for r in rows]
    assert sorted(everything) == list(range(IMAGES))  # disjoint, and together the whole epoch
    batches = json.loads((tmp_path / "rank0-batches.json").read_text())
    assert [len(b) for b in batches] == [4] * (IMAGES // 8)  # each process half of a batch of 8


def _corrupt_one(prepared: Path, tmp_path: Path) -> tuple[Path, int]:
    copy = tmp_path / "set"
    shutil.copytree(prepared, copy)
    members = np.load(copy / members_name("train"))
    row = 5
    shard, offset, size, _ = members[row]
    path = copy / f"train-{shard:06d}.tar"
    raw = bytearray(path.read_bytes())
    raw[offset:offset + size] = b"\x00" * size  # same size: the index still holds, the JPEG does not
    path.write_bytes(bytes(raw))
    return copy, row


def test_a_corrupt_member_is_skipped_counted_and_named(prepared, tmp_path, tiny_cfg):
    copy, row = _corrupt_one(prepared, tmp_path)
    data = open_dataset(str(copy), "train")
    cfg = tiny_cfg()
    notes = []
    loader = SkipReport(pretrain_loader(data, PretrainTransform(16), MaskSampler(cfg.mask_config()), 8, 0, 0,
                                        IMAGES // 8), notes.append)
    skipped = sum(n for *_, n in loader)
    assert skipped == 1
    assert list(loader.names) == [f"{data.shards[int(data.members[row, 0])]}:{row:08d}.jpg"]
    assert notes and notes[0].startswith("unreadable image skipped: ")


def test_a_missing_or_cut_shard_is_one_clear_error(prepared, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(prepared, copy)
    (copy / "train-000001.tar").unlink()
    with pytest.raises(UserError, match=r"shard '.*train-000001.tar' of the prepared set is missing"):
        ShardDataset(copy, "train")
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--dataset", str(copy), "--arch", "vit_n2", "--img-size", "16",
                                 "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "missing" in result.output and not out.exists()
    shutil.copy(prepared / "train-000001.tar", copy / "train-000001.tar")
    with open(copy / "train-000002.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=r"000002.tar' is 1,000 bytes, not the [\d,]+ it was written with"):
        ShardDataset(copy, "train")


TINY = ["--arch", "vit_n2", "--img-size", "16", "--pred-width", "48", "--pred-depth", "1",
        "--batch-size", "8", "--epochs", "2", "--device", "cpu", "--precision", "fp32", "--workers", "0",
        "--eval-every", "0", "--log-every", "1"]


def test_pretraining_from_shards_resumes_mid_epoch_as_if_never_stopped(prepared, tmp_path):
    from stoptool.io.checkpoint import load_checkpoint

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert runner.invoke(app, ["pretrain", *TINY, "--dataset", str(prepared), "--steps", "5", "--out",
                               str(straight)]).exit_code == 0
    for steps in ("2", "5"):  # 6 steps an epoch: the first launch stops inside epoch 0
        result = runner.invoke(app, ["pretrain", *TINY, "--dataset", str(prepared), "--steps", steps, "--out",
                                     str(stopped)])
        assert result.exit_code == 0, result.output
    a = load_checkpoint(straight / "latest.safetensors").tensors
    b = load_checkpoint(stopped / "latest.safetensors").tensors
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a if k != "meta")


def test_probe_reads_the_prepared_val_split(prepared):
    train, test, tag = open_splits(ProbeConfig(dataset=str(prepared)))
    assert (len(train), len(test), tag) == (IMAGES, 12, "set")
    assert isinstance(test, ShardDataset) and test.split == "val"
    assert list(test.classes) == list(train.classes)
    assert sorted(set(test.labels.tolist())) == [0, 1, 2]


def test_the_online_knn_of_a_run_on_shards_uses_the_prepared_splits(prepared, tiny_cfg):
    from stoptool.train.watch import eval_splits

    train, test, _ = eval_splits(tiny_cfg(dataset=str(prepared)), explicit=False)
    assert (train.split, test.split, len(train), len(test)) == ("train", "val", IMAGES, 12)


def test_a_decode_value_that_is_not_known_or_not_possible_is_refused(prepared, tmp_path):
    out = tmp_path / "run"
    for value, says in (("fast", "decode"), ("gpu", "decode=gpu decodes JPEGs on a CUDA device")):
        result = runner.invoke(app, ["pretrain", *TINY, "--dataset", str(prepared), "--decode", value,
                                     "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and says in result.output
        assert not out.exists()
