"""A linear classifier trained with torch on standardized features (for large sets; GPU).

The standardized features go to the GPU whole when they take at most half its free memory
(ImageNet `last4` features of a ViT-H do not: 26 GB), else each minibatch is sent as it is
used. Minibatch AdamW with a cosine learning rate and weight decay, cross-entropy. Seeded, so
a run is repeatable on the same device.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from stoptool.probe.metrics import accuracies


def linear_probe(x_train, y_train, x_test, y_test, num_classes: int, seed: int = 0,
                 epochs: int = 100, min_steps: int = 2000, batch_size: int = 256,
                 lr: float = 0.05, weight_decay: float = 1e-4,
                 device: str | torch.device = "cpu") -> dict:
    """At least `min_steps` steps: small sets get more epochs, since standardized ViT
    features are badly conditioned and a few hundred steps leave the layer far from fit."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and len(x_train) * np.shape(x_train)[1] < 2_000_000:
        torch.set_num_threads(1)  # tiny products: extra threads only spin
    try:
        return _train(x_train, y_train, x_test, y_test, num_classes, seed, epochs, min_steps,
                      batch_size, lr, weight_decay, device)
    finally:
        torch.set_num_threads(threads)


def _train(x_train, y_train, x_test, y_test, num_classes, seed, epochs, min_steps, batch_size,
           lr, weight_decay, device) -> dict:
    gen = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(x_train, dtype=torch.float32)
    mean, std = xt.mean(0), xt.std(0, unbiased=False).clamp_min(1e-6)
    xt = (xt - mean).div_(std)  # one standardized copy, on the CPU
    xv = (torch.as_tensor(x_test, dtype=torch.float32) - mean).div_(std)
    stays = fits_on(device, xt.numel() * xt.element_size())
    xt = xt.to(device) if stays else xt
    yt = torch.as_tensor(y_train, dtype=torch.int64).to(device if stays else "cpu")
    layer = torch.nn.Linear(xt.size(1), num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=gen)
        layer.bias.zero_()
    layer = layer.to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(xt)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(xt.device)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(layer(xt[idx].to(device)), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        scores = torch.cat([layer(part.to(device)).double().cpu() for part in xv.split(8192)]).numpy()
    result = accuracies(scores, np.asarray(y_test), num_classes)
    result["params"] = {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                        "weight_decay": weight_decay, "optimizer": "AdamW"}
    return result


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether `nbytes` of features may live on `device` for the whole fit: always on the CPU
    (they are there already), on a GPU when they take at most half of its free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2
