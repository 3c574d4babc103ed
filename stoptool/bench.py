"""`stoptool bench`: throughput of the training step, of feature extraction and of the mask
sampler, with FLOPs counted from the shapes and set against the device's own matmul rate.

With a preset (`--config`), the step timed is the one that preset trains, and its whole
schedule is projected from the measured rate: on one device, and on `--devices N` by linear
scaling.
"""

import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from functools import partial

import torch

from stoptool.config import BenchConfig, build_config, config_from_dict, read_config_file
from stoptool.data.datasets import open_dataset, train_images
from stoptool.data.device_decode import check_device, pretrain_transform
from stoptool.data.loader import SkipReport, pretrain_loader
from stoptool.data.prepare import available_cpus
from stoptool.dispatch import count_ops, labelled_step
from stoptool.errors import UserError
from stoptool.flops import encoder_flops, train_step_flops
from stoptool.masks import MaskSampler
from stoptool.models.encoder import encode
from stoptool.models.jepa import build_jepa
from stoptool.runs import schedule_steps
from stoptool.train.runtime import (
    Prepared,
    device_sync,
    eager_on_compile_failure,
    matmul_rate,
    matmul_size,  # noqa: F401 (part of bench's interface)
    prepare_model,
    resolve_device,
    resolve_precision,
    uncompile_blocks,
)
from stoptool.train.schedules import Hyper
from stoptool.train.step import StepInputs, compile_forward, single_process_state, train_step


