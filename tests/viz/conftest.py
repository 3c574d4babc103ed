"""Tiny pretraining runs shared by the figure tests (vit_n2, 16 px, 8×8 grid, 3 steps)."""

import pytest

from stoptool.config import config_from_dict


def _tiny_run(folder, sigma: float):
    from stoptool.train.pretrain import pretrain

    cfg = config_from_dict(dict(
        arch="vit_n2", img_size=16, pred_width=48, pred_depth=1, batch_size=8, steps=3,
        sigma=sigma, precision="fp32", workers=0, log_every=1, out=str(folder), eval_every=0,
    ))
    pretrain(cfg.validate(), resume=False)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("vizrun") / "run", sigma=0.25)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run):
    return tiny_run / "latest.safetensors"


@pytest.fixture(scope="session")
def tiny_ckpt_sigma0(tmp_path_factory):
    """The same tiny run with σ = 0 (I-JEPA), for figures that compare checkpoints."""
    return _tiny_run(tmp_path_factory.mktemp("vizrun0") / "run-sigma0", sigma=0.0) / "latest.safetensors"
