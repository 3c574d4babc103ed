"""The pretraining engine: run directory, resume to the same weights, signals, bad loss."""

import json
import signal

import pytest
import torch

from stoptool.errors import UserError
from stoptool.io.checkpoint import load_checkpoint
from stoptool.train import fit as loop
from stoptool.train import pretrain as engine
from stoptool.train import state as run_state
from stoptool.train.fit import Interrupted
from stoptool.train.pretrain import pretrain


def _cfg(tiny_cfg, folder, out, **kw):
    # 25 files (one unreadable) with batch 8: 3 steps per epoch
    return tiny_cfg(dataset=str(folder), out=str(out), **kw)


def test_run_directory_contents(tiny_cfg, image_folder, tmp_path):
    result = pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "run"))
    run = tmp_path / "run"
    assert result.step == 6 and result.epoch == 2
    names = {p.name for p in run.iterdir()}
    assert {
        "latest.safetensors",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "epoch0001.safetensors",
    } <= names
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "wd", "momentum", "A_norm", "mask_token_norm", "img_per_s"} <= rows[0].keys()
    meta = load_checkpoint(run / "latest.safetensors").meta
    assert meta["step"] == 6 and meta["arch"] == "vit_n2" and meta["sigma"] == 0.25
    assert meta["config"]["dataset"] == str(image_folder)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_images"] > 0  # the broken file was skipped, not fatal
    assert result.skipped_images == summary["skipped_images"]


def test_resumed_run_reaches_the_same_weights(tiny_cfg, image_folder, tmp_path):
    full = pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "full"))
    part = pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "part", steps=4))
    assert part.step == 4
    saved = load_checkpoint(tmp_path / "part" / "latest.safetensors")
    assert saved.meta["step"] == 4 and any(k.startswith("opt.state.") for k in saved.tensors)
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epo')  # a row torn by a kill mid-write: dropped on resume
    resumed = pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "part"))
    assert resumed.step == 6
    a = load_checkpoint(full.checkpoint).tensors
    b = load_checkpoint(resumed.checkpoint).tensors
    for key in a:
        if key.startswith(("encoder.", "target_encoder.", "predictor.", "opt.")):
            assert torch.equal(a[key], b[key]), key
    rows = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # the wall-clock: a run of one launch says one figure; a resumed one, this launch's and the whole run's
    assert full.rows()["wall-clock"] == f"{full.seconds:.1f} s"
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    before = saved.meta["run_seconds"]  # the first launch's, up to its checkpoint at step 4
    assert 0 < before <= part.seconds
    assert summary["seconds"] == round(resumed.seconds, 2)
    assert summary["run_seconds"] == pytest.approx(before + resumed.seconds, abs=0.02)
    assert resumed.rows()["wall-clock"] == (f"{resumed.seconds:.1f} s this launch, whole run "
                                            f"{before + resumed.seconds:.1f} s")


def test_resume_refuses_a_different_run(tiny_cfg, image_folder, tmp_path):
    pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r", steps=1))
    with pytest.raises(UserError, match="sigma"):
        pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r", sigma=0.0))
    done = pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r", steps=1))
    assert done.already_done
    # runtime choices are not the run: they may change on resume
    more = pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r", steps=2, attn="math", workers=0,
                         compile=False, log_every=2, save_every=3))
    assert more.step == 2 and not more.already_done


