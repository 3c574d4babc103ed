"""`stoptool export --to timm`: the file timm loads, and the line that loads it."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.config import config_from_dict
from stoptool.errors import UserError
from stoptool.io.checkpoint import Checkpoint, save_checkpoint
from stoptool.io.export import export_timm
from stoptool.io.models import load_model
from stoptool.models.encoder import encode, timm_kwargs
from stoptool.models.jepa import build_jepa
from stoptool.train.checkpointer import model_tensors
from stoptool.train.pretrain import model_meta


def make_checkpoint(path, arch, img):
    cfg = config_from_dict(dict(arch=arch, img_size=img, pred_width=48, pred_depth=1)).validate()
    torch.manual_seed(0)
    model = build_jepa(cfg.model).eval()
    with torch.no_grad():  # an EMA target that has drifted from the context encoder
        for p in model.target_encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = {"kind": "pretrain", **model_meta(cfg), "step": 5, "epoch": 1}
    save_checkpoint(path, Checkpoint(meta, model_tensors(model)))
    return model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A vit_t4 pretrain checkpoint at 32 px, built once: (path, model)."""
    path = tmp_path_factory.mktemp("run") / "run.safetensors"
    return path, make_checkpoint(path, "vit_t4", 32)


def load_with_timm(line):
    scope: dict = {}
    exec(line, scope)  # the printed line, as a user would paste it
    return scope["model"].eval()


def pooled(encoder, x):
    return encode(encoder, x).mean(1)


@pytest.mark.parametrize("arch,img,name", [
    ("vit_s16", 224, "vit_small_patch16_224"),  # a registered timm shape
    ("vit_t4", 32, "vit_tiny_patch16_224"),  # a custom one: the shape arguments make it
])
def test_timm_loads_the_export_and_gives_the_same_pooled_features(tmp_path, arch, img, name):
    model = make_checkpoint(tmp_path / "run.safetensors", arch, img)
    res = export_timm(tmp_path / "run.safetensors", tmp_path / "timm.safetensors")
    assert res.meta["timm_model"] == name and f"create_model({name!r}" in res.line

    # a plain state dict with exactly timm's keys and shapes
    with torch.device("meta"):
        expected = VisionTransformer(**timm_kwargs(arch, img)).state_dict()
    saved = load_file(tmp_path / "timm.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}

    timm_model = load_with_timm(res.line)
    # read as the safetensors file it is, not as the JAX .npz the registered vit_small config
    # names (timm 1.0.29 kept that mark for an overlaid file unless the line clears it)
    assert timm_model.pretrained_cfg["custom_load"] is False
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        ours, theirs = pooled(model.target_encoder, x), timm_model(x)
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
        assert (theirs - pooled(model.encoder, x)).abs().max() > 1e-3  # it is the target one


def test_which_context_exports_the_context_encoder(tmp_path, tiny_run):
    run, model = tiny_run
    res = export_timm(run, tmp_path / "ctx.safetensors", which="context")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_with_timm(res.line)(x), pooled(model.encoder, x),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="which must be target or context"):
        export_timm(run, tmp_path / "x.safetensors", which="ema")


def test_cli_prints_a_line_that_loads_it(tmp_path, tiny_run):
    run, model = tiny_run
    out = tmp_path / "timm.safetensors"
    result = CliRunner().invoke(app, ["export", str(run), "--to", "timm", str(out)])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("import timm;"))
    report = json.loads((tmp_path / "timm.export.json").read_text())
    assert report["load"] == line and report["file"] == str(out) and report["arch"] == "vit_t4"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_with_timm(line)(x), pooled(model.target_encoder, x),
                                   rtol=1e-6, atol=1e-6)


def test_the_timm_line_loads_strictly(tmp_path, tiny_run):
    """A file missing a tensor must fail in timm, not load half-random weights."""
    out = tmp_path / "timm.safetensors"
    res = export_timm(tiny_run[0], out)
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(out)
    del tensors["blocks.5.mlp.fc1.weight"]
    save_file(tensors, str(out), metadata=metadata)
    with pytest.raises(RuntimeError, match="blocks.5.mlp.fc1.weight"):
        load_with_timm(res.line)


def test_exported_file_loads_through_load_model_and_info(tmp_path, tiny_run):
    run, model = tiny_run
    out = tmp_path / "timm.safetensors"
    export_timm(run, out)
    loaded = load_model(out)  # what `stoptool probe` calls
    assert loaded.model.predictor is None and loaded.meta["kind"] == "timm-encoder"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encode(loaded.model.target_encoder, x), encode(model.target_encoder, x))
    with pytest.raises(UserError, match="needs a predictor"):
        load_model(out, need_predictor=True)
    result = CliRunner().invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert "timm-encoder" in result.output and "vit_tiny_patch16_224" in result.output


def test_bad_requests_are_one_line_errors(tmp_path, tiny_run):
    runner = CliRunner()
    run, out = str(tiny_run[0]), str(tmp_path / "out.safetensors")
    for args, message in (
        (["export", run, "--to", "onnx", out], "to must be one of timm, hf, transformers, got 'onnx' (--to)"),
        (["export", str(tmp_path / "missing.safetensors"), out], "does not exist"),
        (["export", run, run], "the input itself"),
        (["export", run, str(tmp_path)], "is a directory"),
        # timm reads a .pt or .pth with torch.load: the printed line would fail on it
        (["export", run, str(tmp_path / "enc.pt")], "must end in .safetensors"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout
    assert not (tmp_path / "out.safetensors").exists()

    export_timm(run, out)  # an exported file holds the target encoder only
    with pytest.raises(UserError, match="holds only the target encoder"):
        export_timm(out, tmp_path / "again.safetensors", which="context")
    probe = runner.invoke(app, ["probe", out, "--which", "context", "--method", "knn"])
    assert probe.exit_code == 2
    assert "holds only the target encoder; take which=target (--which)" in probe.stderr
    assert not (tmp_path / "out.probe-digits.json").exists()


def test_weights_that_are_not_finite_are_refused_by_the_loader_and_export(tiny_run, tmp_path):
    path, _ = tiny_run
    ckpt = load_model(path).checkpoint
    tensors = dict(ckpt.tensors)
    tensors["target_encoder.blocks.1.mlp.fc1.weight"] = torch.full_like(
        tensors["target_encoder.blocks.1.mlp.fc1.weight"], float("nan"))
    bad = tmp_path / "diverged.safetensors"
    save_checkpoint(bad, Checkpoint(ckpt.meta, tensors))
    message = (f"'{bad}' holds weights that are not finite (NaN or inf) in 1 tensor, "
               "first 'target_encoder.blocks.1.mlp.fc1.weight': it cannot be used")
    with pytest.raises(UserError) as err:
        load_model(bad)
    assert str(err.value) == message
    with pytest.raises(UserError, match="not finite"):
        export_timm(bad, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    # export reads one encoder: damage elsewhere does not stop it
    assert export_timm(bad, tmp_path / "context.safetensors", which="context").out.exists()
