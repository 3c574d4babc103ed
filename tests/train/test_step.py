"""The training step learns, and the target encoder follows the online one by EMA."""

import copy

import pytest
import torch
from torch.torch_version import TorchVersion

from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.distributed import Nets
from stoptool.train.guard import Gradients, NonFiniteLoss
from stoptool.train.optim import make_optimizer, make_scaler, param_groups, use_fused_like
from stoptool.train.runtime import autocast_factory
from stoptool.train.schedules import Hyper
from stoptool.train.step import StepInputs, TrainState, ema_update, train_step


def _batch(cfg, sampler, gen, images):
    ctx, tgt = sampler(images.size(0), gen)
    return StepInputs(images, ctx, tgt)


def _step(model, opt, batch, lr, wd, m, ac, scaler=None, clip_grad=None):
    """One train_step of `model` in this process alone."""
    scaler = scaler or make_scaler(torch.device("cpu"), "fp32")
    state = TrainState(model, opt, scaler, Nets.plain(model), ac, clip_grad=clip_grad)
    return train_step(state, batch, Hyper(lr, wd, m)).loss


def test_twenty_steps_lower_the_loss(tiny_cfg):
    cfg = tiny_cfg(sigma=0.25)
    torch.manual_seed(0)
    model = build_jepa(cfg.model).train()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    sampler = MaskSampler(cfg.mask_config())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 16, 16)  # a fixed tiny set of random images
    ac = autocast_factory(torch.device("cpu"), "fp32")
    losses = [
        _step(model, opt, _batch(cfg, sampler, gen, images), 1e-3, 0.04, 0.996, ac) for _ in range(20)
    ]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_target_encoder_moves_toward_online_at_the_scheduled_momentum(tiny_cfg):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_jepa(cfg.model).train()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
    sampler = MaskSampler(cfg.mask_config())
    gen = torch.Generator().manual_seed(0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    m = 0.9
    ac = autocast_factory(torch.device("cpu"), "fp32")
    _step(model, opt, _batch(cfg, sampler, gen, torch.randn(8, 3, 16, 16)), 1e-2, 0.0, m, ac)
    online = list(model.encoder.parameters())
    after = list(model.target_encoder.parameters())
    moved = 0
    for b, o, a in zip(before, online, after):
        assert torch.allclose(a, m * b + (1 - m) * o, atol=1e-6)
        moved += int(not torch.equal(a, o))
    assert moved > 0  # the target differs from the online encoder
    assert all(not p.requires_grad for p in model.target_encoder.parameters())


def test_ema_momentum_one_keeps_target_fixed(tiny_cfg):
    model = build_jepa(tiny_cfg().model)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    ema_update(*Nets.plain(model).ema_pairs(), 1.0)
    assert all(torch.equal(b, a) for b, a in zip(before, model.target_encoder.parameters()))


@pytest.mark.parametrize("momentum", [0.996, 0.9995, 0.5])
def test_guarded_ema_is_the_plain_one_when_it_does_not_skip(momentum):
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (48,), (3, 16, 16), (1,)]
    target = [torch.randn(s, generator=gen) for s in shapes]
    online = [torch.randn(s, generator=gen) for s in shapes]
    plain, guarded, skipped = ([t.clone() for t in target] for _ in range(3))
    ema_update(plain, online, momentum)
    ema_update(guarded, online, momentum, torch.zeros((), dtype=torch.long))
    ema_update(skipped, online, momentum, torch.ones((), dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(plain, guarded))
    assert all(torch.equal(a, b) for a, b in zip(target, skipped))
    assert not torch.equal(plain[0], target[0])


def test_clipping_from_the_guards_norms_is_torchs(tiny_cfg):
    """Gradients.clip_ scales as clip_grad_norm_ does, over a subset of the parameters."""
    def grads(seed):
        torch.manual_seed(seed)
        model = build_jepa(tiny_cfg().model)
        loss = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
        loss.backward()
        return model
    ours, ref = grads(0), grads(0)
    Gradients.of(ours.parameters()).clip_(list(ours.encoder.parameters()), 0.5)
    torch.nn.utils.clip_grad_norm_(ref.encoder.parameters(), 0.5)
    for a, b in zip(ours.parameters(), ref.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert Gradients.of(ours.encoder.parameters()).norm.item() == pytest.approx(0.5, rel=1e-5)


def test_weight_decay_skips_biases_and_1d(tiny_cfg):
    model = build_jepa(tiny_cfg().model)
    decay, no_decay = param_groups(model)
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.predictor.mask_token for p in decay["params"])
    assert not any(p is model.encoder.pos_embed for g in (decay, no_decay) for p in g["params"])


def _three_steps(cfg, opt_factory):
    torch.manual_seed(0)
    model = build_jepa(cfg.model).train()
    opt = opt_factory(model)
    sampler = MaskSampler(cfg.mask_config())
    gen = torch.Generator().manual_seed(0)
    ac = autocast_factory(torch.device("cpu"), "fp32")
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        _step(model, opt, _batch(cfg, sampler, gen, images), 1e-3, 0.04, 0.996, ac)
    return model, opt


def test_training_optimizer_is_plain_adamw_with_its_groups(tiny_cfg):
    """make_optimizer (fused kernel where available) takes the same steps as torch's
    reference AdamW over the same groups."""
    cfg = tiny_cfg(sigma=0.25)
    fused, opt = _three_steps(cfg, lambda m: make_optimizer(m, 1e-3, 0.04))
    plain, _ = _three_steps(cfg, lambda m: torch.optim.AdamW(param_groups(m), lr=1e-3, foreach=False))
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in param_groups(fused)]
    if TorchVersion(torch.__version__) >= "2.4":  # torch has the fused kernel for CPU tensors
        assert all(g["fused"] for g in opt.param_groups)
    for a, b in zip(fused.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_saved_by_plain_adamw_resumes_in_the_fused_one(tiny_cfg):
    """A checkpoint's optimizer state and groups from the per-tensor AdamW load into the
    optimizer pretrain builds, which then takes the step the plain one would have taken."""
    cfg = tiny_cfg(sigma=0.0)
    model, plain = _three_steps(cfg, lambda m: torch.optim.AdamW(param_groups(m), lr=1e-3, foreach=False))
    saved = copy.deepcopy(plain.state_dict())
    twin = copy.deepcopy(model)
    resumed = make_optimizer(twin, 1e-3, 0.04)
    resumed.load_state_dict({**saved, "param_groups": use_fused_like(resumed, saved["param_groups"])})
    assert resumed.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
    for m, opt in ((model, plain), (twin, resumed)):
        for p in m.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        opt.step()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_saved_groups_take_the_current_kernel_choice(tiny_cfg):
    """A checkpoint's param groups written with (or without) the fused kernel load into an
    optimizer that chose otherwise, and keep their hyperparameters."""
    model = build_jepa(tiny_cfg().model)
    opt = make_optimizer(model, 1e-3, 0.04)
    groups = opt.state_dict()["param_groups"]
    saved = [{**g, "fused": not g.get("fused"), "foreach": True, "lr": 0.5} for g in groups]
    groups = use_fused_like(opt, saved)
    assert [g["fused"] for g in groups] == [opt.param_groups[0]["fused"]] * len(groups)
    assert [g["lr"] for g in groups] == [0.5] * len(groups)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_changes_no_weight_moment_or_ema_and_the_guard_names_it(tiny_cfg, poison):
    """The step does not wait to read its loss: a non-finite loss (or gradient) turns the step,
    and every step after it, into no update at all (weights, AdamW moments and step count, the
    EMA target), and the host hears of it when it next reads the guard."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_jepa(cfg.model).train()
    opt = make_optimizer(model, 1e-3, 0.04)
    sampler = MaskSampler(cfg.mask_config())
    gen = torch.Generator().manual_seed(0)
    ac = autocast_factory(torch.device("cpu"), "fp32")
    state = TrainState(model, opt, make_scaler(torch.device("cpu"), "fp32"), Nets.plain(model), ac)
    hp = Hyper(1e-3, 0.04, 0.996)
    train_step(state, _batch(cfg, sampler, gen, torch.randn(8, 3, 16, 16)), hp)
    state.guard.check(first_step=10)  # a good step: nothing to say
    weights = copy.deepcopy(model.state_dict())  # the target encoder's included
    moments = copy.deepcopy(opt.state_dict())
    images = torch.randn(8, 3, 16, 16)
    hook = None
    if poison == "loss":
        images[3, 0, 5, 5] = float("nan")  # one bad pixel poisons the loss through the real forward
    else:  # a finite loss whose gradient overflows
        hook = model.predictor.A.register_hook(lambda g: torch.full_like(g, float("inf")))
    train_step(state, _batch(cfg, sampler, gen, images), hp)
    if hook is not None:
        hook.remove()
    train_step(state, _batch(cfg, sampler, gen, torch.randn(8, 3, 16, 16)), hp)  # a good one after it
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    after = opt.state_dict()["state"]
    for key, saved in moments["state"].items():
        for field, value in saved.items():
            assert torch.equal(after[key][field], value), (key, field)
    what = "loss is nan" if poison == "loss" else "gradient norm is inf"
    with pytest.raises(NonFiniteLoss, match=what) as info:
        state.guard.check(first_step=10)
    assert info.value.step == 11  # the second step of those since step 10


@pytest.mark.parametrize("scaled", [False, True])
def test_clip_grad_clips_the_context_encoder_only(tiny_cfg, scaled):
    """As in the released StoP loop: the encoder's gradient norm is cut to `clip_grad`, the
    predictor's gradient is left as it is. With SGD at lr 1 and no decay, a step moves each
    weight by minus its (clipped) gradient; with a gradient scaler (fp16's path, here on the
    CPU) the gradients are unscaled before they are clipped."""
    cfg = tiny_cfg(sigma=0.25)
    torch.manual_seed(0)
    base = build_jepa(cfg.model).train()
    sampler, gen = MaskSampler(cfg.mask_config()), torch.Generator().manual_seed(0)
    batch = _batch(cfg, sampler, gen, torch.randn(4, 3, 16, 16))
    ac = autocast_factory(torch.device("cpu"), "fp32")

    def moves(clip):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(param_groups(model), lr=1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.manual_seed(1)  # the same noise draw in both steps
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
        _step(model, opt, batch, 1.0, 0.0, 1.0, ac, scaler, clip_grad=clip)
        return {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}

    free = moves(None)
    enc = [n for n in free if n.startswith("encoder.")]
    pred = [n for n in free if n.startswith("predictor.")]
    enc_norm = torch.linalg.vector_norm(torch.stack([free[n].norm() for n in enc]))
    clipped = moves(0.25 * enc_norm.item())
    for n in enc:
        torch.testing.assert_close(clipped[n], 0.25 * free[n], rtol=1e-4, atol=1e-7)
    for n in pred:
        torch.testing.assert_close(clipped[n], free[n])
    assert any(free[n].abs().sum() > 0 for n in pred)