def _timed(fn, device, steps: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, one median-ready number per repeat."""
    for _ in range(warmup):
        fn()
    device_sync(device)
    per_call = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        device_sync(device)
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
    if cfg.what == "data":
        return bench_data(cfg)
    if cfg.what == "finetune":  # its step, and pretraining's of the same arch beside it
        from stoptool.finetune.bench import bench_finetune

        return {**bench_finetune(cfg, _timed), "pretrain": bench(replace(cfg, what="train"))}
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier one's
    pcfg = _run_config(cfg)
    m = pcfg.model
    cfg = replace(cfg, img_size=m.img_size, pred_width=m.pred_width, pred_depth=m.pred_depth)
    torch.manual_seed(0)
    model = build_jepa(m).to(device)
    prepared = prepare_model(model, device, precision, cfg.attn, cfg.grad_checkpoint, cfg.compile,
                             training=cfg.what in ("train", "host"))
    result = {
        "what": cfg.what,
        **{k: v for k, v in asdict(cfg).items() if k != "what"},
        "precision": precision,
        "device": str(device),
        "attn": prepared.attn,
        "torch_threads": torch.get_num_threads(),
        "compiled": prepared.compiled,
        "cuda_graphs": (cfg.cuda_graphs and prepared.compiled and device.type == "cuda"
                        and cfg.what != "extract"),  # (a training step's, as --what train and host time it)
    }
    if prepared.compile_failure:
        result["compile_failed"] = prepared.compile_failure

    def compile_failed(reason: str) -> None:
        result.update(compiled=False, cuda_graphs=False, compile_failed=reason)

    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    work = _extract_work if cfg.what == "extract" else _train_work
    run, flops, facts, undo = work(cfg, pcfg, model, prepared, images)
    if cfg.what == "host":  # the labels are read by the profile alone; the timed steps run plain
        facts["labelled"] = labelled_step(run.state)
    if prepared.compiled:
        eager_run = run
        run = lambda: eager_on_compile_failure(eager_run, undo, compile_failed)  # noqa: E731
    graphs = compiled_graphs()
    try:
        seconds = _timed(run, device, cfg.steps, cfg.warmup, cfg.repeats)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"a batch of {cfg.batch_size} does not fit in the memory of {device}: time a smaller "
                        "one (--batch-size, or --devices N with --config)", key="batch_size") from None
    result.update(_summary(seconds, cfg.batch_size, "img"), **facts)
    if cfg.what == "host":
        return _host(result, run, prepared.compiled, graphs)
    if prepared.compiled:
        result["compiled_graphs"] = compiled_graphs() - graphs  # warm-up steps included
    result["peak_memory_mib"] = _peak_memory_mib(device)  # before the matmuls below add theirs
    result["flops_per_image"] = flops
    result["achieved_flops"] = flops * result["img_per_s"]
    rate = matmul_rate(device, precision)
    result["matmul_flops"] = rate
    result["share_of_matmul_rate"] = result["achieved_flops"] / rate
    if cfg.config and cfg.what == "train":
        result.update(projection(cfg, result["img_per_s"]))
    return result


MODEL_KEYS = ("arch", "img_size", "batch_size", "sigma", "pred_width", "pred_depth", "accum_steps",
              "mask_bucket")


def _host(result: dict, run, compiled: bool, graphs_before: int) -> dict:
    """`bench --what host`: one step's operators counted by origin (`stoptool/dispatch.py`), the
    host ms a step (the timed steps above), and with --compile the graphs it ran."""
    labelled = result.pop("labelled")
    # a compiled step is counted as it runs: the labels' hooks inside it would make it compile again
    with nullcontext() if compiled else labelled:
        counted = count_ops(run)
    result.update(ops_per_step=counted.total, ops_by_group=counted.by_group,
                  ops_by_name=dict(list(counted.by_op.items())[:12]))
    if compiled:
        result["compiled_graphs"] = compiled_graphs() - graphs_before
    return result


def _run_config(cfg: BenchConfig):
    """The pretraining config whose step is timed: the preset's (masks, predictor ablations)
    or pretrain's defaults, with the bench's model fields."""
    values = read_config_file(cfg.config) if cfg.config else {}
    values.update({k: getattr(cfg, k) for k in MODEL_KEYS})
    return config_from_dict(values).validate()


def projection(cfg: BenchConfig, img_per_s: float) -> dict:
    """The preset's whole schedule at `img_per_s` (images a second, one device): epochs ×
    iterations per epoch of its data set, each step its global batch. On `devices` devices the
    estimate scales linearly: each at this rate, nothing lost to communication or data loading."""
    run = build_config(cfg.config)
    d, o = run.data, run.optim
    size = train_images(d.dataset, d.subset, d.data_root)
    ipe = size // o.batch_size
    if ipe == 0:
        raise UserError(f"the preset's data set has {size:,} images, fewer than its batch of {o.batch_size}",
                        key="config")
    steps = schedule_steps(o.epochs, ipe, o.steps)
    hours = steps * o.batch_size / img_per_s / 3600
    return {"dataset": d.dataset, "dataset_images": size, "epochs": o.epochs, "iterations_per_epoch": ipe,
            "schedule_steps": steps, "global_batch": o.batch_size, "images_seen": steps * o.batch_size,
            "projected_hours": hours, "projected_hours_devices": hours / cfg.devices}


def _extract_work(cfg: BenchConfig, pcfg, model, prepared: Prepared, images):
    """Forward passes of the target encoder, pooled: what `stoptool probe` runs."""
    encoder = model.target_encoder.eval()

    def extract():
        with torch.inference_mode(), prepared.autocast():
            encode(encoder, images).mean(1)

    return extract, encoder_flops(cfg.arch, cfg.img_size), {}, lambda: uncompile_blocks(model)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _train_work(cfg: BenchConfig, pcfg, model, prepared: Prepared, images):
    """Whole training steps on one fixed batch and mask, or (`vary_masks`) with new masks
    drawn every step; a compiled step is compiled whole (one graph per shape with bucketing)."""
    sampler, gen = MaskSampler(pcfg.mask_config()), torch.Generator().manual_seed(0)
    state = single_process_state(model, prepared.autocast, prepared.precision, lr=1e-4, wd=0.04,
                                 accum_steps=cfg.accum_steps)
    if prepared.compiled:
        compile_forward(state, dynamic=False if cfg.mask_bucket else None,
                        cuda_graphs=cfg.cuda_graphs and images.device.type == "cuda")  # (a CPU: none)
    hp = Hyper(1e-4, 0.04, 0.996)
    model.train()
    shapes, facts = set(), {}

    def draw() -> StepInputs:
        ctx, tgt = sampler(cfg.batch_size, gen)
        shapes.add((ctx.shape[1], tgt.shape[2]))
        facts["mask_shapes"] = len(shapes)
        return StepInputs(images, ctx.to(images.device), tgt.to(images.device))

    batch = draw()
    counted = train_step_flops(cfg.arch, cfg.img_size, cfg.pred_width, cfg.pred_depth, batch.ctx_idx.shape[1],
                               batch.tgt_idx.shape[2], batch.tgt_idx.shape[1], cfg.sigma)
    facts.update(context_tokens=batch.ctx_idx.shape[1], target_tokens=batch.tgt_idx.shape[2])
    def step():
        return train_step(state, draw() if cfg.vary_masks else batch, hp)

    step.state = state
    return step, counted.total, facts, partial(setattr, state, "forward", None)


def bench_masks(cfg: BenchConfig) -> dict:
    """Batches per second of the multi-block sampler (one thread, as in a loader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pcfg = _run_config(cfg)
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


def bench_data(cfg: BenchConfig) -> dict:
    """Images per second of the pretraining input pipeline alone, as `pretrain` builds it for
    the bench's model, masks and augmentations: read, decode, crop, augment, sample masks,
    collate (and, with decode=gpu, decode on the device). Workers start before the timing."""
    pcfg = _run_config(cfg)
    cfg = replace(cfg, img_size=pcfg.model.img_size)
    device = resolve_device(cfg.device) if cfg.decode == "gpu" else torch.device("cpu")
    check_device(cfg.decode, device)
    data = open_dataset(cfg.dataset, "train", root=cfg.data_root)
    if len(data) < cfg.batch_size:
        raise UserError(f"'{cfg.dataset}' has {len(data):,} images, fewer than a batch of {cfg.batch_size}",
                        key="batch_size")
    loader = SkipReport(pretrain_loader(
        data, pretrain_transform(cfg.img_size, cfg), MaskSampler(pcfg.mask_config()), cfg.batch_size, 0, 0,
        cfg.warmup + cfg.steps * cfg.repeats + 1, workers=cfg.workers, pin_memory=device.type == "cuda"))
    batches, skipped = iter(loader), [0]

    def next_batch():
        images, _, _, n_skipped = next(batches)
        images.to(device)
        skipped[0] += n_skipped

    threads = torch.get_num_threads()
    if not cfg.workers and not cfg.threads:
        torch.set_num_threads(1)  # one thread, as in a loader worker
    try:
        seconds = _timed(next_batch, device, cfg.steps, max(cfg.warmup, 1), cfg.repeats)
    finally:
        torch.set_num_threads(threads)
    cores = min(max(cfg.workers, 1), available_cpus())
    out = {"what": "data", "dataset": cfg.dataset, "dataset_images": len(data), "img_size": cfg.img_size,
           "batch_size": cfg.batch_size, "workers": cfg.workers, "cores": cores, "decode": cfg.decode,
           "interpolation": cfg.interpolation, "crop_scale": list(cfg.crop_scale), "hflip": cfg.hflip,
           "blur": cfg.blur, "gray": cfg.gray, "device": str(device), "skipped": skipped[0],
           **_summary(seconds, cfg.batch_size, "img")}
    out["img_per_s_per_core"] = out["img_per_s"] / cores
    out["ms_per_batch"] = out.pop("ms_per_step")
    return out


# -- the table `stoptool bench` prints ------------------------------------------------------------


def table_rows(cfg: BenchConfig, r: dict) -> dict:
    """The measured figures `r` of `bench(cfg)`, row name -> text."""
    if cfg.what == "data":
        return _data_rows(r)
    if cfg.what == "finetune":
        from stoptool.finetune.bench import bench_rows

        return bench_rows(r)
    if cfg.what == "host":
        return _host_rows(cfg, r)
    if cfg.what == "masks":
        return {"grid": f"{r['grid']}×{r['grid']}", "batch": cfg.batch_size, "threads": 1,
                "batches/s": _spread(r, "batches_per_s"), "ms/batch": f"{r['ms_per_batch']:.2f}"}
    rows = {
        "what": cfg.what, "arch": f"{cfg.arch} @ {r['img_size']}px, batch {cfg.batch_size}",
        **({"predictor": f"{r['pred_depth']} × {r['pred_width']}"} if cfg.what == "train" else {}),
        "device": f"{r['device']} ({r['torch_threads']} threads)", "precision": r["precision"],
        "img/s": _spread(r, "img_per_s"), "ms/step": f"{r['ms_per_step']:.1f}",
        "GFLOP/image": f"{r['flops_per_image'] / 1e9:.2f}",
        "achieved": f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s",
        "matmul rate": f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s ({r['precision']})",
        "share of matmul rate": f"{100 * r['share_of_matmul_rate']:.1f} %",
        "peak memory": f"{r['peak_memory_mib']:.0f} MiB",
    }
    if "compile_failed" in r:
        rows["compile"] = f"unavailable, ran eagerly: {r['compile_failed']}"
    rows["attention"] = r["attn"]
    if cfg.vary_masks and "mask_shapes" in r:
        rows["mask shapes met"] = r["mask_shapes"]
    if "compiled_graphs" in r:
        rows["graphs compiled"] = r["compiled_graphs"]
    if cfg.accum_steps > 1:
        rows["micro-batches"] = f"{cfg.accum_steps} of {cfg.batch_size // cfg.accum_steps}"
    if "projected_hours" in r:
        rows.update(_projection_rows(cfg, r))
    return rows


def _host_rows(cfg: BenchConfig, r: dict) -> dict:
    rows = {"arch": f"{cfg.arch} @ {r['img_size']}px, batch {cfg.batch_size}",
            "predictor": f"{r['pred_depth']} × {r['pred_width']}",
            "device": f"{r['device']} ({r['torch_threads']} threads)", "precision": r["precision"],
            "operators a step": f"{r['ops_per_step']:,}"}
    rows.update({f"  {group}": n for group, n in r["ops_by_group"].items()})
    rows["most dispatched"] = ", ".join(f"{name[6:]} {n}" for name, n in list(r["ops_by_name"].items())[:6])
    rows["ms/step"] = f"{r['ms_per_step']:.1f} (min {1000 * cfg.batch_size / r['img_per_s_max']:.1f})"
    if "compiled_graphs" in r:
        rows["graphs compiled"] = r["compiled_graphs"]
    if "compile_failed" in r:
        rows["compile"] = f"unavailable, ran eagerly: {r['compile_failed']}"
    return rows


def _spread(r: dict, name: str) -> str:
    """The median of repeats with their min and max: `123.4 (min 120.0, max 125.1)`."""
    return f"{r[name]:.1f} (min {r[name + '_min']:.1f}, max {r[name + '_max']:.1f})"


def _data_rows(r: dict) -> dict:
    workers = f"{r['workers']} workers" if r["workers"] else "main process"
    return {
        "what": "data (the pretraining input pipeline)",
        "dataset": f"{r['dataset']} ({r['dataset_images']:,} images)",
        "pipeline": f"{r['img_size']} px crops of {r['crop_scale'][0]}–{r['crop_scale'][1]}, "
                    f"{r['interpolation']}, decode on {r['decode']}; masks and collate",
        "batch": f"{r['batch_size']}, {workers} ({r['cores']} core{'s' if r['cores'] > 1 else ''})",
        "img/s": _spread(r, "img_per_s"),
        "img/s per core": f"{r['img_per_s_per_core']:.1f}",
        "ms/batch": f"{r['ms_per_batch']:.1f}",
        **({"skipped": f"{r['skipped']} unreadable"} if r["skipped"] else {}),
    }


def _projection_rows(cfg: BenchConfig, r: dict) -> dict:
    """A preset's whole schedule at the measured rate, as `bench --config` prints it."""
    data = r["dataset"] + (" (ImageNet-1k train)" if r["dataset"] == "imagenet" else "")
    rows = {
        "preset": cfg.config,
        "schedule": f"{r['epochs']:,} epochs × {r['iterations_per_epoch']:,} steps = {r['schedule_steps']:,} "
                    f"steps of {r['global_batch']:,} images ({r['images_seen']:,} images)",
        "data": f"{data}: {r['dataset_images']:,} training images",
        "projected, 1 device": f"{_duration(r['projected_hours'])} at the img/s above",
    }
    if cfg.devices > 1:
        rows[f"projected, {cfg.devices} devices"] = (
            f"{_duration(r['projected_hours_devices'])}: a linear-scaling estimate ({cfg.devices} × the "
            "img/s above; communication not counted)")
    rows["not counted"] = "data loading, checkpoints, evaluation, start-up"
    return rows


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:,.1f} h" + (f" ({hours / 24:,.1f} days)" if hours >= 48 else "")
