"""Shared fixtures: tiny configs and models so the whole suite runs in minutes on 2 cores."""

import os

import pytest

# The command line's consoles read COLUMNS when they are made, at import, and then keep that
# width. A COLUMNS exported by the caller's shell would override the width each test's
# CliRunner asks for (and wrap the paths and digests the tests look for): drop it first.
os.environ.pop("COLUMNS", None)
# Each of xdist's test processes (one a core) computes on one thread, and so do the processes it
# starts: the tiny models of the tests gain nothing from a second thread, and two processes of
# two threads each on two cores lose most of their time waiting for each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)  # where torch was loaded before this file

from stoptool.config import PretrainConfig, config_from_dict
from stoptool.data.prepare import available_cpus


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: the cores this process may run on, at most 8 (each test process holds torch
    and its models: a few hundred MB)."""
    return min(available_cpus(), 8)


def tiny_config(**kw) -> PretrainConfig:
    """vit_n2 at 16 px (an 8×8 grid) with a one-block predictor 48 wide."""
    base = dict(
        arch="vit_n2",
        img_size=16,
        pred_width=48,
        pred_depth=1,
        batch_size=8,
        epochs=2,
        warmup=0.5,
        precision="fp32",
        device="cpu",  # CPU semantics (bit-exact resume, ...) on any machine; tests/test_gpu.py has the GPU's
        workers=0,
        log_every=1,
        save_every=1,
        eval_every=0,  # the online k-NN has tests of its own (tests/train/test_watch.py)
    )
    base.update(kw)
    return config_from_dict(base).validate()


@pytest.fixture
def tiny_cfg():
    return tiny_config


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """An ImageFolder tree: 2 classes × 12 random 20×20 PNGs, plus one unreadable file."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(12):
            arr = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not a png")
    return root
