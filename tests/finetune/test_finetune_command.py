"""`stoptool finetune` end to end on digits, and what reads its run: `info`, `probe`, `export`.

The encoder here is a tiny ViT, untrained: 2 blocks, 64 wide, 2 heads, one 8-px patch per
8-px digit (`vit_t8` with the size letter's shape shrunk for this module). The demo encoder's
figures are in docs/reproducing.md; this module shows that the loop learns and that every
command reads what it writes.
"""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.data.datasets import digits
from stoptool.finetune.model import add_head_norm, build_classifier, classifier_state
from stoptool.io.checkpoint import load_checkpoint, read_meta
from stoptool.models import archs

TINY = archs.ArchSpec(64, 2, 2)
RUN = ["--random-init", "--arch", "vit_t8", "--img-size", "8", "--precision", "fp32", "--device", "cpu", "-q"]
# the CPU default with a higher lr and no layer decay: this encoder starts from random weights
RECIPE = ["--epochs", "5", "--blr", "1e-2", "--layer-decay", "1", "--warmup", "0.5", "--crop-scale", "0.8,1",
          "--eval-every", "2", "--log", "jsonl,csv"]


@pytest.fixture(scope="module", autouse=True)
def tiny_encoder():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(archs.ARCHS, "t", TINY)
        yield


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    run = tmp_path_factory.mktemp("finetune") / "run"
    result = CliRunner().invoke(app, ["finetune", *RUN, *RECIPE, "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run, result


def classifier_of(run):
    """The fine-tuned classifier as stoptool trained it, from the run's checkpoint: the encoder,
    the standardisation of its averaged tokens, the head."""
    ckpt = load_checkpoint(run / "latest.safetensors")
    meta = ckpt.meta
    assert meta["head_norm"] == "standardize" and ckpt.part("head_norm")["std"].shape == (64,)
    model = build_classifier(meta["arch"], meta["img_size"], None, meta["num_classes"])
    add_head_norm(model)
    model.load_state_dict(classifier_state(ckpt.part))
    return model.eval()


def eval_batch(n: int = 450):
    """The digits test split as the evaluation transform makes it: 8 px, resized bicubic
    (unchanged at this size), ImageNet mean and std."""
    data = digits("test")
    transform = timm.data.create_transform(8, interpolation="bicubic", crop_pct=1.0)
    x = torch.stack([transform(data.load(i)) for i in range(n)])
    return x, data.labels[:n]


def test_the_loop_learns_digits(finetuned):
    run, result = finetuned
    got = json.loads((run / "finetune.json").read_text())
    assert got["top1"] >= 0.90, got  # chance: 10 %
    assert got["step"] == 5 * (1347 // 64) and got["train_images"] == 1347 and got["val_images"] == 450
    # top-1 and top-5 as defined: the true class is the highest logit / among the five highest
    x, y = eval_batch()
    with torch.no_grad():
        logits = classifier_of(run)(x).numpy()
    order = np.argsort(-logits, axis=1)
    assert got["top1"] == pytest.approx(np.mean(order[:, 0] == y), abs=1e-12)
    assert got["top5"] == pytest.approx(np.mean((order[:, :5] == y[:, None]).any(1)), abs=1e-12)
    assert f"{100 * got['top1']:.2f} %" in result.output
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["epoch"] for r in rows if "val_top1" in r]
    assert evaluated == [2.0, 4.0, 5.0]  # every 2 epochs, and after the last step
    assert rows[-1]["val_top1"] == got["top1"]
    assert (run / "metrics.csv").read_text().startswith("step,epoch,loss,lr")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == got["step"] and summary["val_top1"] == got["top1"]
    assert {p.name for p in run.glob("*.safetensors")} == {"latest.safetensors"}


def test_a_finished_run_is_evaluated_again_not_trained(finetuned):
    run, _ = finetuned
    before = (run / "latest.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["finetune", *RUN, *RECIPE, "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "already complete at step 105" in result.output
    assert (run / "latest.safetensors").stat().st_mtime_ns == before
    assert json.loads((run / "finetune.json").read_text())["step"] == 105


def test_timm_gives_the_fine_tuned_classifiers_logits(finetuned, tmp_path):
    run, _ = finetuned
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        ours = classifier_of(run)(x)
    runner = CliRunner()
    out = tmp_path / "classifier.safetensors"
    exported = runner.invoke(app, ["export", str(run), str(out)])
    assert exported.exit_code == 0, exported.output
    line = exported.stdout.strip().splitlines()[-1]
    assert "num_classes=10" in line
    scope: dict = {}
    exec(line, scope)  # the printed line, as a user would paste it
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(x), ours, rtol=1e-5, atol=1e-5)
    folder = tmp_path / "hub"
    published = runner.invoke(app, ["export", str(run), str(folder), "--to", "hf"])
    assert published.exit_code == 0, published.output
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == 10
    assert config["pretrained_cfg"]["label_names"] == [str(d) for d in range(10)]
    assert "pipeline_tag: image-classification" in (folder / "README.md").read_text()
    hub = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hub(x), ours, rtol=1e-5, atol=1e-5)


def test_info_and_probe_read_the_fine_tuned_checkpoint(finetuned, tmp_path):
    run, _ = finetuned
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(run)])
    assert info.exit_code == 0, info.output
    assert "finetune" in info.output and "10 (0, 1, 2, 3, 4, ...)" in info.output
    assert "head params" in info.output and "650" in info.output  # 10 × 64 + 10
    out = tmp_path / "probe.json"
    probed = runner.invoke(app, ["probe", str(run), "--method", "knn", "--no-cache", "-q", "--precision",
                                 "fp32", "--out", str(out)])
    assert probed.exit_code == 0, probed.output
    assert json.loads(out.read_text())["results"][0]["top1"] > 0.5
    assert read_meta(run / "latest.safetensors")["kind"] == "finetune"


def image_tree(root, splits=("train", "val"), flat: bool = False):
    """An ImageFolder tree: per split, 2 classes × 3 random 8-px PNGs (or, `flat`, the images
    with no class folder)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in ("a", "b"):
            folder = root / split if flat else root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{c}{i}.png")
    return root


@pytest.mark.parametrize("case, message", [
    ("img_size", "img_size 12 is not a positive multiple of the patch size 8 of vit_t8 (--img-size)"),
    ("subset", "names no image under"),
    ("no_val", "needs train/ and val/ sub-directories"),
    ("no_labels", "holds no images in class sub-directories"),
    ("not_a_checkpoint", "is a safetensors file but not a stoptool checkpoint"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case, message):
    args = ["finetune", *RUN, "--batch-size", "2", "--out", str(tmp_path / "run")]
    if case == "img_size":
        args += ["--img-size", "12"]
    elif case == "subset":
        (tmp_path / "subset.txt").write_text("n01440764_10026.JPEG\n")
        args += ["--dataset", str(image_tree(tmp_path / "tree")), "--subset", str(tmp_path / "subset.txt")]
    elif case == "no_val":
        args += ["--dataset", str(image_tree(tmp_path / "tree", ("train",)))]
    elif case == "no_labels":
        args += ["--dataset", str(image_tree(tmp_path / "tree", flat=True))]
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
        args = ["finetune", str(tmp_path / "plain.safetensors"), *RUN[3:], "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_run_directory_of_another_fine_tuning_is_not_resumed(finetuned, tmp_path):
    run, _ = finetuned
    result = CliRunner().invoke(app, ["finetune", *RUN, *RECIPE, "--seed", "4", "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert "holds a run with seed=0, not 4: pass --no-resume" in result.output
