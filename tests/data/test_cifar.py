"""The CIFAR reader: the exact python-version release layout, written here byte for byte as
Python 2's cPickle wrote it, and a data file that tries to run code."""

import io
import os
import pickle
import re
import struct
import tarfile

import numpy as np
import pytest

from stoptool.data import cifar
from stoptool.data.datasets import open_dataset
from stoptool.errors import UserError


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: str/bytes as BINSTRING, numpy under numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_string
    dispatch[str] = _save_py2_string

    def save_global(self, obj, name=None):
        module = {"_reconstruct": "numpy.core.multiarray"}.get(obj.__name__, obj.__module__)
        self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
        self.memoize(obj)


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _batch(rng, n, label_key, classes, name):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, n).tolist()
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
    batch = {b"batch_label": name.encode(), label_key.encode(): labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [y // 5 for y in labels]
    return py2_dumps(batch), images, labels


def write_release(root, name, fmt="archive", n=4, seed=0):
    """Write a miniature release of `name` under root; return the expected arrays."""
    rng = np.random.default_rng(seed)
    rel = cifar.RELEASES[name]
    classes = 10 if name == "cifar10" else 100
    files, expected = {}, {"train": ([], []), "test": ([], [])}
    for split, names in (("train", rel.train_files), ("test", rel.test_files)):
        for f in names:
            raw, images, labels = _batch(rng, n, rel.label_key, classes, f)
            files[f] = raw
            expected[split][0].append(images)
            expected[split][1].extend(labels)
    names_key = rel.names_key
    meta = {names_key.encode(): [f"class{i}".encode() for i in range(classes)]}
    if name == "cifar10":
        meta.update({b"num_cases_per_batch": n, b"num_vis": 3072})
    else:
        meta[b"coarse_label_names"] = [f"super{i}".encode() for i in range(20)]
    files[rel.meta_file] = py2_dumps(meta)
    if fmt == "folder":
        (root / rel.folder).mkdir(parents=True)
        for f, raw in files.items():
            (root / rel.folder / f).write_bytes(raw)
    else:
        with tarfile.open(root / rel.archive, "w:gz") as tar:
            for f, raw in [("readme.html", b"<html></html>")] + list(files.items()):
                info = tarfile.TarInfo(f"{rel.folder}/{f}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in expected.items()}


def test_release_pickle_names_only_the_three_numpy_globals():
    raw = py2_dumps({b"data": np.zeros((2, 3072), np.uint8)})
    import pickletools

    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


@pytest.mark.parametrize("fmt", ["archive", "folder"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reads_the_release_layout(tmp_path, name, fmt):
    expected = write_release(tmp_path, name, fmt)
    for split in ("train", "test"):
        ds = cifar.load_cifar(name, split, tmp_path)
        images, labels = expected[split]
        assert ds.images.shape == (len(labels), 32, 32, 3) and ds.images.dtype == np.uint8
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert len(ds.classes) == (10 if name == "cifar10" else 100)
        assert ds.classes[3] == "class3"
        # a pixel read back as a PIL image keeps its channels in RGB order
        assert np.asarray(ds.load(0))[5, 7].tolist() == images[0, 5, 7].tolist()
    n_train = 5 * 4 if name == "cifar10" else 4
    assert len(cifar.load_cifar(name, "train", tmp_path)) == n_train


def test_cifar100_uses_fine_labels(tmp_path):
    expected = write_release(tmp_path, "cifar100", n=40)
    ds = open_dataset("cifar100", "train", root=tmp_path)
    np.testing.assert_array_equal(ds.labels, expected["train"][1])
    assert ds.labels.max() > 19  # fine (100 classes), not coarse (20)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("fmt", ["archive", "folder"])
def test_a_data_file_that_references_a_callable_is_rejected(tmp_path, fmt):
    write_release(tmp_path, "cifar10", fmt)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=4)
    rel = cifar.RELEASES["cifar10"]
    if fmt == "folder":
        (tmp_path / rel.folder / "data_batch_3").write_bytes(evil)
    else:
        archive = tmp_path / rel.archive
        with tarfile.open(archive) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(archive, "w:gz") as tar:
            for m, raw in members:
                raw = evil if m.name.endswith("data_batch_3") else raw
                m.size = len(raw)
                tar.addfile(m, io.BytesIO(raw))
    with pytest.raises(UserError, match=r"refusing to read CIFAR-10 file 'data_batch_3': .*posix.mkdir"):
        cifar.load_cifar("cifar10", "train", tmp_path)
    assert not marker.exists()
    cifar.load_cifar("cifar10", "test", tmp_path)  # the other files are still fine


def test_safe_load_refuses_other_globals_and_object_arrays():
    with pytest.raises(UserError, match="eval, which a CIFAR file never does"):
        cifar.safe_load(pickle.dumps({"x": eval}, protocol=2), "file")
    with pytest.raises(UserError, match="object array"):
        cifar.safe_load(pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=4), "file")
    with pytest.raises(UserError, match="not a CIFAR"):
        cifar.safe_load(b"garbage", "file")


def test_missing_files_say_what_to_put_where(tmp_path):
    with pytest.raises(UserError) as err:
        cifar.load_cifar("cifar10", "train", tmp_path)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg and "or turn on download" in msg
    assert "\n" not in msg


def test_download_without_network_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"cannot download cifar-100-python.tar.gz .*by hand"):
        cifar.load_cifar("cifar100", "train", tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []  # no half-written archive left behind


def test_pretrain_reads_cifar_from_data_root(tmp_path, tiny_cfg):
    from stoptool.io.checkpoint import load_checkpoint
    from stoptool.train.pretrain import pretrain

    write_release(tmp_path, "cifar10", n=4)  # 5 training batches of 4 images
    cfg = tiny_cfg(dataset="cifar10", data_root=str(tmp_path), steps=1, out=str(tmp_path / "run"))
    result = pretrain(cfg)
    assert result.step == 1
    assert load_checkpoint(result.checkpoint).meta["data"]["name"] == "cifar10/train"


def test_download_into_a_data_root_that_is_a_file_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match=re.escape(f"data_root '{afile}' is not a directory")):
        cifar.load_cifar("cifar10", "train", afile, download=True)
