"""`stoptool evaluate` end to end on the transfer sets' releases: the paper's layout, the four
heads, resuming from the cache and the results, skipped tasks, timm baselines, table1."""

import json
import os

import pytest
from PIL import Image
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.evaluate import run as evaluate_run
from stoptool.io import timm_source

runner = CliRunner(env={"COLUMNS": "400"})
TABLE4 = ["CIFAR100", "Places205", "iNat18", "CLEVR/Count", "CLEVR/Dist"]
FAST = ["--epochs", "3", "--precision", "fp32", "--device", "cpu", "--workers", "0", "-q"]


def evaluate(*args, cache):
    return runner.invoke(app, ["evaluate", *args, "--cache-dir", str(cache), *FAST])


def test_table4_writes_the_papers_layout_with_every_head_and_resumes_without_extracting(
        tmp_path, data_root, tiny_ckpt, monkeypatch):
    cache = tmp_path / "cache"
    result = evaluate(str(tiny_ckpt), "--suite", "table4", "--data-root", str(data_root), "--views", "2",
                      "--out", str(tmp_path / "a"), cache=cache)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "model" in line and "arch" in line)
    assert all(c in header for c in TABLE4)
    for row in ("paper: MAE", "paper: I-JEPA", "paper: StoP", "run/latest.safetensors"):
        assert row in result.stdout
    # one extraction per split and view serves every head: 5 tasks × (test + 2 training views)
    assert "extracted 15 feature pieces" in result.stdout

    doc = json.loads((tmp_path / "a" / "table4.json").read_text())
    assert doc["columns"] == TABLE4 and not doc["skipped"]
    results = doc["models"][0]["results"]
    for column in TABLE4:
        r = results[column]
        heads = {(h["layers"], h["head"]): h for h in r["heads"]}
        assert set(heads) == {(lay, kind) for lay in ("last", "last4") for kind in ("linear", "bn_linear")}
        assert heads[("last", "linear")]["dim"] == 192 and heads[("last4", "bn_linear")]["dim"] == 768
        top = max(r["heads"], key=lambda h: h["top1"])
        assert r["top1"] == top["top1"] and r["best"] == {"layers": top["layers"], "head": top["head"]}
        assert r["protocol"] == "paper" and r["views"] == 2 and r["recipe"]["epochs"] == 3
    assert results["iNat18"]["classes"] == 3 and results["CLEVR/Dist"]["classes"] == 6
    assert results["CIFAR100"]["test"] == 10 and results["CLEVR/Count"]["train"] == 16

    md = (tmp_path / "a" / "table4.md").read_text().splitlines()
    assert "| model | arch | CIFAR100 | Places205 | iNat18 | CLEVR/Count | CLEVR/Dist |" in md
    assert sum(line.startswith("| *paper:") for line in md) == 7
    measured = next(line for line in md if line.startswith("| **run/latest.safetensors**"))
    assert measured.split(" | ")[2:] == [f"{100 * results[c]['top1']:.1f}" for c in TABLE4[:-1]] + [
        f"{100 * results['CLEVR/Dist']['top1']:.1f} |"]
    with Image.open(tmp_path / "a" / "table4.png") as png:
        assert png.format == "PNG" and png.size[0] > 600

    # elsewhere, with the same cache: not one image is extracted again, and the heads train to the
    # same numbers
    def no_extraction(*a, **k):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(evaluate_run, "extract_features", no_extraction)
    again = evaluate(str(tiny_ckpt), "--suite", "table4", "--data-root", str(data_root), "--views", "2",
                     "--out", str(tmp_path / "b"), cache=cache)
    assert again.exit_code == 0, again.output
    assert "features from cache" in again.stdout
    redo = json.loads((tmp_path / "b" / "table4.json").read_text())["models"][0]["results"]
    assert all(redo[c]["heads"] == results[c]["heads"] for c in TABLE4)
    # in the same directory, the finished results themselves are kept
    third = evaluate(str(tiny_ckpt), "--suite", "table4", "--data-root", str(data_root), "--views", "2",
                     "--out", str(tmp_path / "a"), cache=cache)
    assert third.exit_code == 0 and "5 task results from the earlier run" in third.stdout


def test_a_task_whose_data_is_absent_is_skipped_and_said_so(tmp_path, data_root, tiny_ckpt):
    root = tmp_path / "only-places"
    root.mkdir()
    (root / "places205").symlink_to(data_root / "places205")
    result = evaluate(str(tiny_ckpt), "--data-root", str(root), "--views", "0", "--out", str(tmp_path / "o"),
                      cache=tmp_path / "cache")
    assert result.exit_code == 0, result.output
    for column in ("CIFAR100", "iNat18", "CLEVR/Count", "CLEVR/Dist"):
        assert f"skipped {column}: no {root}" in result.stderr
    doc = json.loads((tmp_path / "o" / "table4.json").read_text())
    assert list(doc["models"][0]["results"]) == ["Places205"] and len(doc["skipped"]) == 4
    row = next(r for r in doc["table"] if not r["paper"])
    assert row["values"]["CIFAR100"] is None and row["values"]["Places205"] is not None
    # nothing to evaluate at all: one line, exit 2, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    result = evaluate(str(tiny_ckpt), "--data-root", str(empty), "--out", str(tmp_path / "e"),
                      cache=tmp_path / "c")
    assert result.exit_code == 2 and "no data of the suite 'table4'" in result.stderr
    assert not (tmp_path / "e").exists()


