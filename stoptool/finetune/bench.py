"""`stoptool bench --what finetune`: the fine-tuning step of MAE's recipe (the `finetune-in1k`
preset with its values for the arch's size: stochastic depth, Mixup/CutMix into soft targets,
timm's soft-target loss, layer-decay AdamW) on a batch made by the preset's augmentation
(random resized crop, flip, RandAugment, random erasing, Mixup/CutMix), and that augmentation
alone on one core; `stoptool.bench` times the pretraining step of the same arch beside it.
"""

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from stoptool.config import BenchConfig
from stoptool.data.transforms import MEAN, STD
from stoptool.finetune.config import build_finetune_config
from stoptool.finetune.data import make_loss, make_mixup, train_transform
from stoptool.finetune.model import build_classifier, make_optimizer
from stoptool.finetune.step import Batch, FinetuneState, finetune_step
from stoptool.flops import encoder_flops
from stoptool.models.archs import default_img_size, parse_arch
from stoptool.models.encoder import build_encoder
from stoptool.train.distributed import Nets
from stoptool.train.optim import make_scaler
from stoptool.train.runtime import (
    attention_impl,
    autocast_factory,
    device_sync,
    matmul_rate,
    resolve_device,
    resolve_precision,
    set_attention,
)
from stoptool.train.schedules import Hyper

RECIPE = "finetune-in1k"
CLASSES = 1000  # ImageNet's: the head's size
SOURCE_SIDE = (320, 256)  # the images the augmentation is timed on: about an ImageNet JPEG's short side


def bench_finetune(cfg: BenchConfig, timed: Callable) -> dict:
    """img/s of the fine-tuning step and of its augmentation; `timed(fn, device, steps, warmup,
    repeats)` is bench's timer (seconds per call, one number per repeat)."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    img_size = cfg.img_size or default_img_size(cfg.arch)
    recipe = build_finetune_config(RECIPE, {"random_init": True, "arch": cfg.arch}).for_arch(cfg.arch)
    augment, mixup = train_transform(recipe, img_size, MEAN, STD), make_mixup(recipe, CLASSES)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (*SOURCE_SIDE[::-1], 3), dtype=np.uint8))
                for _ in range(cfg.batch_size)]
    labels = torch.as_tensor(rng.integers(0, CLASSES, cfg.batch_size))

    def make_batch():
        return mixup(torch.stack([augment(p) for p in pictures]), labels)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        augment_s = timed(make_batch, torch.device("cpu"), 1, 1, cfg.repeats)
    finally:
        torch.set_num_threads(threads)
    images, targets = make_batch()
    torch.manual_seed(0)
    model = build_classifier(cfg.arch, img_size, build_encoder(cfg.arch, img_size).state_dict(), CLASSES,
                             recipe.drop_path).to(device).train()
    attn = attention_impl(cfg.attn, device, precision, training=True)
    set_attention(model, attn)
    if cfg.grad_checkpoint:
        model.set_grad_checkpointing(True)
    state = FinetuneState(model, make_optimizer(model, recipe.wd, recipe.layer_decay),
                          make_scaler(device, precision), Nets(model, model, None),
                          autocast_factory(device, precision), make_loss(recipe), accum_steps=cfg.accum_steps)
    batch, hp = Batch(images.to(device), targets.to(device)), Hyper(1e-4, recipe.wd, 0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: finetune_step(state, batch, hp), device, cfg.steps, cfg.warmup, cfg.repeats)
    device_sync(device)
    flops = 3 * encoder_flops(cfg.arch, img_size) + 3 * 2 * parse_arch(cfg.arch)[0].width * CLASSES
    med = float(np.median(seconds))
    rate = matmul_rate(device, precision)
    result = {
        "what": "finetune", "recipe": RECIPE, "arch": cfg.arch, "img_size": img_size,
        "batch_size": cfg.batch_size, "accum_steps": cfg.accum_steps, "precision": precision,
        "device": str(device), "attn": attn, "torch_threads": torch.get_num_threads(),
        "drop_path": recipe.drop_path, "layer_decay": recipe.layer_decay,
        "augmentation": _augmentation(recipe),
        "img_per_s": cfg.batch_size / med, "img_per_s_min": cfg.batch_size / max(seconds),
        "img_per_s_max": cfg.batch_size / min(seconds), "ms_per_step": 1000 * med,
        "flops_per_image": flops, "achieved_flops": flops * cfg.batch_size / med, "matmul_flops": rate,
        "share_of_matmul_rate": flops * cfg.batch_size / med / rate,
        "augment_img_per_s_per_core": cfg.batch_size / float(np.median(augment_s)),
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _augmentation(recipe) -> str:
    parts = [f"crop {recipe.crop_scale[0]:g}-{recipe.crop_scale[1]:g}", f"flip {recipe.hflip:g}"]
    if recipe.auto_augment:
        parts.append(recipe.auto_augment)
    if recipe.reprob:
        parts.append(f"erasing {recipe.reprob:g}")
    if recipe.mixing():
        parts.append(f"mixup {recipe.mixup:g} / cutmix {recipe.cutmix:g}")
    if recipe.smoothing:
        parts.append(f"smoothing {recipe.smoothing:g}")
    return ", ".join(parts)


def bench_rows(result: dict) -> dict[str, str]:
    """The bench table of `--what finetune`, the pretraining step of the same arch beside it."""
    r, pre = result, result.get("pretrain")
    rows = {
        "what": f"finetune (the {r['recipe']} step: drop path {r['drop_path']:g}, soft-target loss, "
                f"layer decay {r['layer_decay']:g})",
        "arch": f"{r['arch']} @ {r['img_size']}px, batch {r['batch_size']}",
        "augmentation": r["augmentation"],
        "device": f"{r['device']} ({r['torch_threads']} threads)", "precision": r["precision"],
        "attention": r["attn"],
        "img/s": f"{r['img_per_s']:.1f} (min {r['img_per_s_min']:.1f}, max {r['img_per_s_max']:.1f})",
        "ms/step": f"{r['ms_per_step']:.1f}",
        "GFLOP/image": f"{r['flops_per_image'] / 1e9:.2f}",
        "achieved": f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s",
        "matmul rate": f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s ({r['precision']})",
        "share of matmul rate": f"{100 * r['share_of_matmul_rate']:.1f} %",
        "augmentation alone": f"{r['augment_img_per_s_per_core']:.1f} img/s on one core",
    }
    if "peak_memory_mib" in r:
        rows["peak memory"] = f"{r['peak_memory_mib']:.0f} MiB"
    if pre:
        rows["pretraining step, same arch"] = (
            f"{pre['img_per_s']:.1f} img/s, {pre['flops_per_image'] / 1e9:.2f} GFLOP/image, "
            f"{100 * pre['share_of_matmul_rate']:.1f} % of the matmul rate")
    return rows
