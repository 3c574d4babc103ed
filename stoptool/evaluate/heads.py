"""The paper protocol's four heads on frozen features, trained together from one extraction.

For each of the pooled features `last` (the last block's average token, D numbers) and
`last4` (the last four blocks', 4D), two heads: a linear layer (`linear`), and a BatchNorm
followed by a linear layer (`bn_linear`). They are VISSL's `mlp` and `eval_mlp` heads, the
four that VISSL's ViT benchmark configs train side by side (`concatPOOL4` and `lastPOOL`, each
with and without BatchNorm); the best of them on the test split is the number the tables report,
and every head's is kept.

Recipe, VISSL's linear benchmarks: SGD with Nesterov momentum 0.9; weight decay (5e-4) on the
linear layers' weights and biases, none on BatchNorm; a learning rate of 0.01 for a batch of
256, scaled linearly with the batch, following a cosine per epoch down to 1 % of it; linear
weights drawn from N(0, 0.01²), biases zero; BatchNorm with eps 1e-5 and momentum 0.1.
Training epoch e reads training view e mod V of the features (`train_view`), so V views
extracted once stand for V differently augmented passes over the data.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stoptool.probe.features import Features
from stoptool.probe.linear import fits_on
from stoptool.probe.metrics import accuracies

HEADS = ("linear", "bn_linear")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 50
    lr: float = 0.01  # for a batch of 256
    weight_decay: float = 5e-4
    batch_size: int = 256
    seed: int = 0

    def lr_at(self, epoch: int) -> float:
        """Cosine over epochs from the batch-scaled rate to 1 % of it (VISSL's per-epoch cosine)."""
        start = self.lr * self.batch_size / 256
        end = start / 100
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * epoch / self.epochs))


def make_head(kind: str, dim: int, num_classes: int, gen: torch.Generator) -> nn.Module:
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.normal_(0, 0.01, generator=gen)
        linear.bias.zero_()
    if kind == "linear":
        return nn.Sequential(linear)
    return nn.Sequential(nn.BatchNorm1d(dim, eps=1e-5, momentum=0.1), linear)


def columns(layers: str, width: int) -> slice:
    """Where `layers` sits in a `last4` feature row of blocks each `width` wide: the last block
    is the row's last quarter."""
    return slice(3 * width, 4 * width) if layers == "last" else slice(0, 4 * width)


def train_heads(train_view: Callable[[int], Features], views: int, test: Features, width: int,
                num_classes: int, layers: tuple[str, ...], recipe: Recipe,
                device: str | torch.device = "cpu") -> list[dict]:
    """Train a `linear` and a `bn_linear` head for each of `layers` on `last4` features (view
    e mod `views` in epoch e; `views` >= 1) and score them on `test`. One row per head: layers,
    head, dim, top1, top5 (None for 5 classes or fewer)."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and test.x.size < 2_000_000:
        torch.set_num_threads(1)  # tiny products: extra threads only spin (as the linear probe does)
    try:
        return _train(train_view, views, test, width, num_classes, layers, recipe, device)
    finally:
        torch.set_num_threads(threads)


def _train(train_view, views, test, width, num_classes, layers, recipe, device) -> list[dict]:
    gen = torch.Generator().manual_seed(recipe.seed)
    heads = {(lay, kind): make_head(kind, 4 * width if lay == "last4" else width, num_classes, gen).to(device)
             for lay in layers for kind in HEADS}
    decay = [p for h in heads.values() for p in h[-1].parameters()]
    norms = [p for h in heads.values() for m in h[:-1] for p in m.parameters()]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}]
    if norms:
        groups.append({"params": norms, "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=recipe.lr_at(0), momentum=0.9, nesterov=True)
    current: tuple[int, torch.Tensor, torch.Tensor] | None = None
    for epoch in range(recipe.epochs):
        view = epoch % views
        if current is None or current[0] != view:
            feats = train_view(view)
            current = (view, *_on_device(feats, device))
        _, x, y = current
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(epoch)
        _epoch(heads, opt, x, y, width, recipe.batch_size, gen, device)
    return _score(heads, test, width, num_classes, device)


def _on_device(feats: Features, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The features as tensors: on the GPU when they take at most half its free memory, else
    left on the host and sent a batch at a time."""
    x = torch.from_numpy(np.ascontiguousarray(feats.x, dtype=np.float32))
    y = torch.from_numpy(np.asarray(feats.y, dtype=np.int64))
    if fits_on(device, x.numel() * x.element_size()):
        return x.to(device), y.to(device)
    return x, y


def _epoch(heads: dict, opt, x: torch.Tensor, y: torch.Tensor, width: int, batch_size: int,
           gen: torch.Generator, device: torch.device) -> None:
    for h in heads.values():
        h.train()
    n = len(x)
    perm = torch.randperm(n, generator=gen).to(x.device)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) < 2:  # BatchNorm needs two rows to normalise
            continue
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        loss = sum(F.cross_entropy(h(xb[:, columns(lay, width)]), yb) for (lay, _), h in heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _score(heads: dict, test: Features, width: int, num_classes: int, device: torch.device) -> list[dict]:
    x = torch.from_numpy(np.ascontiguousarray(test.x, dtype=np.float32))
    rows = []
    with torch.no_grad():
        for (lay, kind), h in heads.items():
            h.eval()
            cols = columns(lay, width)
            scores = torch.cat([h(part[:, cols].to(device)).double().cpu() for part in x.split(8192)]).numpy()
            res = accuracies(scores, np.asarray(test.y), num_classes)
            rows.append({"layers": lay, "head": kind, "dim": cols.stop - cols.start, **res})
    return rows


def best(rows: list[dict]) -> dict:
    """The row with the highest top-1 (the first of equals)."""
    return max(rows, key=lambda r: r["top1"])