def test_sigint_finishes_the_step_and_saves(tiny_cfg, image_folder, tmp_path):
    def progress(step, total, row):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r"), progress=progress)
    assert info.value.signum == signal.SIGINT
    assert load_checkpoint(info.value.checkpoint).meta["step"] == 2  # the step in flight finished
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, image_folder, tmp_path, monkeypatch):
    real_step = loop.train_step
    calls = {"n": 0}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise loop.NonFiniteLoss("loss is nan")
        return real_step(*args, **kw)

    monkeypatch.setattr(loop, "train_step", failing)
    # latest is written after every epoch, whatever --save-every says of snapshots
    with pytest.raises(UserError, match="step 4: loss is nan; the last good checkpoint is kept"):
        pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r", save_every=10))
    assert load_checkpoint(tmp_path / "r" / "latest.safetensors").meta["step"] == 3
    assert not list((tmp_path / "r").glob("epoch*.safetensors"))
    # the alarm is recorded where a user looks: the metrics log and the summary
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["alarm"]) for r in rows if "alarm" in r] == [(4, "non_finite")]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["alarms"][0]["alarm"] == "non_finite" and "loss is nan" in summary["stopped"]


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_non_finite_loss_before_any_checkpoint_says_so(tiny_cfg, image_folder, tmp_path, monkeypatch):
    def failing(*args, **kw):
        raise loop.NonFiniteLoss("loss is nan")

    monkeypatch.setattr(loop, "train_step", failing)
    with pytest.raises(UserError, match=r"step 0: loss is nan; no checkpoint had been written yet "
                                        r"\(try a lower --lr\)$"):
        pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r"))
    assert not (tmp_path / "r" / "latest.safetensors").exists()
    # in fp16 (a GPU's, stood in for here) overflow is the other suspect
    monkeypatch.setattr(engine, "resolve_precision", lambda *args, **kw: "fp16")
    with pytest.raises(UserError, match=r"\(try a lower --lr, or --precision fp32: fp16 activations "
                                        r"overflow past 65504\)$"):
        pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r16"))


def test_metrics_go_to_tensorboard_when_it_is_installed(tiny_cfg, image_folder, tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class SummaryWriter:
        def __init__(self, logdir, purge_step=None):
            calls.append(("open", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    fake = types.SimpleNamespace(SummaryWriter=SummaryWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "r"))
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert calls[0] == ("open", str(tmp_path / "r" / "tb")) and calls[-1] == ("close",)
    assert calls.count(("close",)) == 1
    assert [c for c in calls if c[0] == "loss"] == [("loss", r["loss"], r["step"]) for r in rows]
    assert {c[0] for c in calls[1:-1]} >= {"loss", "lr", "wd", "momentum"}


def test_ablation_flags_are_saved_and_rebuilt_by_the_loader(tiny_cfg, image_folder, tmp_path):
    from stoptool.io.models import load_model

    cfg = _cfg(tiny_cfg, image_folder, tmp_path / "r", steps=2, cov="fixed", pred_pos="learned",
               noise_on="both", a_l1=0.01)
    result = pretrain(cfg)
    ckpt = load_checkpoint(result.checkpoint)
    assert {k: ckpt.meta[k] for k in ("cov", "pred_pos", "noise_on", "a_l1")} == {
        "cov": "fixed", "pred_pos": "learned", "noise_on": "both", "a_l1": 0.01}
    pred = load_model(result.checkpoint, need_predictor=True).model.predictor
    assert (pred.cov, pred.pred_pos, pred.noise_on) == ("fixed", "learned", "both")
    saved = ckpt.part("predictor")
    for name, tensor in pred.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # the learned positions were trained: they left their initial draw (pretrain seeds as here)
    from stoptool.models.jepa import build_jepa

    torch.manual_seed(cfg.runtime.seed)
    start = build_jepa(cfg.model).predictor.predictor_pos_embed.detach()
    assert not torch.equal(saved["predictor_pos_embed"], start)


def test_an_fp16_run_saves_its_loss_scale_and_resumes_with_it(tiny_cfg, image_folder, tmp_path, monkeypatch):
    """fp16 runs on GPUs; here fp16 autocast and the scaler run on the CPU in its place. The
    scale the scaler has settled on goes into the checkpoint and comes back on resume (a fresh
    scaler would start at 65536 again and skip steps on overflow)."""
    made = []

    def cpu_scaler(device, precision):
        assert precision == "fp16"
        made.append(torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2))
        return made[-1]

    monkeypatch.setattr(engine, "resolve_precision", lambda *args, **kw: "fp16")
    monkeypatch.setattr(run_state, "make_scaler", cpu_scaler)
    pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "run", steps=4))
    saved = load_checkpoint(tmp_path / "run" / "latest.safetensors").meta["grad_scaler"]
    assert saved == made[0].state_dict()
    pretrain(_cfg(tiny_cfg, image_folder, tmp_path / "run", steps=5))
    assert len(made) == 2
    resumed_at = load_checkpoint(tmp_path / "run" / "latest.safetensors").meta["grad_scaler"]
    # one step on from the saved state (4 steps from 2^10, doubling every 2: 2^12), not from 2^10
    assert made[1].state_dict() == resumed_at
    assert saved["scale"] == 2.0**12
    assert resumed_at == {**saved, "_growth_tracker": saved["_growth_tracker"] + 1}
