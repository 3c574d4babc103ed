"""The cost of a preset's whole schedule, from its shapes: what docs/reproducing-imagenet.md tabulates.

    python benchmarks/cost_table.py                       # every ImageNet preset, FLOPs and time
    python benchmarks/cost_table.py --memory              # and memory per GPU, counted on the CPU
    python benchmarks/cost_table.py --check-memory        # the memory count against the H200 rows

Per preset and per-GPU batch B (the paper's: 64 a GPU for the StoP rows, trained on 32 GPUs;
128 for I-JEPA's ViT-H/14 on 16):
- images seen: epochs × (1,281,167 // global batch) × global batch;
- FLOPs per image: `stoptool.flops.train_step_flops` at the mask sizes the sampler draws for a
  batch of B (the mean over 200 seeded batches: within a batch masks are cut to the shortest);
- GPU-hours at a stated achieved rate (`--tflops`, per GPU): total FLOPs / rate;
- with --memory, peak memory per GPU, projected (not measured): fp32 weights of the three
  networks, AdamW's two moments and the gradients of the trained ones, plus B × the bytes of
  the activations that one image's step keeps for its backward, counted with autograd's
  saved-tensor hooks on the CPU under bf16 autocast (each storage once).
"""

import argparse
import statistics

import torch

from stoptool.config import build_config, config_from_dict
from stoptool.data.datasets import TRAIN_IMAGES
from stoptool.flops import train_step_flops
from stoptool.masks import MaskSampler
from stoptool.models.jepa import build_jepa
from stoptool.train.runtime import prepare_model
from stoptool.train.step import StepInputs, jepa_loss, single_process_state

PRESETS = {  # preset -> the paper's batch per GPU
    "stop-vitb16-in1k": 64, "stop-vitl16-in1k": 64, "stop-vith14-in1k": 64, "stop-vith16-in1k": 64,
    "ijepa-vith14-in1k": 128, "stop-vits16-in1k-ep60": 128,
}
GIB = 2**30


def masks_at(cfg, batch: int, seed: int):
    return MaskSampler(cfg.mask_config())(batch, torch.Generator().manual_seed(seed))


def mean_flops(cfg, batch: int, draws: int = 200) -> float:
    m = cfg.model
    totals = []
    for seed in range(draws):
        ctx, tgt = masks_at(cfg, batch, seed)
        totals.append(train_step_flops(m.arch, m.img_size, m.pred_width, m.pred_depth, ctx.shape[1],
                                       tgt.shape[2], tgt.shape[1], m.sigma).total)
    return statistics.mean(totals)


def static_bytes(model) -> int:
    """fp32 weights of the three networks; gradients and AdamW's two moments of the trained two."""
    weights = sum(p.numel() for p in model.parameters()) * 4
    trained = sum(p.numel() for part in (model.encoder, model.predictor) for p in part.parameters()) * 4
    return weights + 3 * trained


def saved_bytes(cfg, batch: int, counted: int) -> int:
    """Bytes autograd keeps for the backward of a step on `counted` images, with masks drawn
    for a batch of `batch` (seed 0, the bench's), under bf16 autocast on the CPU; each storage
    once, the fp32 weights not (they are counted apart)."""
    torch.manual_seed(0)
    model = build_jepa(cfg.model)
    prepared = prepare_model(model, torch.device("cpu"), "bf16", attn="sdpa")
    state = single_process_state(model, prepared.autocast, "bf16")
    ctx, tgt = masks_at(cfg, batch, 0)
    size = cfg.model.img_size
    inputs = StepInputs(torch.randn(counted, 3, size, size), ctx[:counted], tgt[:counted])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        jepa_loss(state.nets, inputs, state.autocast)
    return sum(seen.values())


def projected_peak_gib(cfg, batch: int, batches: tuple[int, ...] | None = None) -> list[float]:
    """Weights and optimizer state, plus what the backward keeps: counted on 2 and 4 images
    (masks drawn for a batch of `batch`), whose difference is the part that grows with the batch
    (the rest, the bf16 copies of the weights that autocast makes once a step, does not); at
    each of `batches` (default: `batch`)."""
    two, four = saved_bytes(cfg, batch, 2), saved_bytes(cfg, batch, 4)
    per_image = (four - two) / 2
    once = two - 2 * per_image
    fixed = static_bytes(build_jepa(cfg.model)) + once
    return [(fixed + b * per_image) / GIB for b in batches or (batch,)]


def table(args) -> None:
    head = "| preset | per-GPU batch | images seen | GFLOP/image | total EFLOP | GPU-hours at {:g} TFLOP/s |"
    cols = head.format(args.tflops)
    if args.memory:
        cols += " memory per GPU at that batch, projected | at 256 a GPU (8 GPUs), projected |"
    print(cols)
    print("|---" * (cols.count("|") - 1) + "|")
    for preset in args.presets or PRESETS:
        batch = PRESETS[preset]
        cfg = build_config(preset)
        o = cfg.optim
        images = o.epochs * (TRAIN_IMAGES["imagenet"] // o.batch_size) * o.batch_size
        per_image = mean_flops(cfg, batch)
        total = images * per_image
        hours = total / (args.tflops * 1e12) / 3600
        row = (f"| {preset} | {batch} | {images / 1e6:,.0f} M | {per_image / 1e9:,.0f} | "
               f"{total / 1e18:,.0f} | {hours:,.0f} |")
        if args.memory:
            at_batch, at_256 = projected_peak_gib(cfg, batch, (batch, 256))
            row += f" {at_batch:.0f} GiB | {at_256:.0f} GiB |"
        print(row, flush=True)


# The H200 rows of docs/performance.md (2026-11-26, bf16, torch.cuda.max_memory_allocated).
MEASURED = [("vit_s16", 224, 6, 384, 16, 1.3), ("vit_b16", 224, 6, 384, 8, 2.5),
            ("vit_t4", 32, 6, 384, 128, 1.4), ("vit_t4", 32, 2, 96, 128, 0.4),
            ("vit_s16", 224, 6, 384, 128, 5.0), ("vit_b16", 224, 6, 384, 64, 4.6)]


def check_memory() -> None:
    print("| configuration | batch | measured (H200) | projected | projected / measured |")
    print("|---|---|---|---|---|")
    for arch, size, depth, width, batch, measured in MEASURED:
        cfg = config_from_dict(dict(arch=arch, img_size=size, pred_depth=depth, pred_width=width)).validate()
        peak = projected_peak_gib(cfg, batch)[0]
        print(f"| {arch} @ {size}, pred {depth} × {width} | {batch} | {measured:.1f} GiB | {peak:.2f} GiB | "
              f"{peak / measured:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", choices=[[], *PRESETS], help="presets (default: all)")
    parser.add_argument("--tflops", type=float, default=100.0, help="achieved TFLOP/s per GPU")
    parser.add_argument("--memory", action="store_true", help="add the projected memory per GPU")
    parser.add_argument("--check-memory", action="store_true", help="compare the count with the H200 rows")
    args = parser.parse_args()
    if args.check_memory:
        check_memory()
    else:
        table(args)


if __name__ == "__main__":
    main()