def _one_task_suite(tmp_path):
    suite = tmp_path / "count.yaml"
    suite.write_text("title: CLEVR/Count only\n"
                     "tasks:\n  - {column: CLEVR/Count, dataset: clevr-count:CLEVR_v1.0}\n"
                     "paper:\n  - {method: MAE, arch: vit_l16, CLEVR/Count: 92.1}\n")
    return suite


def test_a_timm_baseline_is_probed_end_to_end(tmp_path, data_root):
    env = {"COLUMNS": "400", timm_source.RANDOM_WEIGHTS_ENV: "1"}
    result = CliRunner(env=env).invoke(app, [
        "evaluate", "timm:test_vit", "--img-size", "32", "--suite", str(_one_task_suite(tmp_path)),
        "--data-root", str(data_root), "--views", "1", "--out", str(tmp_path / "o"),
        "--cache-dir", str(tmp_path / "c"), *FAST])
    assert result.exit_code == 0, result.output
    assert "timm:test_vit (random weights) was built without its pretrained weights" in result.stderr
    model = json.loads((tmp_path / "o" / "count.json").read_text())["models"][0]
    assert model["source"] == "timm:test_vit (random weights)" and model["img_size"] == 32
    assert model["meta"]["timm_model"] == "test_vit" and model["meta"]["pretrained"] is False
    heads = {(h["layers"], h["head"]): h["dim"] for h in model["results"]["CLEVR/Count"]["heads"]}
    assert heads[("last", "linear")] == 64 and heads[("last4", "bn_linear")] == 256  # test_vit is 64 wide
    assert "paper: MAE" in result.stdout


def test_a_timm_model_without_cached_weights_or_network_is_one_line_before_any_work(
        tmp_path, data_root, tiny_ckpt, monkeypatch):
    monkeypatch.delenv(timm_source.RANDOM_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(timm_source, "_cached_file", lambda cfg: None)
    monkeypatch.setattr(timm_source, "_reachable", lambda host: False)
    monkeypatch.setattr(evaluate_run, "extract_features", lambda *a, **k: pytest.fail("extracted"))
    suite = str(_one_task_suite(tmp_path))
    # the checkpoint before it is not evaluated either: every source is checked first
    result = evaluate(str(tiny_ckpt), "timm:test_vit", "--suite", suite, "--data-root", str(data_root),
                      "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "timm:test_vit: its weights are not in the local caches" in lines[0]
    assert "huggingface.co cannot be reached" in lines[0]
    assert not (tmp_path / "o").exists()
    result = evaluate("timm:no_such_model", "--suite", suite, "--data-root", str(data_root),
                      cache=tmp_path / "c")
    assert result.exit_code == 2 and "'timm:no_such_model' names no timm model" in result.stderr


def test_table1_runs_the_imagenet_columns_with_the_1_percent_subset(tmp_path, image_folder, tiny_ckpt):
    imagenet = tmp_path / "data" / "imagenet"
    imagenet.mkdir(parents=True)
    for split in ("train", "val"):
        (imagenet / split).symlink_to(image_folder)
    (imagenet / "1percent.txt").write_text("".join(f"{c}{i}.png\n" for c in "ab" for i in range(4)))
    result = evaluate(str(tiny_ckpt), "--suite", "table1", "--data-root", str(tmp_path / "data"),
                      "--views", "1", "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "o" / "table1.json").read_text())["models"][0]["results"]
    one = results["1 %, last layer"]
    assert one["protocol"] == "logreg" and one["train"] == 8
    assert [h["layers"] for h in one["heads"]] == ["last"]
    assert {(h["layers"], h["head"]) for h in results["100 %, last 4 layers"]["heads"]} == {
        ("last4", "linear"), ("last4", "bn_linear")}
    assert results["100 %, last layer"]["train"] == 24 and results["100 %, last layer"]["skipped_images"] == 2
    assert "unreadable images skipped" in result.stderr


@pytest.mark.parametrize("text, says", [
    ("tasks: []\n", "names no tasks"),
    ("tasks:\n  - {column: A, dataset: cifar100, views: -1}\n", "views must be an integer >= 0"),
    ("tasks:\n  - {column: A, dataset: cifar100, colour: red}\n", "unknown key 'colour'"),
    ("tasks:\n  - {column: A, dataset: cifar100}\npaper:\n  - {method: X, arch: vit_b16, B: 1}\n",
     "column 'B'"),
])
def test_a_malformed_suite_is_one_line(tmp_path, data_root, text, says):
    suite = tmp_path / "s.yaml"
    suite.write_text(text)
    result = evaluate("timm:test_vit", "--suite", str(suite), "--data-root", str(data_root),
                      cache=tmp_path / "c")
    assert result.exit_code == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs")


def test_a_run_stopped_during_extraction_resumes_from_its_last_whole_piece(tmp_path, data_root, tiny_ckpt,
                                                                             monkeypatch):
    args = [str(tiny_ckpt), "--suite", str(_one_task_suite(tmp_path)), "--data-root", str(data_root),
            "--views", "1", "--chunk", "5", "--out", str(tmp_path / "o")]
    real, calls = evaluate_run.extract_features, []

    def stopped_in_the_third_piece(*a, **k):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate_run, "extract_features", stopped_in_the_third_piece)
    assert evaluate(*args, cache=tmp_path / "c").exit_code != 0
    assert not (tmp_path / "o" / "count.json").exists()
    monkeypatch.setattr(evaluate_run, "extract_features", real)
    # the 8 test images are 2 pieces of 5 (both kept); the 16 training images 4 pieces, none kept
    result = evaluate(*args, cache=tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "extracted 4 feature pieces" in result.stdout
    doc = (tmp_path / "o" / "count.json").read_text()
    assert '"train": 16' in doc and '"test": 8' in doc
