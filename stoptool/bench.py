"""`stoptool bench`: throughput of the training step, of feature extraction and of the mask
sampler, with FLOPs counted from the shapes and set against the device's own matmul rate.
"""

import resource
import statistics
import time
from dataclasses import asdict, replace

import torch

from stoptool.config import BenchConfig, config_from_dict
from stoptool.flops import encoder_flops, train_step_flops
from stoptool.masks import MaskSampler
from stoptool.models.encoder import encode
from stoptool.models.jepa import build_jepa
from stoptool.train.runtime import (
    DTYPES,
    Prepared,
    eager_on_compile_failure,
    prepare_model,
    resolve_device,
    resolve_precision,
)
from stoptool.train.schedules import Hyper
from stoptool.train.step import StepInputs, single_process_state, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_size(seconds_at_256: float, largest: int, most_seconds: float = 1.0) -> int:
    """The side of the square matmuls that measure the rate: `largest`, unless one product
    would take over `most_seconds` (a product 2× wider takes 8× longer), judged from one
    256² product. bf16 on a CPU without bf16 instructions runs at about 1 GFLOP/s or less: 54 s
    a 2048² product on an AVX2 machine, 0.2 s a 512² one."""
    n, seconds = 256, seconds_at_256
    while n < largest and seconds * 8 <= most_seconds:
        n, seconds = 2 * n, seconds * 8
    return n


def matmul_rate(device: torch.device, precision: str, n: int | None = None, reps: int = 10) -> float:
    """The device's measured dense matmul rate (FLOP/s) in this precision: 2048² matmuls on a
    CPU, 8192² on a GPU (smaller ones leave a GPU's tensor cores part idle), smaller where
    these would take over a second each (see `matmul_size`); at most `reps` products a timing,
    fewer where they take over 0.05 s each, best of 3 timings."""
    dtype = DTYPES[precision]

    def product(side: int):
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        return lambda: a @ b

    def seconds_of_one(run) -> float:  # after a first, untimed call
        run()
        _sync(device)
        t = time.perf_counter()
        run()
        _sync(device)
        return time.perf_counter() - t

    if n is None:
        n = matmul_size(seconds_of_one(product(256)), 8192 if device.type == "cuda" else 2048)
    run = product(n)
    reps = max(1, min(reps, int(0.5 / max(seconds_of_one(run), 1e-9))))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            run()
        _sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def _timed(fn, device, steps: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, one median-ready number per repeat."""
    for _ in range(warmup):
        fn()
    _sync(device)
    per_call = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        per_call.append((time.perf_counter() - t) / steps)
    return per_call


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, KiB on Linux


def _summary(seconds: list[float], items: int, unit: str) -> dict:
    med = statistics.median(seconds)
    return {
        f"{unit}_per_s": items / med,
        f"{unit}_per_s_min": items / max(seconds),
        f"{unit}_per_s_max": items / min(seconds),
        "ms_per_step": 1000 * med,
    }


def bench(cfg: BenchConfig) -> dict:
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.what == "masks":
        return bench_masks(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier one's
    model_keys = ("arch", "img_size", "batch_size", "sigma", "pred_width", "pred_depth")
    pcfg = config_from_dict({k: getattr(cfg, k) for k in model_keys}).validate()
    m = pcfg.model
    cfg = replace(cfg, img_size=m.img_size, pred_width=m.pred_width, pred_depth=m.pred_depth)
    torch.manual_seed(0)
    model = build_jepa(m).to(device)
    prepared = prepare_model(model, device, precision, cfg.attn, cfg.grad_checkpoint, cfg.compile,
                             training=cfg.what == "train")
    result = {
        "what": cfg.what,
        **{k: v for k, v in asdict(cfg).items() if k != "what"},
        "precision": precision,
        "device": str(device),
        "attn": prepared.attn,
        "torch_threads": torch.get_num_threads(),
        "compiled": prepared.compiled,
    }
    if prepared.compile_failure:
        result["compile_failed"] = prepared.compile_failure

    def compile_failed(reason: str) -> None:
        result.update(compiled=False, compile_failed=reason)

    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    work = _extract_work if cfg.what == "extract" else _train_work
    run, flops, facts = work(cfg, pcfg, model, prepared, images)
    if prepared.compiled:
        eager_run = run
        run = lambda: eager_on_compile_failure(eager_run, model, compile_failed)  # noqa: E731
    seconds = _timed(run, device, cfg.steps, cfg.warmup, cfg.repeats)
    result.update(_summary(seconds, cfg.batch_size, "img"), **facts)
    result["peak_memory_mib"] = _peak_memory_mib(device)  # before the matmuls below add theirs
    result["flops_per_image"] = flops
    result["achieved_flops"] = flops * result["img_per_s"]
    rate = matmul_rate(device, precision)
    result["matmul_flops"] = rate
    result["share_of_matmul_rate"] = result["achieved_flops"] / rate
    return result


def _extract_work(cfg: BenchConfig, pcfg, model, prepared: Prepared, images):
    """Forward passes of the target encoder, pooled: what `stoptool probe` runs."""
    encoder = model.target_encoder.eval()

    def extract():
        with torch.inference_mode(), prepared.autocast():
            encode(encoder, images).mean(1)

    return extract, encoder_flops(cfg.arch, cfg.img_size), {}


def _train_work(cfg: BenchConfig, pcfg, model, prepared: Prepared, images):
    """Whole training steps on one fixed batch and mask."""
    ctx, tgt = MaskSampler(pcfg.mask_config())(cfg.batch_size, torch.Generator().manual_seed(0))
    batch = StepInputs(images, ctx.to(images.device), tgt.to(images.device))
    state = single_process_state(model, prepared.autocast, prepared.precision, lr=1e-4, wd=0.04)
    hp = Hyper(1e-4, 0.04, 0.996)
    model.train()
    counted = train_step_flops(cfg.arch, cfg.img_size, cfg.pred_width, cfg.pred_depth, ctx.shape[1],
                               tgt.shape[2], tgt.shape[1], cfg.sigma)
    facts = {"context_tokens": ctx.shape[1], "target_tokens": tgt.shape[2]}
    return (lambda: train_step(state, batch, hp)), counted.total, facts


def bench_masks(cfg: BenchConfig) -> dict:
    """Batches per second of the multi-block sampler (one thread, as in a loader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pcfg = config_from_dict({"arch": cfg.arch, "img_size": cfg.img_size}).validate()
        cfg = replace(cfg, img_size=pcfg.model.img_size)
        sampler = MaskSampler(pcfg.mask_config())
        gen = torch.Generator().manual_seed(0)
        seconds = _timed(
            lambda: sampler(cfg.batch_size, gen),
            torch.device("cpu"),
            max(cfg.steps, 20),
            cfg.warmup,
            cfg.repeats,
        )
    finally:
        torch.set_num_threads(threads)
    out = {
        "what": "masks",
        "arch": cfg.arch,
        "img_size": cfg.img_size,
        "grid": pcfg.model.grid,
        "batch_size": cfg.batch_size,
        "threads": 1,
    }
    med = statistics.median(seconds)
    out.update(
        batches_per_s=1 / med,
        batches_per_s_min=1 / max(seconds),
        batches_per_s_max=1 / min(seconds),
        ms_per_batch=1000 * med,
    )
    return out
