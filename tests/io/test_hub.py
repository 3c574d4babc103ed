"""`stoptool export --to hf|transformers`: Hub folders that timm and transformers load with the
encoder's own features, a model card that holds the checkpoint's facts, and the way back in."""

import json
import re
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.config import config_from_dict
from stoptool.errors import UserError
from stoptool.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from stoptool.io.export import export_timm
from stoptool.io.folders import has_ijepa_names, ijepa_to_timm, timm_to_ijepa
from stoptool.io.hub import check_transformers_reads, export_folder, ijepa_config
from stoptool.io.models import load_model
from stoptool.io.official import encoder_shapes, import_checkpoint
from stoptool.models.archs import ARCHS
from stoptool.models.encoder import encode, timm_kwargs
from stoptool.models.jepa import build_jepa
from stoptool.train.checkpointer import model_tensors
from stoptool.train.pretrain import model_meta

runner = CliRunner()
ARCH_PAIRS = [("vit_n2", 16), ("vit_s4", 32)]  # 3 and 6 heads: the query/key/value split differs


def make_checkpoint(path, arch="vit_n2", img=16, sigma=0.25):
    """A pretrain checkpoint whose target encoder has drifted from the context encoder."""
    cfg = config_from_dict(dict(arch=arch, img_size=img, pred_width=48, pred_depth=1, sigma=sigma,
                                epochs=2)).validate()
    torch.manual_seed(0)
    model = build_jepa(cfg.model).eval()
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = {"kind": "pretrain", **model_meta(cfg), "config": cfg.to_dict(), "step": 5, "epoch": 1,
            "data": {"name": "digits", "size": 1797, "classes": 10}}
    save_checkpoint(path, Checkpoint(meta, model_tensors(model)))
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One checkpoint per arch of ARCH_PAIRS, built once: {arch: (path, model)}."""
    root = tmp_path_factory.mktemp("runs")
    return {arch: (root / f"{arch}.safetensors", make_checkpoint(root / f"{arch}.safetensors", arch, img))
            for arch, img in ARCH_PAIRS}


@pytest.fixture(scope="module")
def ijepa_model():
    from transformers import IJepaModel  # slow to import: once per module

    return IJepaModel


def rel(a, b):
    return float((a - b).norm() / b.norm())


def images(img, n=2):
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(1))


def one_line_error(result, text):
    assert result.exit_code == 2, result.output
    assert text in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- the folders load, with the encoder's features ----------------------------------------


@pytest.mark.parametrize("arch,img", [("vit_t4", 32), ("vit_t4", 48), ("vit_t16", 224), ("vit_t16", 448)])
def test_the_folder_preprocesses_each_image_as_stoptool_does(tmp_path, arch, img, monkeypatch):
    """timm's own preprocessing for the folder (its pretrained_cfg through resolve_data_config
    and create_transform) gives the features stoptool's evaluation transform gives, for images
    larger, smaller and of other shapes than the input, at sizes where 256/224 is not exact."""
    from PIL import Image

    from stoptool.io.paths import asset
    from stoptool.models import archs
    from stoptool.probe.features import ImageTransform, pooled_features

    monkeypatch.setitem(archs.ARCHS, "t", archs.ArchSpec(48, 2, 3))  # two narrow blocks: pixels matter here
    model = make_checkpoint(tmp_path / "c.safetensors", arch, img)
    folder = export_folder(tmp_path / "c.safetensors", tmp_path / "hf", to="hf").out
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=theirs))
    rng = torch.Generator().manual_seed(0)
    photos = [Image.open(asset("china.jpg")).convert("RGB")]  # 640 × 427
    photos += [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())
               for h, w in ((53, 37), (20, 20), (31, 90))]
    ours = ImageTransform(img)
    x_timm = torch.stack([timm_transform(p) for p in photos])
    x_ours = torch.stack([ours(p, i) for i, p in enumerate(photos)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x_timm), pooled_features(model.target_encoder, x_ours, "last"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,img", ARCH_PAIRS)
def test_timm_local_dir_equals_the_timm_file_and_stoptools_encoder(tmp_path, runs, arch, img):
    path, model = runs[arch]
    res = export_folder(path, tmp_path / "hf", to="hf")
    assert sorted(p.name for p in res.out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((res.out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["global_pool"] == "avg"
    assert config["num_features"] == ARCHS[arch[4]].width
    args = config["model_args"]
    assert (args["img_size"], args["class_token"], args["fc_norm"]) == (img, False, False)
    assert args["global_pool"] == "avg"
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [3, img, img]
    assert pretrained["interpolation"] == "bicubic" and len(pretrained["mean"]) == 3

    from_dir = timm.create_model(f"local-dir:{res.out}", pretrained=True).eval()
    scope: dict = {}
    exec(res.load, scope)  # the printed line loads the same
    line = export_timm(path, tmp_path / "enc.safetensors").line
    exec(line, scope)
    x = images(img)
    with torch.no_grad():
        ours = encode(model.target_encoder, x)
        torch.testing.assert_close(from_dir(x), scope["model"].eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(from_dir(x), ours.mean(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(from_dir.forward_features(x), ours, rtol=1e-6, atol=1e-6)


def test_the_timm_folder_loads_strictly(tmp_path, runs):
    """A weights file missing a tensor must fail in timm, not load a half-random model."""
    out = export_folder(runs["vit_n2"][0], tmp_path / "hf", to="hf").out
    tensors = load_file(out / "model.safetensors")
    del tensors["blocks.3.attn.qkv.weight"]
    save_checkpoint(out / "model.safetensors", Checkpoint({"arch": "vit_n2", "img_size": 16}, tensors))
    with pytest.raises(RuntimeError, match=r"blocks\.3\.attn\.qkv\.weight"):
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_uploaded_as_it_is_the_folder_loads_through_hf_hub(tmp_path, runs, monkeypatch):
    """`hf-hub:ORG/NAME` reads the same files from the Hub's cache: the folder, copied into the
    cache layout of an uploaded repository (offline), loads as it does from `local-dir:`."""
    import shutil

    import huggingface_hub.constants

    out = export_folder(runs["vit_n2"][0], tmp_path / "hf", to="hf", push=None).out
    repo, commit = tmp_path / "cache" / "models--acme--stop-tiny", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in out.iterdir():
        shutil.copy(f, repo / "snapshots" / commit / f.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = timm.create_model("hf-hub:acme/stop-tiny", pretrained=True, cache_dir=str(tmp_path / "cache"))
    x = images(16)
    with torch.no_grad():
        expected = encode(runs["vit_n2"][1].target_encoder, x).mean(1)
        torch.testing.assert_close(hub.eval()(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch,img", ARCH_PAIRS)
def test_ijepa_model_gives_stoptools_features(tmp_path, runs, ijepa_model, arch, img):
    path, model = runs[arch]
    res = export_folder(path, tmp_path / "tf", to="transformers")
    config = json.loads((res.out / "config.json").read_text())
    assert config["model_type"] == "ijepa" and config["layer_norm_eps"] == 1e-6
    assert (config["image_size"], config["hidden_size"]) == (img, ARCHS[arch[4]].width)

    loaded, info = ijepa_model.from_pretrained(res.out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = images(img)
    with torch.no_grad():
        theirs = loaded.eval()(pixel_values=x).last_hidden_state
        ours = encode(model.target_encoder, x)
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    assert rel(theirs, ours) < 1e-5
    assert rel(theirs.mean(1), ours.mean(1)) < 1e-5
    assert rel(theirs, encode(model.encoder, x).detach()) > 1e-3  # it is the target encoder


@pytest.mark.parametrize("letter", sorted(ARCHS))
def test_every_arch_size_maps_onto_ijepa_model(letter, ijepa_model, monkeypatch):
    """ViT-T to ViT-g (MLP ratio 48/11): the export's own check, a one-block copy loaded by
    transformers with every key and timm's tokens, passes for each size; a wrong split fails it."""
    import stoptool.io.hub as hub

    arch, img = f"vit_{letter}14", 28
    gen = torch.Generator().manual_seed(0)
    # weights of std 1, not 0.02: attention far from uniform, so a wrong map shows in the features
    one = {k: torch.randn(v.shape, generator=gen) for k, v in encoder_shapes(arch, img).items()
           if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    facts = {"arch": arch, "img_size": img}
    check_transformers_reads(one, facts)
    config = ijepa_config(facts, one)
    spec = ARCHS[letter]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        spec.width, spec.depth, spec.heads)
    assert config.intermediate_size == one["blocks.0.mlp.fc1.weight"].shape[0]
    if letter == "t":  # a map that swapped query and key: the names load, the features differ
        def swapped(state):
            out = timm_to_ijepa(state)
            q, k = (f"encoder.layer.0.attention.attention.{n}.weight" for n in ("query", "key"))
            return {**out, q: out[k], k: out[q]}

        monkeypatch.setattr(hub, "timm_to_ijepa", swapped)
        with pytest.raises(UserError, match="does not read IJepaModel weights as stoptool writes them "
                                            r"\(its features differ from timm's"):
            check_transformers_reads(one, facts)


