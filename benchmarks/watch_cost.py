"""What watching a run costs: the health metrics of a logged step, and one online k-NN.

    python benchmarks/watch_cost.py [--rounds 20] [--set KEY=VALUE ...]

On the default demo's setting (digits, vit_t4 @ 32, predictor 2 × 96, batch 64, precision
auto), it times training steps without and with what a logged step adds (the pooled target
features kept, the gradient norm, rankme, feature_std, the MFU arithmetic), alternating the
two, and one online k-NN over digits' 1,347 + 450 images. Prints JSON.
"""

import argparse
import json
import statistics
import time

import torch

from stoptool.config import build_config, parse_set
from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.distributed import World
from stoptool.train.runtime import prepare_model, resolve_device, resolve_precision
from stoptool.train.schedules import Hyper
from stoptool.train.step import StepInputs, single_process_state, train_step
from stoptool.train.watch import Watch, online_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], dest="items")
    args = ap.parse_args()
    cfg = build_config(None, parse_set(args.items))
    device = resolve_device(cfg.runtime.device)
    precision = resolve_precision(cfg.runtime.precision, device)
    torch.manual_seed(0)
    model = build_jepa(cfg.model).to(device)
    prepared = prepare_model(model, device, precision, cfg.runtime.attn)
    state = single_process_state(model, prepared.autocast, precision)
    b = cfg.optim.batch_size
    ctx, tgt = MaskSampler(cfg.mask_config())(b, torch.Generator().manual_seed(0))
    side = cfg.model.img_size
    batch = StepInputs(torch.randn(b, 3, side, side, device=device), ctx.to(device), tgt.to(device))
    hp = Hyper(1e-4, 0.04, 0.996)
    watch = Watch(flops=lambda c, t: 1.0, matmul_rate=1.0)

    def plain() -> float:
        batch.measure = False
        t = time.perf_counter()
        train_step(state, batch, hp)
        return time.perf_counter() - t

    def logged() -> float:
        batch.measure = True
        t = time.perf_counter()
        measured = train_step(state, batch, hp)
        watch.health(measured, {"img_per_s": 1.0}, batch)
        return time.perf_counter() - t

    for _ in range(3):
        plain(), logged()
    times = {"plain": [], "logged": []}
    for _ in range(args.rounds):
        times["plain"].append(plain())
        times["logged"].append(logged())
    step = statistics.median(times["plain"])
    extra = statistics.median(times["logged"]) - step
    evaluate = online_eval(cfg, _train_set(cfg), World(), device, precision)
    start = time.perf_counter()
    knn = evaluate(state.nets) if evaluate else {}
    knn_s = time.perf_counter() - start
    images = len(evaluate.evalset.train_idx) + len(evaluate.evalset.test_idx) if evaluate else None
    print(json.dumps({
        "precision": precision, "step_s": step, "logged_step_extra_s": extra,
        "share_at_log_every": {n: extra / (n * step) for n in (1, 10, 50)},
        "knn_s": knn_s, "knn": knn, "eval_images": images,
    }, indent=1))


def _train_set(cfg):
    from stoptool.data.datasets import open_dataset

    return open_dataset(cfg.data.dataset, "train", cfg.data.subset, root=cfg.data.data_root)


if __name__ == "__main__":
    main()
