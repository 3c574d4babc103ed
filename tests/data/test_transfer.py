"""The transfer sets read in their release layouts: the labels their definitions give, one line
and exit 2 for a malformed file of each kind, the probe's protocols and `prepare` on each."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.data.datasets import open_dataset
from stoptool.data.prepare import prepare

_spec = importlib.util.spec_from_file_location("releases",
                                               Path(__file__).parents[1] / "evaluate" / "releases.py")
releases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(releases)

runner = CliRunner(env={"COLUMNS": "400"})
RANDOM_PROBE = ["probe", "--random-init", "--arch", "vit_t4", "--img-size", "16", "--precision", "fp32", "-q"]

# Depths of the nearest object and the CLEVR/Dist class each must get, written out from VTAB's
# rule: the class is the largest k with thrs[k] < depth, thrs = [0, 8, 8.5, 9, 9.5, 10, 100]
# (task_adaptation/data/clevr.py); a depth equal to a threshold stays in the class below it.
DEPTHS = [(7.2, 0), (8.0, 0), (8.0001, 1), (8.5, 1), (8.7, 2), (9.0, 2), (9.2, 3), (9.5, 3),
          (9.75, 4), (10.0, 4), (10.01, 5), (13.0, 5)]
# Objects in a scene and the CLEVR/Count class: VTAB's count - 3, for 3..10 objects
COUNTS = [(3, 0), (5, 2), (7, 4), (10, 7)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second torch thread only spins, and crawls when other work holds the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clevr(tmp_path_factory):
    root = tmp_path_factory.mktemp("clevr")
    counts = [c for c, _ in COUNTS]
    train = [(counts[i % len(counts)], d) for i, (d, _) in enumerate(DEPTHS)]
    val = [(n, 9.1) for n, _ in COUNTS]
    releases.write_clevr(root, {"train": train, "val": val})
    return root


def test_clevr_labels_follow_vtab_at_and_between_the_thresholds(clevr):
    dist = open_dataset(f"clevr-dist:{clevr / 'CLEVR_v1.0'}", "train")
    assert dist.labels.tolist() == [label for _, label in DEPTHS]
    assert len(dist.classes) == 6
    count = open_dataset(f"clevr-count:{clevr}", "train")  # the folder above CLEVR_v1.0 works too
    by_count = dict(COUNTS)
    assert count.labels.tolist() == [by_count[COUNTS[i % len(COUNTS)][0]] for i in range(len(DEPTHS))]
    assert len(count.classes) == 8
    # a scene with 5 objects is count class 2; its image is the file the scene names
    i = next(i for i in range(len(DEPTHS)) if COUNTS[i % len(COUNTS)][0] == 5)
    assert count.labels[i] == 2 and count.item_name(i).endswith(f"images/train/CLEVR_train_{i:06d}.png")
    assert count.load(i).mode == "RGB" and count.load(i).size == (24, 16)  # RGBA as released, read as RGB


def test_clevr_test_split_is_val_and_is_squashed_not_cropped(clevr):
    val = open_dataset(f"clevr-count:{clevr}", "test")
    assert val.name == "clevr-count/val" and val.labels.tolist() == [0, 2, 4, 7]
    assert open_dataset(f"clevr-dist:{clevr}", "val").labels.tolist() == [3] * 4  # 9.1: (9.0, 9.5]
    assert val.eval_resize == "squash"


def test_inat18_labels_are_category_ids_in_increasing_order(tmp_path):
    releases.write_inat(tmp_path, [7, 3, 11], {"train": 2, "val": 1})
    train = open_dataset(f"inat18:{tmp_path}", "train")
    # written in category order 7, 3, 11: classes sorted by id are 3 -> 0, 7 -> 1, 11 -> 2
    assert train.labels.tolist() == [1, 1, 0, 0, 2, 2]
    assert train.classes == ["species3", "species7", "species11"]
    doc = json.loads((tmp_path / "train2018.json").read_text())
    assert [str(f) for f in train.files] == [str(tmp_path / im["file_name"]) for im in doc["images"]]
    val = open_dataset(f"inat18:{tmp_path}", "val")
    assert val.labels.tolist() == [1, 0, 2] and val.classes == train.classes


@pytest.mark.parametrize("images", ["data/vision/torralba/deeplearning/images256", "images256"])
def test_places205_reads_the_split_lists(tmp_path, images):
    releases.write_places(tmp_path, {"train": 2, "val": 1}, images=images)
    train = open_dataset(f"places205:{tmp_path}", "train")
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.classes == ["abbey", "apartment_building/outdoor", "bamboo_forest"]
    assert train.item_name(2) == str(tmp_path / images / "a/apartment_building/outdoor/00000003.jpg")
    assert open_dataset(f"places205:{tmp_path}", "val").labels.tolist() == [0, 1, 2]


def test_places205_as_class_folders(tmp_path, image_folder):
    (tmp_path / "train").symlink_to(image_folder)
    (tmp_path / "val").symlink_to(image_folder)
    data = open_dataset(f"places205:{tmp_path}", "val")
    assert list(data.classes) == ["a", "b"] and len(data) == 25


def _break(kind: str, root: Path) -> str:
    """Write a set of `kind` with one defect; return the file the message must name."""
    if kind.startswith("clevr"):
        base = releases.write_clevr(root, {"train": [(3, 8.0)] * 2, "val": [(3, 8.0)] * 2})
        scenes = base / "scenes" / "CLEVR_train_scenes.json"
        if kind == "clevr-missing":
            scenes.unlink()
        elif kind == "clevr-json":
            scenes.write_text('{"scenes": [')
        elif kind == "clevr-keys":
            scenes.write_text(json.dumps({"scenes": [{"image_filename": "CLEVR_train_000000.png"}]}))
        else:  # a scene naming an image that is not there
            (base / "images" / "train" / "CLEVR_train_000001.png").unlink()
        return str(scenes)
    if kind.startswith("inat"):
        releases.write_inat(root, [0, 1], {"train": 1, "val": 1})
        path = root / "train2018.json"
        doc = json.loads(path.read_text())
        if kind == "inat-keys":
            del doc["annotations"]
        else:  # an image without its annotation
            doc["annotations"] = doc["annotations"][:1]
        path.write_text(json.dumps(doc))
        return str(path)
    releases.write_places(root, {"train": 1, "val": 1})
    path = root / "trainvalsplit_places205" / "train_places205.csv"
    if kind == "places-line":
        path.write_text(path.read_text() + "b/bamboo_forest/00000009.jpg two\n")
    else:
        path.write_text(path.read_text() + "b/bamboo_forest/00000099.jpg 2\n")
    return str(path)


BROKEN = {"clevr-missing": "clevr-count", "clevr-json": "clevr-dist", "clevr-keys": "clevr-count",
          "clevr-absent": "clevr-dist", "inat-keys": "inat18", "inat-annotation": "inat18",
          "places-line": "places205", "places-absent": "places205"}


@pytest.mark.parametrize("defect", sorted(BROKEN))
def test_a_malformed_release_is_one_line_naming_the_file_and_exit_2(tmp_path, defect):
    named = _break(defect, tmp_path / "data")
    root = tmp_path / "data" / ("CLEVR_v1.0" if defect.startswith("clevr") else "")
    result = runner.invoke(app, [*RANDOM_PROBE, "--dataset", f"{BROKEN[defect]}:{root}",
                                 "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not (tmp_path / "p.json").exists()


def test_the_probes_fast_protocols_run_on_every_transfer_set(tmp_path):
    root = releases.write_all(tmp_path / "data")
    names = {"clevr-count": root / "CLEVR_v1.0", "clevr-dist": root, "inat18": root / "inat2018",
             "places205": root / "places205"}
    for kind, path in names.items():
        out = tmp_path / f"{kind}.json"
        # every method on one set; the methods see only features, so k-NN stands for them on the others
        method = "all" if kind == "inat18" else "knn"
        result = runner.invoke(app, [*RANDOM_PROBE, "--dataset", f"{kind}:{path}", "--method", method,
                                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        doc = json.loads(out.read_text())
        methods = {"logreg", "linear", "knn"} if method == "all" else {"knn"}
        assert doc["dataset"] == kind and {r["method"] for r in doc["results"]} == methods
        test = open_dataset(f"{kind}:{path}", "val")
        assert doc["test_images"] == len(test) and doc["classes"] == len(test.classes)


def test_prepare_writes_a_transfer_set_as_shards_with_its_labels(tmp_path):
    root = releases.write_clevr(tmp_path, {"train": [(3 + i, 8.0 + 0.5 * i) for i in range(5)],
                                           "val": [(4, 9.9), (9, 7.0)]})
    index = prepare(f"clevr-dist:{root}", tmp_path / "shards", workers=0, short_side=16)
    assert {s: v["images"] for s, v in index["splits"].items()} == {"train": 5, "val": 2}
    assert index["classes"][0] == "<=8.0" and index["source"].startswith("clevr-dist:")
    source = open_dataset(f"clevr-dist:{root}", "train")
    shards = open_dataset(str(tmp_path / "shards"), "train")
    names = (tmp_path / "shards" / "train.files.txt").read_text().split()
    expected = {Path(f).name: int(y) for f, y in zip(source.files, source.labels)}
    assert [int(y) for y in shards.labels] == [expected[Path(n).name] for n in names]
    assert np.array_equal(np.sort(shards.labels), np.sort(source.labels))