def test_ijepa_models_own_names_are_read(ijepa_model):
    """transformers 5 names its modules otherwise than its files (layers.{i}.attention.q_proj):
    a state dict taken from the model itself maps onto timm's, with the same features."""
    facts = {"arch": "vit_t2", "img_size": 16}  # 12 blocks: layer numbers of two digits
    torch.manual_seed(0)
    theirs = ijepa_model(ijepa_config(facts, encoder_shapes("vit_t2", 16))).eval()
    timm_model = timm.models.vision_transformer.VisionTransformer(**timm_kwargs("vit_t2", 16)).eval()
    timm_model.load_state_dict(ijepa_to_timm(theirs.state_dict()))  # strict: every key, no other
    x = images(16)
    with torch.no_grad():
        assert rel(encode(timm_model, x), theirs(pixel_values=x).last_hidden_state) < 1e-5


def test_names_map_there_and_back_exactly():
    state = {k: torch.randn(v.shape) for k, v in encoder_shapes("vit_t2", 16).items()}
    there = timm_to_ijepa(state)
    assert has_ijepa_names(there) and not has_ijepa_names(state)
    assert "encoder.layer.11.attention.attention.value.bias" in there  # two-digit layer numbers
    back = ijepa_to_timm({f"ijepa.{k}": v for k, v in there.items()})  # IJepaForImageClassification's
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# -- and come back --------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["hf", "transformers"])
def test_export_import_round_trip_keeps_features_and_facts(tmp_path, runs, to):
    path, model = runs["vit_n2"]
    folder = export_folder(path, tmp_path / to, to=to).out
    result = runner.invoke(app, ["import", str(folder), str(tmp_path / "back.safetensors")])
    assert result.exit_code == 0, result.output
    loaded = load_model(tmp_path / "back.safetensors")
    meta = loaded.meta
    assert meta["source_layout"] == f"{'timm' if to == 'hf' else 'transformers'}-folder"
    facts = (meta["arch"], meta["img_size"], meta["sigma"], meta["step"], meta["epoch"])
    assert facts == ("vit_n2", 16, 0.25, 5, 1)
    assert loaded.model.predictor is None
    x = images(16)
    with torch.no_grad():
        assert rel(encode(loaded.model.target_encoder, x), encode(model.target_encoder, x)) < 1e-6


