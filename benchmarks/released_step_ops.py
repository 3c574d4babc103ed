"""The operators a released-style StoP training step dispatches, beside stoptool's, at one shape.

    python benchmarks/released_step_ops.py [--arch vit_t2] [--img-size 16] [--batch-size 2]
                                           [--pred-depth 6] [--pred-width 48] [--precision fp32]

The released step is rebuilt from the reference modules of `tests/io/test_import.py` (the
released ViT and predictor, parameters in the released order, without the dropout layers the
released blocks call at rate 0, so the count here is a lower bound for the released code): the
target encoder under no_grad, layer norm, the targets gathered per mask; the context encoder and
the predictor (StoP: each target mask's positions plus the embedded noise); smooth-L1;
backward; AdamW over the released four groups, zero_grad; then the EMA as the released loop
writes it, one weight at a time. Both steps use the same masks (4 target blocks, 1 context
block) and are counted as `stoptool bench --what host` counts (`stoptool/dispatch.py`): the
`aten::` operators no other encloses. Prints one JSON line.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from stoptool.config import config_from_dict
from stoptool.dispatch import count_ops
from stoptool.masks import MaskSampler
from stoptool.models.archs import parse_arch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "io"))
from test_import import OfficialPredictor, OfficialViT, apply_masks  # noqa: E402


def released_step(args):
    spec, patch = parse_arch(args.arch)
    grid = args.img_size // patch
    torch.manual_seed(0)
    encoder = OfficialViT(args.img_size, patch, spec.width, spec.depth, spec.heads)
    predictor = OfficialPredictor(grid * grid, spec.width, args.pred_width, args.pred_depth, spec.heads,
                                  stop=True)
    target = OfficialViT(args.img_size, patch, spec.width, spec.depth, spec.heads)
    target.load_state_dict(encoder.state_dict())
    target.requires_grad_(False)

    def decayed(name, p):
        return "bias" not in name and p.ndim != 1

    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in encoder.named_parameters() if decayed(n, p)]},
        {"params": [p for n, p in predictor.named_parameters() if decayed(n, p)]},
        {"params": [p for n, p in encoder.named_parameters() if not decayed(n, p)], "weight_decay": 0},
        {"params": [p for n, p in predictor.named_parameters() if not decayed(n, p)], "weight_decay": 0},
    ], lr=1e-4)
    cfg = config_from_dict(dict(arch=args.arch, img_size=args.img_size)).validate()
    ctx, tgt = MaskSampler(cfg.mask_config())(args.batch_size, torch.Generator().manual_seed(0))
    masks_enc, masks_pred = [ctx], [tgt[:, m] for m in range(tgt.shape[1])]
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    m = 0.996

    def step():
        with torch.no_grad():
            h = target(images)
            h = F.layer_norm(h, (h.size(-1),))
            h = apply_masks(h, masks_pred)
        noise = [torch.randn(args.batch_size, p.shape[1], spec.width) * 0.25 for p in masks_pred]
        z = predictor(encoder(images, masks_enc), masks_enc, masks_pred, noise)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for param_q, param_k in zip(encoder.parameters(), target.parameters(), strict=True):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        return loss

    return step


def stoptool_step(args):
    from stoptool.bench import _run_config, _train_work
    from stoptool.config import BenchConfig
    from stoptool.models.jepa import build_jepa
    from stoptool.train.runtime import prepare_model

    cfg = BenchConfig(arch=args.arch, img_size=args.img_size, batch_size=args.batch_size,
                      pred_depth=args.pred_depth, pred_width=args.pred_width, precision=args.precision,
                      what="host")
    pcfg = _run_config(cfg)
    torch.manual_seed(0)
    model = build_jepa(pcfg.model)
    device = torch.device("cpu")
    prepared = prepare_model(model, device, args.precision, "auto", False, False, training=True)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    run, *_ = _train_work(cfg, pcfg, model, prepared, images)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_t2")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--pred-depth", type=int, default=6)
    parser.add_argument("--pred-width", type=int, default=48)
    parser.add_argument("--precision", default="fp32", choices=["fp32"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {"shape": vars(args)}
    for name, build in (("released", released_step), ("stoptool", stoptool_step)):
        step = build(args)
        for _ in range(3):  # warm-up: the optimizer's state exists, caches are filled
            step()
        counted = count_ops(step)
        out[name] = {"ops_per_step": counted.total, "by_group": counted.by_group,
                     "top": dict(list(counted.by_op.items())[:8])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
