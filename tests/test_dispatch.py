"""What a training step dispatches (`stoptool bench --what host`): a guard on the operator
count docs/performance.md states, and the single-process backward that spares the engine's
per-weight accumulation, checked against `loss.backward()`."""

import torch

from stoptool.bench import _run_config, _train_work
from stoptool.config import BenchConfig
from stoptool.dispatch import GROUPS, count_ops, labelled_step
from stoptool.models.jepa import build_jepa
from stoptool.train.distributed import Nets
from stoptool.train.runtime import autocast_factory, prepare_model
from stoptool.train.step import StepInputs, jepa_loss

# docs/performance.md, "What a step asks of the host": ViT-B/16's 12 blocks (vit_t2 at 16 px)
# with the paper's 6-block predictor, eager, batch 2; in bf16 with the fused attention a GPU runs
STATED_OPS = 1367
STATED_BF16_OPS = 1449


def _step(precision: str = "fp32", attn: str = "auto", **kw):
    cfg = BenchConfig(arch="vit_t2", img_size=16, batch_size=2, pred_depth=6, pred_width=48,
                      precision=precision, attn=attn, what="host", **kw)
    pcfg = _run_config(cfg)
    torch.manual_seed(0)
    model = build_jepa(pcfg.model)
    prepared = prepare_model(model, torch.device("cpu"), precision, attn, False, False, training=True)
    run, *_ = _train_work(cfg, pcfg, model, prepared, torch.randn(2, 3, 16, 16))
    run()  # the optimizer's state exists after the first step
    return run


def test_a_step_dispatches_no_more_operators_than_the_docs_state():
    run = _step()
    with labelled_step(run.state):
        counted = count_ops(run)
    assert counted.total <= STATED_OPS, counted.by_op
    assert list(counted.by_group) == list(GROUPS) and sum(counted.by_group.values()) == counted.total
    # every part of the step is found where it runs: 12 blocks on each side, 6 in the predictor
    g = counted.by_group
    assert g["encoder"] >= 12 * 6 and g["target"] >= 12 * 6 and g["predictor"] >= 6 * 6
    assert g["backward"] > g["encoder"] and 0 < g["optimizer"] < 20 and 0 < g["ema"] < 20
    assert "aten::dropout" not in counted.by_op  # no dropout calls at rate 0
    unlabelled = count_ops(run)  # the labels change the grouping, not the operators
    assert unlabelled.total == counted.total and unlabelled.by_group["encoder"] == 0


def test_a_bf16_step_dispatches_at_most_a_tenth_more_than_fp32():
    fp32 = count_ops(_step()).total
    bf16 = count_ops(_step("bf16", "sdpa"))
    assert bf16.total <= STATED_BF16_OPS and bf16.total <= 1.1 * fp32, bf16.by_op
    # the weights are cast once a step, not at each call: the backward widens no weight's gradient
    assert bf16.by_op.get("aten::to", 0) < 100 and bf16.by_op["aten::_foreach_copy_"] >= 2


def test_single_process_backward_puts_the_bits_of_loss_backward_in_grad(tiny_cfg):
    cfg = tiny_cfg(sigma=0.25, pred_depth=2)
    torch.manual_seed(0)
    a = build_jepa(cfg.model).train()
    b = build_jepa(cfg.model).train()
    b.load_state_dict(a.state_dict())
    fp32 = autocast_factory(torch.device("cpu"), "fp32")
    gen = torch.Generator().manual_seed(0)
    from stoptool.masks import MaskSampler

    sampler = MaskSampler(cfg.mask_config())
    batches = []
    for _ in range(2):  # two micro-batches: the second adds into the first's gradients
        ctx, tgt = sampler(4, gen)
        batches.append(StepInputs(torch.randn(4, 3, 16, 16, generator=gen), ctx, tgt))
    for batch in batches:
        torch.manual_seed(1)  # StoP's noise, the same draw for both
        jepa_loss(Nets.plain(a), batch, fp32).backward()
        torch.manual_seed(1)
        Nets.plain(b).backward(jepa_loss(Nets.plain(b), batch, fp32))
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True)]
    assert sum(g is not None for _, g, _ in grads) > 50
    for name, ga, gb in grads:
        assert (ga is None) == (gb is None), name
        if ga is not None:
            assert torch.equal(ga, gb), name
            assert ga.stride() == gb.stride(), name  # the layout the optimizer reads
