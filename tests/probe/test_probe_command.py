"""`stoptool probe` end to end on a tiny ImageFolder: table, JSON, cache, and one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.io.checkpoint import Checkpoint, save_checkpoint
from stoptool.models.jepa import build_jepa
from stoptool.probe import run as probe_run
from stoptool.train.checkpointer import model_tensors
from stoptool.train.pretrain import model_meta

runner = CliRunner(env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ and val/ trees, 3 classes told apart by brightness, 16×16 PNGs."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, level in (("dark", 30), ("mid", 128), ("light", 220)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(level + rng.normal(0, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{c}{i}.png")
    return root


def make_ckpt(path, tiny_cfg, seed=0):
    cfg = tiny_cfg()
    torch.manual_seed(seed)
    model = build_jepa(cfg.model)
    save_checkpoint(path, Checkpoint({"kind": "pretrain", **model_meta(cfg), "step": 0, "epoch": 0},
                                     model_tensors(model)))
    return path


def probe(*args, cache_dir):
    return runner.invoke(app, ["probe", *args, "--cache-dir", str(cache_dir), "--precision", "fp32", "-q"])


def test_probe_prints_a_table_and_writes_json_beside_the_checkpoint(tmp_path, folder, tiny_cfg):
    ckpt = make_ckpt(tmp_path / "run" / "latest.safetensors", tiny_cfg)
    result = probe(str(ckpt), "--dataset", str(folder), "--method", "all", cache_dir=tmp_path / "c")
    assert result.exit_code == 0, result.output
    for text in ("method", "logreg", "linear", "knn", "top-1", "96", "24", "12"):
        assert text in result.stdout
    out = tmp_path / "run" / f"latest.probe-{folder.name}.json"
    doc = json.loads(out.read_text())
    assert doc["arch"] == "vit_n2" and doc["which"] == "target" and doc["classes"] == 3
    rows = {r["method"]: r for r in doc["results"]}
    assert set(rows) == {"logreg", "linear", "knn"}
    assert all(rows[m]["train"] == 24 and rows[m]["test"] == 12 and rows[m]["dim"] == 96 for m in rows)
    assert all(rows[m]["top5"] is None for m in rows)  # 3 classes: no top-5
    # brightness tells the classes apart: the linear probes get them (chance is 1/3)
    assert rows["logreg"]["top1"] >= 0.9 and rows["linear"]["top1"] >= 0.9, rows
    for m, row in rows.items():  # the table prints the JSON's numbers
        line = next(ln for ln in result.stdout.splitlines() if f" {m} " in ln)
        assert f"{100 * row['top1']:.2f}" in line, (m, line)
    # a later probe with other layers adds its rows to the same file
    result = probe(str(ckpt), "--dataset", str(folder), "--layers", "last4", cache_dir=tmp_path / "c")
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {(r["method"], r["layers"], r["dim"]) for r in doc["results"]} >= {
        ("logreg", "last", 96), ("logreg", "last4", 384)}
    # a run directory stands for its latest checkpoint
    result = probe(str(tmp_path / "run"), "--dataset", str(folder), "--fraction", "0.5",
                   cache_dir=tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert any(r["fraction"] == 0.5 for r in json.loads(out.read_text())["results"])
    # another seed is another label subset: its row joins the first, each row saying its seed
    result = probe(str(tmp_path / "run"), "--dataset", str(folder), "--fraction", "0.5", "--seed", "1",
                   cache_dir=tmp_path / "c")
    assert result.exit_code == 0, result.output
    halves = [r for r in json.loads(out.read_text())["results"] if r["fraction"] == 0.5]
    assert sorted(r["seed"] for r in halves) == [0, 1] and all(r["precision"] == "fp32" for r in halves)


def test_cache_is_hit_then_invalidated_by_a_new_checkpoint(tmp_path, folder, tiny_cfg, monkeypatch):
    ckpt = make_ckpt(tmp_path / "a.safetensors", tiny_cfg, seed=0)
    cfg = probe_run.ProbeConfig(ckpt=str(ckpt), dataset=str(folder), cache_dir=str(tmp_path / "c"),
                                precision="fp32", out=str(tmp_path / "r.json"))
    first = probe_run.run_probe(cfg)
    assert first.extracted == ["train", "test"]

    def no_extraction(*a, **k):
        raise AssertionError("features were extracted again")

    real = probe_run.extract_features
    monkeypatch.setattr(probe_run, "extract_features", no_extraction)
    cfg.method = "knn"
    second = probe_run.run_probe(cfg)  # another method: same features, from the cache
    assert second.extracted == []
    cfg.method = "logreg"
    assert probe_run.run_probe(cfg).rows[0]["top1"] == first.rows[0]["top1"]

    make_ckpt(ckpt, tiny_cfg, seed=1)  # same path, other weights
    with pytest.raises(AssertionError, match="extracted again"):
        probe_run.run_probe(cfg)
    monkeypatch.setattr(probe_run, "extract_features", real)
    assert probe_run.run_probe(cfg).extracted == ["train", "test"]


def test_cache_is_invalidated_when_the_images_change(tmp_path, folder, tiny_cfg):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    ckpt = make_ckpt(tmp_path / "a.safetensors", tiny_cfg)
    cfg = probe_run.ProbeConfig(ckpt=str(ckpt), dataset=str(data), cache_dir=str(tmp_path / "c"),
                                precision="fp32", out=str(tmp_path / "r.json"))
    assert probe_run.run_probe(cfg).extracted == ["train", "test"]
    assert probe_run.run_probe(cfg).extracted == []
    image = data / "val" / "dark" / "dark0.png"  # same path, other pixels
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(image)
    assert probe_run.run_probe(cfg).extracted == ["test"]  # the training split is unchanged

def test_cache_key_covers_layers_split_and_image_size(tmp_path, folder, tiny_cfg):
    ckpt = make_ckpt(tmp_path / "a.safetensors", tiny_cfg)
    base = dict(ckpt=str(ckpt), dataset=str(folder), cache_dir=str(tmp_path / "c"), precision="fp32",
                out=str(tmp_path / "r.json"))
    assert probe_run.run_probe(probe_run.ProbeConfig(**base)).extracted == ["train", "test"]
    assert probe_run.run_probe(probe_run.ProbeConfig(**base, layers="last4")).extracted == ["train", "test"]
    assert probe_run.run_probe(probe_run.ProbeConfig(**base, img_size=24)).extracted == ["train", "test"]
    # an untrained checkpoint: the context encoder has the same weights, so the same key
    assert probe_run.run_probe(probe_run.ProbeConfig(**base, which="context")).extracted == []
    assert probe_run.run_probe(probe_run.ProbeConfig(**base, cache=False)).extracted == ["train", "test"]


def test_random_init_and_fraction(tmp_path, folder):
    out = tmp_path / "ri.json"
    result = probe("--random-init", "--arch", "vit_n2", "--img-size", "16", "--dataset", str(folder),
                   "--fraction", "0.5", "--out", str(out), cache_dir=tmp_path / "c")
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["which"] == "random-init" and doc["encoder"] == "random-init"
    assert doc["results"][0]["train"] == 12 and doc["results"][0]["fraction"] == 0.5


def test_train_and_val_dirs_with_subset(tmp_path, folder, tiny_cfg):
    ckpt = make_ckpt(tmp_path / "a.safetensors", tiny_cfg)
    subset = tmp_path / "subset.txt"
    subset.write_text("dark0.png\nmid3.png\nlight1.png\nlight2.png\n")
    out = tmp_path / "r.json"
    result = probe(str(ckpt), "--train-dir", str(folder / "train"), "--val-dir", str(folder / "val"),
                   "--subset", str(subset), "--method", "knn", "--out", str(out), cache_dir=tmp_path / "c")
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["train_images"] == 4 and doc["results"][0]["train"] == 4 and doc["test_images"] == 12


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/ckpt.safetensors"], "checkpoint '/no/such/ckpt.safetensors' does not exist"),
        (["--random-init", "--arch", "vit_n2", "--dataset", "imagenet-x"], "unknown dataset 'imagenet-x'"),
        (["--random-init", "--arch", "vit_n2", "--fraction", "0"],
         "fraction must be in (0, 1], got 0.0 (--fraction)"),
        (["--random-init", "--arch", "vit_n2", "--fraction", "1.5"],
         "fraction must be in (0, 1], got 1.5 (--fraction)"),
        (["--random-init", "--arch", "vit_n2", "--layers", "all"],
         "layers must be one of last, last4, got 'all' (--layers)"),
        (["--random-init", "--arch", "vit_n2", "--method", "svm"],
         "method must be one of logreg, linear, knn, all, got 'svm' (--method)"),
        (["--random-init"], "random_init needs an arch (e.g. vit_t4) (--arch)"),
        (["--random-init", "--arch", "vit_n2", "--init", "xavier"],
         "init must be one of released, timm, got 'xavier' (--init)"),
        ([], "give a checkpoint to probe"),
        (["--random-init", "--arch", "vit_n2", "--img-size", "15"],
         "not a positive multiple of the patch size 2"),
        (["--random-init", "--arch", "vit_n2", "--img-size", "0"],
         "img_size must be positive, got 0 (--img-size)"),
        (["--random-init", "--arch", "vit_n2", "--dataset", "cifar10", "--data-root", "{tmp}"],
         "CIFAR-10 not found: put cifar-10-python.tar.gz"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = probe(*args, "--out", str(tmp_path / "r.json"), cache_dir=tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "cifar10", "--download", "--data-root", "{file}"],
         "data_root '{file}' is not a directory"),
        (["--cache-dir", "{file}"], "feature cache '{file}' is not a directory"),
    ],
)
def test_a_file_where_a_directory_belongs_exits_2_before_extraction(tmp_path, folder, args, message):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = [a.replace("{file}", str(afile)) for a in args]
    if "--dataset" not in args:
        args += ["--dataset", str(folder)]
    args += ["--out", str(tmp_path / "r.json")]
    result = runner.invoke(app, ["probe", "--random-init", "--arch", "vit_n2", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.replace("{file}", str(afile)))
    assert not (tmp_path / "r.json").exists() and afile.read_text() == "x"

def test_a_single_class_data_set_exits_2_before_extraction(tmp_path, folder):
    train, val = tmp_path / "train" / "only", tmp_path / "val" / "only"
    train.mkdir(parents=True)
    val.mkdir(parents=True)
    for i, src in enumerate(sorted((folder / "train" / "dark").iterdir())[:3]):
        (train / f"{i}.png").write_bytes(src.read_bytes())
        (val / f"{i}.png").write_bytes(src.read_bytes())
    result = probe("--random-init", "--arch", "vit_n2", "--dataset", str(tmp_path),
                   "--out", str(tmp_path / "r.json"), cache_dir=tmp_path / "c")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: a probe needs at least 2 classes; the training split has 1"
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "c").exists()


def test_subset_naming_no_image_exits_2(tmp_path, folder):
    subset = tmp_path / "s.txt"
    subset.write_text("no_such_image.JPEG\n")
    result = probe("--random-init", "--arch", "vit_n2", "--dataset", str(folder), "--subset", str(subset),
                   "--out", str(tmp_path / "r.json"), cache_dir=tmp_path / "c")
    assert result.exit_code == 2
    assert "names no image" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_subset_lines_naming_no_image_get_a_note_and_a_count_in_the_results(tmp_path, folder):
    subset = tmp_path / "1percent.txt"
    subset.write_text("dark0.png\nmid3.png\nlight1.png\nlight2.png\nn01440764_10026.JPEG\n")
    out = tmp_path / "r.json"
    result = probe("--random-init", "--arch", "vit_n2", "--dataset", str(folder), "--subset", str(subset),
                   "--method", "knn", "--out", str(out), cache_dir=tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"note: 1 of 5 lines of the subset file '{subset}' name no image under "
                             f"'{folder / 'train'}' and are ignored (first: n01440764_10026.JPEG)\n")
    doc = json.loads(out.read_text())
    assert (doc["train_images"], doc["subset_lines"], doc["subset_unmatched"]) == (4, 5, 1)


def test_knn_features_are_chosen_recorded_and_kept_apart_in_the_json(tmp_path, folder):
    """--knn-features raw is DINO's k-NN on the same cached features; the row says which it is,
    and a raw row joins the default's (whitened) instead of replacing it."""
    from stoptool.probe.knn import knn_probe

    out = tmp_path / "r.json"
    args = ["--random-init", "--arch", "vit_n2", "--dataset", str(folder), "--method", "knn",
            "--out", str(out)]
    assert probe(*args, cache_dir=tmp_path / "c").exit_code == 0
    result = probe(*args, "--knn-features", "raw", cache_dir=tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "knn (raw)" in result.stdout
    rows = {r["params"]["features"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"whitened", "raw"}
    cached = [np.load(f) for f in sorted((tmp_path / "c").rglob("*.npz"), key=lambda f: f.stat().st_mtime)]
    train, test = (c for c in cached if len(c["y"]) == 24), (c for c in cached if len(c["y"]) == 12)
    train, test = next(train), next(test)
    for features, row in rows.items():
        expected = knn_probe(train["x"], train["y"], test["x"], test["y"], 3, features=features)
        assert row["top1"] == expected["top1"], features
    bad = probe(*args, "--knn-features", "zca", cache_dir=tmp_path / "c")
    assert bad.exit_code == 2
    assert bad.stderr.strip().endswith(
        "knn_features must be one of whitened, raw, got 'zca' (--knn-features)")


def test_a_folder_without_train_and_val_is_explained(tmp_path, folder):
    result = probe("--random-init", "--arch", "vit_n2", "--dataset", str(folder / "train"),
                   "--out", str(tmp_path / "r.json"), cache_dir=tmp_path / "c")
    assert result.exit_code == 2 and "needs train/ and val/" in result.stderr


def test_init_is_for_random_init_only(tmp_path, tiny_cfg):
    ckpt = make_ckpt(tmp_path / "c.safetensors", tiny_cfg)
    result = probe(str(ckpt), "--init", "timm", "--out", str(tmp_path / "r.json"), cache_dir=tmp_path / "c")
    assert result.exit_code == 2
    assert "arch and init are for random_init; a checkpoint holds its own weights (--arch)" in result.stderr


@pytest.mark.parametrize("init", ["released", "timm"])
def test_random_init_baseline_is_drawn_like_pretrain(init, tiny_cfg):
    torch.manual_seed(0)
    built = build_jepa(tiny_cfg(init=init).model).target_encoder
    cfg = probe_run.ProbeConfig(random_init=True, arch="vit_n2", img_size=16, init=init)
    enc = probe_run.load_encoder(cfg)
    for (name, a), (_, b) in zip(built.state_dict().items(), enc.net.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_probe_at_image_size_0_is_refused(tmp_path, tiny_cfg):
    ckpt = make_ckpt(tmp_path / "c.safetensors", tiny_cfg)
    result = probe(str(ckpt), "--img-size", "0", "--out", str(tmp_path / "r.json"), cache_dir=tmp_path / "c")
    assert result.exit_code == 2
    assert "img_size must be positive, got 0 (--img-size)" in result.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("arch", ["vit_n2", "vit_t4", "vit_t8"])
def test_random_init_baseline_uses_pretrains_default_image_size(arch):
    from stoptool.config import ModelConfig

    enc = probe_run.load_encoder(probe_run.ProbeConfig(random_init=True, arch=arch))
    expected = {"vit_n2": 16, "vit_t4": 32, "vit_t8": 224}[arch]
    assert enc.img_size == ModelConfig(arch=arch).img_size == expected


def test_a_checkpoint_is_probed_on_its_own_data_where_that_has_labels(tmp_path, folder, tiny_cfg):
    """Without --dataset: the run's own labelled set (an ImageFolder tree's val/, digits), said
    in the first line; digits, with the reason, where the run's set has no val split."""
    no_val = tmp_path / "no-val"
    (no_val / "a").mkdir(parents=True)
    for trained_on, probed, test_images in ((str(folder), folder.name, 12), ("digits", "digits", 450),
                                            (str(no_val), "digits", 450)):
        cfg = tiny_cfg(dataset=trained_on)
        ckpt = tmp_path / probed / f"{len(trained_on)}.safetensors"
        torch.manual_seed(0)  # one encoder: the second digits probe reads the first's cached features
        model = build_jepa(cfg.model)
        meta = {"kind": "pretrain", **model_meta(cfg), "config": cfg.to_dict(), "step": 0, "epoch": 0}
        save_checkpoint(ckpt, Checkpoint(meta, model_tensors(model)))
        # (at 8 px, a quarter of the encoder's work at 16: which data is read is what is tested)
        result = probe(str(ckpt), "--method", "knn", "--img-size", "8", cache_dir=tmp_path / "c")
        assert result.exit_code == 0, result.output
        first = result.stderr.splitlines()[0]
        if trained_on == str(no_val):
            assert first == (f"note: probing on the bundled digits: the data set the encoder was trained on, "
                             f"'{no_val}', has no labelled val split")
        else:
            assert first == (f"note: probing on {trained_on}, the data set the encoder was trained on "
                             "(its labelled splits)")
        assert f"on {probed}" in result.stdout  # the table's title
        doc = json.loads(ckpt.with_name(f"{ckpt.stem}.probe-{probed}.json").read_text())
        assert (doc["dataset"], doc["test_images"]) == (probed, test_images)