def test_a_context_encoder_folder_comes_back_as_the_context_encoder(tmp_path, runs):
    path, model = runs["vit_n2"]
    folder = export_folder(path, tmp_path / "ctx", to="hf", which="context").out
    res = import_checkpoint(folder, tmp_path / "back.safetensors")
    assert res.parts == ["encoder"] and res.meta["which"] == "context"
    x = images(16)
    with torch.no_grad():
        torch.testing.assert_close(encode(load_model(res.out).model.encoder, x), encode(model.encoder, x))


def test_info_describes_both_folders(tmp_path, runs):
    path, _ = runs["vit_n2"]
    export_folder(path, tmp_path / "hf", to="hf", license="mit")
    export_folder(path, tmp_path / "tf", to="transformers")
    wide = CliRunner(env={"COLUMNS": "300"})
    for name, kind, licensed in (("hf", "timm folder", "mit"),
                                 ("tf", "transformers IJepaModel folder", "not stated")):
        result = wide.invoke(app, ["info", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        for text in (kind, "vit_n2", "0.25", "target", licensed, "digits", "model.safetensors"):
            assert text in result.output, (name, text, result.output)
    shown = json.loads(wide.invoke(app, ["info", str(tmp_path / "tf"), "--json"]).stdout)
    assert shown["layout"] == "transformers" and shown["meta"]["step"] == 5
    assert shown["params"] == sum(t.numel() for t in encoder_shapes("vit_n2", 16).values())


# -- the model card -------------------------------------------------------------------------


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_holds_the_checkpoint_facts_and_this_encoders_probe_results(tmp_path, image_folder):
    path = tmp_path / "run.safetensors"
    make_checkpoint(path)
    # a real probe (on the 24 images of a small folder: seconds), so the encoder's digest is the probe's
    probe = runner.invoke(app, ["probe", str(path), "--method", "knn", "--no-cache", "--precision", "fp32",
                                "--train-dir", str(image_folder), "--val-dir", str(image_folder)])
    assert probe.exit_code == 0, probe.output
    found = list(tmp_path.glob("run.probe-*.json"))
    assert len(found) == 1
    result = json.loads(found[0].read_text())
    data, top1, train = result["dataset"], result["results"][0]["top1"], result["results"][0]["train"]
    # results of the other encoder beside it: not this model's, so not in its card
    context = dict(result, encoder_sha256="0" * 64, results=[dict(result["results"][0], top1=0.0123)])
    (tmp_path / "run.probe-count.json").write_text(json.dumps(context))

    cli = runner.invoke(app, ["export", str(path), "--to", "hf", str(tmp_path / "hf"), "--license", "mit"])
    assert cli.exit_code == 0, cli.output
    assert "run.probe-count.json holds results of another encoder" in cli.stderr
    card = (tmp_path / "hf" / "README.md").read_text()
    front = front_matter(card)
    assert front["library_name"] == "timm" and front["license"] == "mit"
    assert {"stop", "ijepa"} <= set(front["tags"])
    for fact in ("StoP (σ = 0.25)", "ViT-N/2", "16 × 16 px", "digits (1,797 images, 10 classes)",
                 "| steps | 5 |", "| epochs | 1 of 2 |", "target encoder", "run.safetensors",
                 f"| {data} | knn | last | 100 % ({train:,}) | {100 * top1:.1f} % |",
                 "arXiv", "2308.00566", 'timm.create_model("hf-hub:ORG/NAME"'):
        assert fact in card, fact
    assert "1.2 %" not in card and "count" not in card

    # the card's Python runs as printed (with this folder for the Hub repository)
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    code = code.replace("hf-hub:ORG/NAME", f"local-dir:{tmp_path / 'hf'}")
    scope: dict = {}
    exec(code, scope)
    assert scope["features"].shape == (1, 96) and scope["tokens"].shape == (1, 64, 96)


def test_an_ijepa_card_says_ijepa_and_states_no_license_unless_given(tmp_path, ijepa_model):
    path = tmp_path / "ijepa.safetensors"
    make_checkpoint(path, sigma=0.0)
    card = export_folder(path, tmp_path / "tf", to="transformers").out.joinpath("README.md").read_text()
    front = front_matter(card)
    assert front["library_name"] == "transformers" and "license" not in front
    assert "encoder, I-JEPA" in card and "σ = 0" in card and "StoP (σ" not in card
    assert "No probe results were found" in card
    assert 'IJepaModel.from_pretrained("ORG/NAME")' in card


# -- bad requests: one line, exit 2, nothing written ---------------------------------------


def test_bad_requests_are_one_line_errors_and_write_nothing(tmp_path, runs, monkeypatch):
    run = str(runs["vit_n2"][0])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    encoder_only = tmp_path / "enc.safetensors"
    export_timm(run, encoder_only)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cases = [
        (["export", run, "--to", "hf", str(busy)], "is not empty; give a new folder, or force to write"),
        (["export", run, "--to", "hf", str(busy)], "(--force)"),
        (["export", run, "--to", "hf", str(tmp_path / "file")], "exists and is not a folder"),
        (["export", str(encoder_only), "--to", "hf", str(tmp_path / "o"), "--which", "context"],
         "holds only the target encoder; take which=target (--which)"),
        (["export", run, "--to", "onnx", str(tmp_path / "o")],
         "to must be one of timm, hf, transformers, got 'onnx' (--to)"),
        (["export", run, "--to", "hf", str(tmp_path / "o"), "--license", "MIT License"], "(--license)"),
        (["export", run, "--to", "hf", str(tmp_path / "o"), "--push", "no-org"],
         "ORG/NAME, got 'no-org' (--push)"),
        (["export", run, "--to", "timm", str(tmp_path / "o.safetensors"), "--push", "a/b"],
         "not a timm file"),
    ]
    for args, message in cases:
        one_line_error(runner.invoke(app, args), message)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    one_line_error(runner.invoke(app, ["export", run, "--to", "transformers", str(tmp_path / "o")]),
                   "exporting to transformers needs the transformers package: "
                   "pip install 'stoptool[hf]' (--to)")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    one_line_error(runner.invoke(app, ["export", run, "--to", "hf", str(tmp_path / "o"), "--push", "a/b"]),
                   "push needs the huggingface_hub package: pip install 'stoptool[hf]' (--push)")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, runs, monkeypatch):
    import stoptool.io.hub as hub

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "write_timm_folder", broken)
    with pytest.raises(OSError, match="disk full"):
        export_folder(runs["vit_n2"][0], tmp_path / "hf", to="hf")
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_our_files_and_keeps_the_others(tmp_path, runs):
    path, model = runs["vit_n2"]
    out = tmp_path / "clone"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "README.md").write_text("an old card")
    result = runner.invoke(app, ["export", str(path), "--to", "hf", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert "an old card" not in (out / "README.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [".git", "README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    x = images(16)
    with torch.no_grad():
        got = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x)
        torch.testing.assert_close(got, encode(model.target_encoder, x).mean(1), rtol=1e-6, atol=1e-6)


# -- upload -------------------------------------------------------------------------------


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    calls: list = []
    fail: str | None = None

    def create_repo(self, repo_id, repo_type, exist_ok):
        FakeHub.calls.append(("create", repo_id, exist_ok))

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
        if FakeHub.fail:
            raise RuntimeError(FakeHub.fail)
        from pathlib import Path

        FakeHub.calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


def test_push_uploads_the_whole_folder_and_a_failure_says_how_to_retry(tmp_path, runs, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls, FakeHub.fail = [], None
    run = str(runs["vit_n2"][0])
    result = runner.invoke(app, ["export", run, "--to", "hf", str(tmp_path / "hf"),
                                 "--push", "acme/stop-tiny"])
    assert result.exit_code == 0, result.output
    assert FakeHub.calls == [("create", "acme/stop-tiny", True),
                             ("upload", "acme/stop-tiny", ["README.md", "config.json", "model.safetensors"])]
    assert "https://huggingface.co/acme/stop-tiny" in result.stdout
    assert 'timm.create_model("hf-hub:acme/stop-tiny"' in (tmp_path / "hf" / "README.md").read_text()

    FakeHub.fail = "401 Unauthorized\nmore detail"
    result = runner.invoke(app, ["export", run, "--to", "hf", str(tmp_path / "again"), "--push", "acme/x"])
    one_line_error(result, "is written, but uploading it to acme/x failed: 401 Unauthorized; upload it later "
                           f"with: hf upload acme/x {tmp_path / 'again'}")
    assert (tmp_path / "again" / "model.safetensors").is_file()


def test_foreign_transformers_weights_import_without_a_folder(tmp_path, runs):
    """A bare IJepaModel state dict (the .safetensors of a Hub repository) imports too."""
    from safetensors.torch import save_file

    path, model = runs["vit_n2"]
    state = timm_to_ijepa(load_checkpoint(path).part("target_encoder"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ijepa.safetensors"))
    res = import_checkpoint(tmp_path / "ijepa.safetensors", tmp_path / "back.safetensors")
    x = images(16)
    with torch.no_grad():
        back = encode(load_model(res.out).model.target_encoder, x)
        assert rel(back, encode(model.target_encoder, x)) < 1e-6
