"""`timm:MODEL` sources: what a caller gets, the test-only switch, and the one-line refusals."""

import pytest

from stoptool.errors import UserError
from stoptool.io import timm_source
from stoptool.io.timm_source import is_timm, load_timm


def test_a_timm_model_comes_with_its_size_prefix_normalisation_and_arch(monkeypatch):
    monkeypatch.setenv(timm_source.RANDOM_WEIGHTS_ENV, "1")
    got = load_timm("timm:test_vit", img_size=32)
    assert (got.img_size, got.patch_size, got.prefix_tokens) == (32, 16, 1)
    assert got.mean == (0.5, 0.5, 0.5) and got.std == (0.5, 0.5, 0.5)  # its pretrained_cfg's, not ImageNet's
    assert got.source == "timm:test_vit (random weights)" and not got.pretrained and not got.net.training
    assert got.arch is None  # 64 wide: no stoptool arch of that shape
    assert got.net.num_classes == 0  # no classifier
    vits = load_timm("timm:vit_small_patch16_224.dino")
    assert (vits.arch, vits.img_size, vits.prefix_tokens) == ("vit_s16", 224, 1)  # 384 wide, 12 deep
    assert vits.mean == (0.485, 0.456, 0.406) and vits.meta["timm_model"] == "vit_small_patch16_224.dino"
    assert is_timm("timm:x") and not is_timm("runs/x/latest.safetensors")


def test_without_weights_or_network_one_line_says_where_they_would_be(monkeypatch):
    monkeypatch.delenv(timm_source.RANDOM_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(timm_source, "_cached_file", lambda cfg: None)
    monkeypatch.setattr(timm_source, "_reachable", lambda host: False)
    with pytest.raises(UserError) as err:
        load_timm("timm:vit_large_patch16_224.mae")
    text = str(err.value)
    assert "\n" not in text and "not in the local caches" in text
    # the MAE weights have a hub id and a URL: both hosts are named
    assert "huggingface.co / dl.fbaipublicfiles.com cannot be reached" in text


def test_cached_weights_are_loaded_without_network(monkeypatch, tmp_path):
    import timm
    import torch

    torch.manual_seed(1)
    reference = timm.create_model("test_vit", pretrained=False, num_classes=0)
    weights = tmp_path / "model.pth"
    torch.save(reference.state_dict(), weights)
    monkeypatch.delenv(timm_source.RANDOM_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(timm_source, "_cached_file", lambda cfg: weights)
    monkeypatch.setattr(timm_source, "_reachable", lambda host: pytest.fail("looked for the network"))
    got = load_timm("timm:test_vit")
    assert got.pretrained and got.source == "timm:test_vit"
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in got.net.state_dict().items())


def test_names_timm_does_not_know_and_models_without_tokens_are_refused(monkeypatch):
    monkeypatch.setenv(timm_source.RANDOM_WEIGHTS_ENV, "1")
    with pytest.raises(UserError, match="names no timm model"):
        load_timm("timm:vit_nonexistent_patch3")
    with pytest.raises(UserError, match="not a vision transformer whose patch tokens can be pooled"):
        load_timm("timm:test_resnet")
