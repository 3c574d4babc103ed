"""The fine-tuned classifier on the evaluation split: top-1, top-5 and the cross-entropy, every
`eval_every` epochs and after the last step (the result).

top-k: the share of images whose true class is among the k highest logits. Top-5 is reported
where there are more than 5 classes (as the probes do). Under torchrun each process takes its
contiguous share of the split and the counts are summed.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from stoptool.data.datasets import ImageDataset
from stoptool.finetune.data import EvalImages, collate_eval
from stoptool.train.distributed import World, sum_over_ranks, summed
from stoptool.train.runtime import set_attention


@dataclass
class Scores:
    """Summed over the split: images right at top-1 and top-5, the loss, images seen and skipped."""

    top1: float = 0.0
    top5: float = 0.0
    loss: float = 0.0
    images: float = 0.0
    skipped: float = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        self.top1 += hits[:, 0].sum().item()
        self.top5 += hits.any(dim=1).sum().item()
        self.loss += F.cross_entropy(logits, labels, reduction="sum").item()
        self.images += len(labels)

    def summed(self, world: World, device: torch.device) -> "Scores":
        return Scores(*(sum_over_ranks(v, world, device) for v in vars(self).values()))


@dataclass
class Evaluation:
    """The classifier on `data`, as fit's online evaluation (`due`, then a call with the run's
    `Nets`): each process its share, `batch_size` images at a time, under `autocast`, with the
    attention kernel `attn` (evaluation's, then training's again). Not on the initial weights
    (`at_start`): the head is untrained there."""

    data: ImageDataset
    transform: Callable
    batch_size: int
    every: int  # epochs; 0: after the last step only
    autocast: Callable
    attn: tuple[str, str]  # (while evaluating, while training)
    device: torch.device
    world: World
    workers: int = 0
    at_start: bool = False
    last: dict = field(default_factory=dict)  # the last evaluation's numbers

    def due(self, step: int, ipe: int, last_step: int) -> bool:
        return step == last_step or bool(self.every and step % ipe == 0 and (step // ipe) % self.every == 0)

    def __call__(self, nets) -> dict:
        model = nets.model
        was_training = model.training
        model.eval()
        set_attention(model, self.attn[0])
        try:
            scores = self.scores(model).summed(self.world, self.device)
        finally:
            set_attention(model, self.attn[1])
            model.train(was_training)
        n = max(scores.images, 1)
        many = len(self.data.classes) > 5
        self.last = {"val_top1": scores.top1 / n, "val_top5": scores.top5 / n if many else None,
                     "val_loss": scores.loss / n, "val_images": int(scores.images),
                     "val_skipped": int(scores.skipped)}
        logged = ("val_top1", "val_top5", "val_loss")
        return {k: v for k, v in self.last.items() if k in logged and v is not None}

    def scores(self, model: torch.nn.Module) -> Scores:
        share = np.array_split(np.arange(len(self.data)), self.world.size)[self.world.rank]
        loader = DataLoader(EvalImages(self.data, share, self.transform), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=collate_eval,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator())  # never draws from the global stream
        scores = Scores()
        with torch.inference_mode():
            for images, labels, skipped in loader:
                scores.skipped += skipped
                if images is not None:
                    with self.autocast():
                        logits = model(images.to(self.device, non_blocking=True))
                    scores.add(logits, labels.to(self.device))
        return scores


def feature_moments(model: torch.nn.Module, data: ImageDataset, indices: np.ndarray, transform,
                    batch_size: int, autocast, device: torch.device, world: World,
                    workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation, per feature, of the classifier's averaged tokens (what comes
    before its head: `forward_head(..., pre_logits=True)`) over `data[indices]`, each process
    its share, the sums added up in float64."""
    share = np.array_split(np.asarray(indices), world.size)[world.rank]
    loader = DataLoader(EvalImages(data, share, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_eval, generator=torch.Generator())
    width = model.embed_dim
    sums = torch.zeros(2 * width + 1, dtype=torch.float64, device=device)  # Σx, Σx², n
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, _, _ in loader:
                if images is None:
                    continue
                with autocast():
                    x = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
                x = x.double()
                sums += torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([len(x)])])
    finally:
        model.train(was_training)
    sums = summed(sums, world)
    n = sums[-1].clamp_min(1)
    mean = sums[:width] / n
    std = (sums[width:-1] / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()
