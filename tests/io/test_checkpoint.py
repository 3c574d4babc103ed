"""Checkpoints: exact round trip, atomic writes, and clear rejection of foreign files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from stoptool.errors import UserError, WriteFailed
from stoptool.io.checkpoint import (
    Checkpoint,
    load_checkpoint,
    optimizer_state,
    optimizer_tensors,
    read_meta,
    save_checkpoint,
    tensors_digest,
)

TINY_META = {"kind": "pretrain", "arch": "vit_t4", "img_size": 32}


def test_round_trip_identical(tmp_path):
    tensors = {
        "encoder.w": torch.randn(3, 4),
        "predictor.b": torch.arange(5),
        "rng.cpu": torch.get_rng_state(),
    }
    meta = {**TINY_META, "sigma": 0.25, "step": 7, "config": {"lr": 1e-3}}
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, Checkpoint(meta, tensors))
    back = load_checkpoint(path)
    assert set(back.tensors) == set(tensors)
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())
    assert {k: back.meta[k] for k in meta} == meta
    assert back.meta["stoptool_version"]
    assert read_meta(path) == back.meta
    assert back.part("encoder").keys() == {"w"}
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left


def test_optimizer_state_round_trip(tiny_cfg):
    from stoptool.models.jepa import build_jepa
    from stoptool.train.optim import param_groups

    model = build_jepa(tiny_cfg().model)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    model.predictor.mask_token.sum().backward()
    opt.step()
    tensors, groups = optimizer_tensors(opt.state_dict())
    restored = optimizer_state(tensors, json.loads(json.dumps(groups)))  # groups go through JSON
    opt2 = torch.optim.AdamW(param_groups(model), lr=1e-3)
    opt2.load_state_dict(restored)
    for k, v in opt.state_dict()["state"].items():
        for name, t in v.items():
            assert torch.equal(opt2.state_dict()["state"][k][name], t)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, Checkpoint(TINY_META, {"encoder.w": torch.randn(100, 100)}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable stoptool checkpoint"):
        load_checkpoint(path)


def test_bytes_damaged_in_the_middle_are_caught_by_the_checksum(tmp_path):
    """A file of the right size and a whole header, with one weight's bytes changed."""
    path = tmp_path / "c.safetensors"
    tensors = {"encoder.w": torch.randn(100, 100), "encoder.b": torch.zeros(100, dtype=torch.bfloat16)}
    save_checkpoint(path, Checkpoint(TINY_META, tensors))
    back = load_checkpoint(path)
    assert torch.equal(back.tensors["encoder.w"], tensors["encoder.w"])
    assert back.digest == tensors_digest(tensors) and len(back.digest) == 64
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read_meta(path)["arch"] == "vit_t4"  # the metadata alone still reads
    with pytest.raises(UserError, match="is damaged: its tensors do not match the checksum"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    """Files written before checksums (or by hand) carry none: nothing to check."""
    path = tmp_path / "old.safetensors"
    metadata = {"format": "stoptool", "meta": json.dumps(TINY_META)}
    save_file({"encoder.w": torch.ones(2)}, str(path), metadata=metadata)
    back = load_checkpoint(path)
    assert torch.equal(back.tensors["encoder.w"], torch.ones(2)) and back.digest is None


def test_foreign_safetensors_is_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="not a stoptool checkpoint"):
        load_checkpoint(path)


def test_random_bytes_and_missing_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(UserError, match="not a readable"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_written_files_follow_the_umask(tmp_path):
    import os

    path = tmp_path / "c.safetensors"
    save_checkpoint(path, Checkpoint(TINY_META, {"encoder.w": torch.zeros(2)}))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("meta", [{"kind": "pretrain"}, ["not", "a", "mapping"], {"arch": "vit_t4"}])
def test_stoptool_tag_with_damaged_metadata_is_refused(tmp_path, meta):
    path = tmp_path / "hand-made.safetensors"
    save_file({"encoder.w": torch.zeros(2)}, str(path), {"format": "stoptool", "meta": json.dumps(meta)})
    with pytest.raises(UserError, match="metadata lacks the arch and image size"):
        load_checkpoint(path)


def test_a_write_that_fails_midway_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    import stoptool.io.checkpoint as ck

    path = tmp_path / "latest.safetensors"
    save_checkpoint(path, Checkpoint({**TINY_META, "step": 1}, {"encoder.w": torch.ones(3)}))

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partial file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", dies_halfway)
    # one line for the user: the file, the reason, what it needed (three float32s) and what is free
    said = (rf"^cannot write '{path}': no space left on device "
            r"\(needed 12 bytes, [\d.]+ [KMGT]?B(ytes)? free\)$")
    with pytest.raises(WriteFailed, match=said) as info:
        save_checkpoint(path, Checkpoint({**TINY_META, "step": 2}, {"encoder.w": torch.zeros(3)}))
    assert info.value.exit_code == 1 and info.value.needed == 12
    back = load_checkpoint(path)
    assert back.meta["step"] == 1 and torch.equal(back.tensors["encoder.w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.safetensors"]  # no temporary left


@pytest.mark.parametrize(
    "key, value, want",
    [
        ("sigma", "abc", "a number >= 0"),
        ("sigma", -1, "a number >= 0"),
        ("kind", "weird", "one of pretrain, imported, finetune, timm-encoder, timm-classifier"),
        ("pred_width", "x", "a positive integer"),
        ("img_size", 0, "a positive integer"),
        ("noise_on", "everywhere", "one of masked, context, both"),
        ("pred_pos", "rope", "one of sincos, learned"),
        ("cov", ["fixed"], "one of learned, fixed"),
        ("which", "both", "target or context"),
        ("step", "5", "an integer >= 0"),  # what a resume reads
        ("iterations_per_epoch", 0, "an integer >= 1"),
    ],
)
def test_metadata_values_of_the_wrong_type_or_range_are_refused(tmp_path, key, value, want):
    """The checksum covers the tensors only: an edited metadata block is caught when read."""
    path = tmp_path / "edited.safetensors"
    save_checkpoint(path, Checkpoint({**TINY_META, "sigma": 0.25, key: value}, {"encoder.w": torch.zeros(2)}))
    with pytest.raises(UserError) as err:
        read_meta(path)
    reason = f"not {want} (a damaged or hand-made file)"
    assert str(err.value) == f"'{path}' has metadata {key} = {value!r}, {reason}"
