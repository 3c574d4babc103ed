"""The training step learns, and the target encoder follows the online one by EMA."""

import torch

from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.runtime import autocast_factory
from stoptool.train.step import StepInputs, ema_update, param_groups, train_step


def _batch(cfg, sampler, gen, images):
    ctx, tgt = sampler(images.size(0), gen)
    return StepInputs(images, ctx, tgt)


def test_twenty_steps_lower_the_loss(tiny_cfg):
    cfg = tiny_cfg(sigma=0.25)
    torch.manual_seed(0)
    model = build_jepa(cfg).train()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    sampler = MaskSampler(cfg.mask_config())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 16, 16)  # a fixed tiny set of random images
    ac = autocast_factory(torch.device("cpu"), "fp32")
    losses = [
        train_step(model, opt, _batch(cfg, sampler, gen, images), 1e-3, 0.04, 0.996, ac) for _ in range(20)
    ]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_target_encoder_moves_toward_online_at_the_scheduled_momentum(tiny_cfg):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_jepa(cfg).train()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
    sampler = MaskSampler(cfg.mask_config())
    gen = torch.Generator().manual_seed(0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    m = 0.9
    ac = autocast_factory(torch.device("cpu"), "fp32")
    train_step(model, opt, _batch(cfg, sampler, gen, torch.randn(8, 3, 16, 16)), 1e-2, 0.0, m, ac)
    online = list(model.encoder.parameters())
    after = list(model.target_encoder.parameters())
    moved = 0
    for b, o, a in zip(before, online, after):
        assert torch.allclose(a, m * b + (1 - m) * o, atol=1e-6)
        moved += int(not torch.equal(a, o))
    assert moved > 0  # the target differs from the online encoder
    assert all(not p.requires_grad for p in model.target_encoder.parameters())


def test_ema_momentum_one_keeps_target_fixed(tiny_cfg):
    model = build_jepa(tiny_cfg())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    ema_update(model, 1.0)
    assert all(torch.equal(b, a) for b, a in zip(before, model.target_encoder.parameters()))


def test_weight_decay_skips_biases_and_1d(tiny_cfg):
    model = build_jepa(tiny_cfg())
    decay, no_decay = param_groups(model)
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.predictor.mask_token for p in decay["params"])
    assert not any(p is model.encoder.pos_embed for g in (decay, no_decay) for p in g["params"])
