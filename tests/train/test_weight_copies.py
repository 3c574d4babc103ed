"""A low-precision step on weight copies cast once a step (`train.weight_copies`) is autocast's
step bit for bit: losses, gradients, weights, AdamW's moments and the EMA, with micro-batches,
clipping, recomputed blocks and a skipped non-finite step."""

import pytest
import torch

from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.distributed import Nets, World
from stoptool.train.runtime import DTYPES, autocast_factory, set_attention
from stoptool.train.schedules import Hyper
from stoptool.train.step import StepInputs, compile_forward, single_process_state, train_step
from stoptool.train.weight_copies import usable


def _states(cfg, precision: str, **options):
    """Two single-process states of one model: on copies, and on autocast's casts."""
    pair = []
    for copies in (True, False):
        torch.manual_seed(0)
        model = build_jepa(cfg.model).train()
        set_attention(model, "sdpa")
        state = single_process_state(model, autocast_factory(torch.device("cpu"), precision), precision,
                                     **options)
        if not copies:
            state.nets.copies = None
        pair.append(state)
    assert pair[0].nets.copies is not None and len(pair[0].nets.copies) > 10
    return pair


def _batches(cfg, n: int, size: int = 4):
    sampler, gen = MaskSampler(cfg.mask_config()), torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ctx, tgt = sampler(size, gen)
        out.append(StepInputs(torch.randn(size, 3, 16, 16, generator=gen), ctx, tgt, measure=True))
    return out


def _run(state, batches) -> list:
    seen = []
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)  # StoP's noise: the same draw for both states
        result = train_step(state, batch, Hyper(1e-3, 0.04, 0.99))
        seen.append((result.loss, result.grad_norm, result.target_features))
    return seen


def _assert_same(a, b, seen_a, seen_b):
    for (la, na, fa), (lb, nb, fb) in zip(seen_a, seen_b, strict=True):
        assert torch.equal(la, lb) and torch.equal(na, nb) and torch.equal(fa, fb)
    named_b = dict(b.model.named_parameters())
    assert len(a.optimizer.state) > 10 and len(a.optimizer.state) == len(b.optimizer.state)
    for name, p in a.model.named_parameters():
        q = named_b[name]
        assert p.dtype == torch.float32 and torch.equal(p, q), name  # EMA'd target encoder included
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad) and p.grad.stride() == q.grad.stride(), name
            assert not p.grad.requires_grad and p.grad.dtype == torch.float32, name  # a plain fp32 gradient
        sa, sb = a.optimizer.state.get(p), b.optimizer.state.get(q)
        assert (sa is None) == (sb is None), name
        if sa is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[key], sb[key]), (name, key)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_steps_on_copies_are_autocasts_steps_bit_for_bit(tiny_cfg, precision):
    cfg = tiny_cfg(sigma=0.25, pred_depth=2)
    # micro-batches add into .grad; StoP's l1 penalty reads A, a linear's weight, outside the layer
    a, b = _states(cfg, precision, clip_grad=1.0, accum_steps=2, a_l1=1e-3)
    batches = _batches(cfg, 3)
    seen_a, seen_b = _run(a, batches), _run(b, batches)
    assert seen_a[0][0] != seen_a[-1][0]  # the weights moved between steps, and the copies with them
    _assert_same(a, b, seen_a, seen_b)
    # the modules hold their fp32 weights between steps: checkpoints and the EMA see no copy
    assert all(v.dtype == torch.float32 for v in a.model.state_dict().values() if v.is_floating_point())


def test_recomputed_blocks_read_the_copies(tiny_cfg):
    cfg = tiny_cfg(pred_depth=2)
    a, b = _states(cfg, "bf16")
    for state in (a, b):
        state.model.encoder.set_grad_checkpointing(True)
        state.model.predictor.grad_checkpointing = True
    batches = _batches(cfg, 2)
    _assert_same(a, b, _run(a, batches), _run(b, batches))


def test_a_non_finite_step_on_copies_changes_nothing(tiny_cfg):
    cfg = tiny_cfg()
    (state, _) = _states(cfg, "bf16")
    good, bad = _batches(cfg, 2)
    _run(state, [good])
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in state.optimizer.state.values()]
    bad.images[0, 0, 0, 0] = float("nan")
    loss = _run(state, [bad])[0][0]
    assert not torch.isfinite(loss)
    after = state.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and EMA kept
    kept = zip(moments, state.optimizer.state.values(), strict=True)
    assert all(torch.equal(m, s["exp_avg"]) for m, s in kept)
    assert torch.isfinite(_run(state, [good])[0][0])  # the next step casts the kept weights afresh


def test_a_failing_step_leaves_the_fp32_weights_in_place(tiny_cfg):
    cfg = tiny_cfg()
    (state, _) = _states(cfg, "bf16")
    batch = _batches(cfg, 1)[0]
    batch.images = batch.images[:, :2]  # two channels: the patch embedding refuses them
    with pytest.raises(RuntimeError):
        train_step(state, batch, Hyper(1e-3, 0.04, 0.99))
    assert all(p.dtype == torch.float32 for p in state.model.parameters())


def test_copies_are_kept_only_where_they_are_autocasts_arithmetic(tiny_cfg, monkeypatch):
    cfg = tiny_cfg()
    model = build_jepa(cfg.model)
    assert not usable(DTYPES["fp32"], distributed=False, reentrant_recompute=False)
    assert not usable(torch.bfloat16, distributed=True, reentrant_recompute=False)  # DDP's hooks
    assert not usable(torch.bfloat16, distributed=False, reentrant_recompute=True)
    fp32 = single_process_state(model, autocast_factory(torch.device("cpu"), "fp32"), "fp32")
    assert fp32.nets.copies is None
    bf16 = single_process_state(model, autocast_factory(torch.device("cpu"), "bf16"), "bf16")
    assert bf16.nets.copies is not None
    compile_forward(bf16)  # a compiled step fuses the casts itself
    assert bf16.nets.copies is None
    nets = Nets(model, model, None, World(rank=0, size=2, local_rank=0))
    assert not nets.keep_weight_copies(torch.bfloat16) and nets.copies is None
