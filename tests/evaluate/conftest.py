"""Shared by the evaluate tests: the transfer sets in their release layouts (releases.py) and a
tiny checkpoint (vit_t4 at 16 px: 16 patches an image, so extraction takes milliseconds)."""

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("releases", Path(__file__).parent / "releases.py")
releases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(releases)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return releases.write_all(tmp_path_factory.mktemp("transfer") / "data")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """An encoder-only checkpoint (as `stoptool import` writes one): the target encoder alone."""
    from stoptool.io.checkpoint import Checkpoint, save_checkpoint
    from stoptool.models.encoder import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("vit_t4", 16)
    path = tmp_path_factory.mktemp("ckpt") / "run" / "latest.safetensors"
    tensors = {f"target_encoder.{k}": v for k, v in encoder.state_dict().items()}
    meta = {"kind": "imported", "arch": "vit_t4", "img_size": 16, "patch": 4}
    save_checkpoint(path, Checkpoint(meta, tensors))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models and heads: a second torch thread only spins (and slows everything down when
    other work holds the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
