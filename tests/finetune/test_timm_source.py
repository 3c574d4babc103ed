"""`stoptool finetune timm:NAME`: a timm model fine-tuned as timm builds it (its class token,
pooling and layer groups), from its published weights; here the tests' seeded draw stands in
for them (no network), built exactly as `evaluate` builds timm sources."""

import json

import pytest
import timm
import torch
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.io import timm_source
from stoptool.io.checkpoint import load_checkpoint
from stoptool.models import archs

NAME = "test_vit"  # timm's test ViT: 6 blocks 64 wide, 2 heads, a class token, 16-px patches
ARGS = ["finetune", f"timm:{NAME}", "--img-size", "32", "--batch-size", "16", "--precision", "fp32",
        "--device", "cpu", "--eval-every", "0", "--head-norm", "none", "--workers", "0", "-q"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(timm_source.RANDOM_WEIGHTS_ENV, "1")
        patch.setitem(archs.ARCHS, "t", archs.ArchSpec(64, 6, 2))  # a stoptool size of test_vit's shape
        out = tmp_path_factory.mktemp("timm") / "run"
        first = CliRunner().invoke(app, [*ARGS, "--steps", "2", "--out", str(out)])
        assert first.exit_code == 0, first.output
        start = {k: v.clone() for k, v in load_checkpoint(out / "latest.safetensors").part("encoder").items()}
        more = CliRunner().invoke(app, [*ARGS, "--steps", "3", "--out", str(out)])
        assert more.exit_code == 0, more.output
        yield out, start, first.output


def test_timm_weights_start_the_run_and_timm_reads_the_result(run):
    out, after_two, output = run
    meta = load_checkpoint(out / "latest.safetensors").meta
    assert meta["timm_model"] == NAME and meta["arch"] == "vit_t16" and meta["step"] == 3
    assert f"timm:{NAME}" in output
    torch.manual_seed(0)  # the tests' stand-in for the published weights, as load_timm draws them
    published = timm.create_model(NAME, pretrained=False, num_classes=0, img_size=32).state_dict()
    assert "cls_token" in after_two  # timm's own tokens, not stoptool's encoder
    moved = [k for k in published if not torch.equal(after_two[k], published[k])]
    assert moved and set(moved) <= set(published)  # two steps moved the published weights, nothing new
    # the checkpoint is timm's classifier: timm's model loads it whole and gives finetune.json's top-1
    ckpt = load_checkpoint(out / "latest.safetensors")
    model = timm.create_model(NAME, pretrained=False, num_classes=10, img_size=32)
    state = {**ckpt.part("encoder"), **{f"head.{k}": v for k, v in ckpt.part("head").items()}}
    model.load_state_dict(state)  # strict: every key, no other
    result = json.loads((out / "finetune.json").read_text())
    assert result["classes"] == 10 and 0 <= result["top1"] <= 100


def test_resume_continued_the_same_timm_classifier(run):
    out, _, _ = run
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3


def test_other_commands_refuse_a_timm_classifier_in_one_line(run):
    out, _, _ = run
    result = CliRunner().invoke(app, ["probe", str(out), "-q"])
    assert result.exit_code == 2
    assert f"timm's {NAME} fine-tuned" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_timm_model_without_a_stoptool_size_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(timm_source.RANDOM_WEIGHTS_ENV, "1")
    odd = "timm:vit_small_patch16_18x2_224"  # 18 × 2 blocks: no stoptool size has that depth
    result = CliRunner().invoke(app, ["finetune", odd, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no stoptool arch" in result.output
    assert not (tmp_path / "r").exists()
