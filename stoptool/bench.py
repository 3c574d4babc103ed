"""`stoptool bench`: throughput of the training step, of feature extraction and of the mask
sampler, with FLOPs counted from the shapes and set against the device's own matmul rate.
"""

import resource
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from stoptool.config import PretrainConfig
from stoptool.flops import encoder_flops, train_step_flops
from stoptool.masks import MaskSampler
from stoptool.models.encoder import encode
from stoptool.models.jepa import build_jepa
from stoptool.train.runtime import (
    DTYPES,
    attention_impl,
    autocast_factory,
    compile_blocks,
    eager_on_compile_failure,
    resolve_device,
    resolve_precision,
    set_attention,
)
from stoptool.train.step import StepInputs, make_optimizer, train_step


@dataclass
class BenchConfig:
    arch: str = "vit_s16"
    img_size: int | None = None  # the arch's pretraining default: 224, or 8 patches a side
    batch_size: int = 16
    precision: str = "auto"
    device: str = "auto"
    steps: int = 5
    warmup: int = 2
    repeats: int = 3
    what: str = "train"  # train | extract | masks
    pred_width: int | None = None  # None: what `stoptool pretrain` uses for the arch
    pred_depth: int | None = None
    sigma: float = 0.25
    attn: str = "auto"  # auto | sdpa | math (plain matmul attention, as the released code)
    grad_checkpoint: bool = False
    compile: bool = False
    threads: int | None = None


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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.what == "masks":
        return bench_masks(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier one's
    pcfg = PretrainConfig(
        arch=cfg.arch,
        img_size=cfg.img_size,
        batch_size=cfg.batch_size,
        sigma=cfg.sigma,
        pred_width=cfg.pred_width,
        pred_depth=cfg.pred_depth,
    ).validate()
    torch.manual_seed(0)
    cfg = replace(cfg, img_size=pcfg.img_size, pred_width=pcfg.pred_width, pred_depth=pcfg.pred_depth)
    model = build_jepa(pcfg).to(device)
    attn = attention_impl(cfg.attn, device, precision, training=cfg.what == "train")
    set_attention(model, attn)
    if cfg.grad_checkpoint:
        model.encoder.set_grad_checkpointing(True)
        model.predictor.grad_checkpointing = True
    autocast = autocast_factory(device, precision)
    compile_note = compile_blocks(model, autocast) if cfg.compile else None
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    result = {
        "what": cfg.what,
        **{k: v for k, v in asdict(cfg).items() if k != "what"},
        "precision": precision,
        "device": str(device),
        "attn": attn,
        "torch_threads": torch.get_num_threads(),
        "compiled": cfg.compile and compile_note is None,
    }
    if compile_note:
        result["compile_failed"] = compile_note

    def compile_failed(reason: str) -> None:
        result.update(compiled=False, compile_failed=reason)

    def guarded(fn):
        """`fn`, falling back to eager blocks if torch.compile fails in its first calls."""
        return (lambda: eager_on_compile_failure(fn, model, compile_failed)) if result["compiled"] else fn

    if cfg.what == "extract":
        encoder = model.target_encoder.eval()

        def extract():
            with torch.inference_mode(), autocast():
                encode(encoder, images).mean(1)

        seconds = _timed(guarded(extract), device, cfg.steps, cfg.warmup, cfg.repeats)
        flops = encoder_flops(cfg.arch, cfg.img_size)
        result.update(_summary(seconds, cfg.batch_size, "img"))
    else:
        sampler = MaskSampler(pcfg.mask_config())
        ctx, tgt = sampler(cfg.batch_size, torch.Generator().manual_seed(0))
        inputs = StepInputs(images, ctx.to(device), tgt.to(device))
        optimizer = make_optimizer(model, 1e-4, 0.04)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        model.train()

        def step():
            train_step(model, optimizer, inputs, 1e-4, 0.04, 0.996, autocast, scaler)

        seconds = _timed(guarded(step), device, cfg.steps, cfg.warmup, cfg.repeats)
        counted = train_step_flops(
            cfg.arch,
            cfg.img_size,
            cfg.pred_width,
            cfg.pred_depth,
            ctx.shape[1],
            tgt.shape[2],
            tgt.shape[1],
            cfg.sigma,
        )
        flops = counted.total
        result.update(_summary(seconds, cfg.batch_size, "img"))
        result.update(context_tokens=ctx.shape[1], target_tokens=tgt.shape[2])
    result["peak_memory_mib"] = _peak_memory_mib(device)  # before the matmuls below add theirs
    result["flops_per_image"] = flops
    result["achieved_flops"] = flops * result["img_per_s"]
    rate = matmul_rate(device, precision)
    result["matmul_flops"] = rate
    result["share_of_matmul_rate"] = result["achieved_flops"] / rate
    return result


def bench_masks(cfg: BenchConfig) -> dict:
    """Batches per second of the multi-block sampler (one thread, as in a loader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pcfg = PretrainConfig(arch=cfg.arch, img_size=cfg.img_size).validate()
        cfg = replace(cfg, img_size=pcfg.img_size)
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
        "grid": pcfg.grid,
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
