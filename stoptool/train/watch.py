"""Watching a run while it trains: health metrics, alarms, and the online k-NN probe.

- `rankme` (Garrido et al. 2023, RankMe): exp of the entropy of the normalised singular
  values of the batch's average-pooled target features; from 1 (every image the same
  direction) to min(batch, width).
- `feature_std`: the mean over dimensions of the standard deviation, over the batch, of the
  L2-normalised pooled target features; about 1/sqrt(width) for directions spread evenly,
  0 when every image maps to one point.
- Alarms, once each: collapse (either falls below a fifth of its value on the initial weights,
  logged at step 1, and read back from metrics.jsonl on resume), a loss
  jump (over 3× the median of the last 20 logged losses), a non-finite loss, data-bound steps
  (the step waits on the loader for more than half its time).
- Online k-NN: `stoptool probe --method knn`'s protocol (target encoder, evaluation transform,
  last layer pooled, cosine, k = 20, T = 0.07) with its features (`knn_features`: whitened by
  the bank unless set to raw; see `probe/knn.py` for why) on a bounded, seeded sample of a
  labelled set.
"""

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from stoptool.data.datasets import ArrayDataset, ImageDataset, has_labelled_splits
from stoptool.errors import UserError
from stoptool.options import KNN_FEATURES
from stoptool.probe.features import EvalImages, collate_eval
from stoptool.probe.knn import knn_probe
from stoptool.probe.run import ProbeConfig, open_splits
from stoptool.train.distributed import Nets, World
from stoptool.train.runtime import attention_impl, autocast_factory, resolve_precision, set_attention

COLLAPSE_FRACTION = 0.2  # of the first logged value
JUMP_FACTOR, JUMP_WINDOW, JUMP_MIN_ROWS = 3.0, 20, 5
DATA_BOUND_SHARE = 0.5  # of the step's time spent waiting for the loader


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(H(p)), p = σ / Σσ + eps, over the singular values σ of `features` [N, D]."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(features: torch.Tensor) -> float:
    """Mean per-dimension standard deviation of the L2-normalised rows of `features` [N, D]."""
    return float(F.normalize(features.double(), dim=1).std(dim=0).mean())


ADVICE = {
    "collapse": ("the target features are collapsing ({what}): the encoder maps images to ever fewer "
                 "directions; usual remedies: a lower lr, a higher EMA start (ema), a longer warmup"),
    "loss_jump": ("the loss jumped to {value:.4g}, over {factor:g}× its recent median {median:.4g}: "
                  "training may be diverging; usual remedies: a lower lr, clip_grad, a longer warmup"),
    "non_finite": ("the loss is {value}: training diverged; usual remedies: a lower lr, precision fp32 "
                   "(fp16 overflows past 65504), clip_grad"),
    "data_bound": ("the step waits on the data loader for {share:.0%} of its time: the run is bound by "
                   "its input; usual remedies: more workers, faster storage or prepared shards"),
}


@dataclass
class Alarms:
    """Checks each logged row; a condition fires once, as one line to `notify` and an alarm
    entry (also kept in `fired` for the summary)."""

    notify: Callable[[str], None] | None = None
    fired: list[dict] = field(default_factory=list)
    first: dict = field(default_factory=dict)
    losses: deque = field(default_factory=lambda: deque(maxlen=JUMP_WINDOW))

    def check(self, row: dict) -> list[dict]:
        found = []
        for name in ("rankme", "feature_std"):
            if name in row:
                self.first.setdefault(name, row[name])
                ref = self.first[name]
                if ref > 0 and row[name] < COLLAPSE_FRACTION * ref:
                    what = f"{name} {row[name]:.4g}, under {COLLAPSE_FRACTION:g}× its first value {ref:.4g}"
                    found.append(("collapse", {"what": what}))
        loss = row.get("loss")
        if loss is not None and len(self.losses) >= JUMP_MIN_ROWS:
            median = statistics.median(self.losses)
            if loss > JUMP_FACTOR * median:
                found.append(("loss_jump", {"value": loss, "factor": JUMP_FACTOR, "median": median}))
        if loss is not None:
            self.losses.append(loss)
        if row.get("step_s") and row.get("data_s", 0) > DATA_BOUND_SHARE * row["step_s"]:
            found.append(("data_bound", {"share": row["data_s"] / row["step_s"]}))
        return [a for name, args in found if (a := self.raise_(name, row["step"], **args))]

    def raise_(self, name: str, step: int, **args) -> dict | None:
        """The alarm `name` at `step`, unless it has fired already in this process."""
        if any(a["alarm"] == name for a in self.fired):
            return None
        alarm = {"step": step, "alarm": name, "message": ADVICE[name].format(**args)}
        self.fired.append(alarm)
        if self.notify:
            self.notify(f"warning: step {step}: {alarm['message']}")
        return alarm


@dataclass
class EvalSet:
    """The labelled sample the online k-NN uses: a bank (train) and a test split."""

    train: ImageDataset
    test: ImageDataset
    train_idx: np.ndarray
    test_idx: np.ndarray
    num_classes: int
    name: str
    features: str = KNN_FEATURES  # of the k-NN: whitened | raw


def sample(n: int, most: int, seed: int) -> np.ndarray:
    """All of 0..n-1 in order when n <= most; else `most` of them, seeded, in order."""
    if n <= most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=most, replace=False))


def extract(nets: Nets, data: ImageDataset, idx: np.ndarray, img_size: int, autocast, device,
            world: World, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Pooled target features and labels of `data[idx]`, each process extracting its contiguous
    share and all of them gathering the whole; in one process, the batches of `stoptool probe`."""
    share = np.array_split(idx, world.size)[world.rank]
    images = EvalImages(data, img_size, share)
    loader = DataLoader(images, batch_size=batch_size, collate_fn=collate_eval,
                        generator=torch.Generator())  # never draws from the noise's global stream
    xs, ys = [], []
    with torch.no_grad():
        for batch, labels, _ in loader:
            if batch is not None:
                with autocast():
                    xs.append(nets.target(batch.to(device)).mean(1).float())
                ys.append(labels.to(device))
    x = torch.cat(xs) if xs else torch.empty(0, device=device)
    y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64, device=device)
    if world.distributed:
        x, y = _gather_rows(x, world), _gather_rows(y, world)
    return x.cpu().numpy(), y.cpu().numpy()


def _gather_rows(t: torch.Tensor, world: World) -> torch.Tensor:
    """Every process's rows of `t`, in rank order (shares may differ by a row)."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor([len(t)], device=t.device))
    most = max(int(s) for s in sizes)
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def online_knn(nets: Nets, ev: EvalSet, img_size: int, autocast, device, world: World) -> dict:
    """`knn_top1` (and `knn_top5` with more than 5 classes) of the current target encoder."""
    target = nets.model.target_encoder
    was_training = target.training
    target.eval()
    try:
        x_train, y_train = extract(nets, ev.train, ev.train_idx, img_size, autocast, device, world)
        x_test, y_test = extract(nets, ev.test, ev.test_idx, img_size, autocast, device, world)
    finally:
        target.train(was_training)
    res = knn_probe(x_train, y_train, x_test, y_test, ev.num_classes, features=ev.features, device=device)
    out = {"knn_top1": res["top1"]}
    if res["top5"] is not None:
        out["knn_top5"] = res["top5"]
    return out


@dataclass
class OnlineEval:
    """The online k-NN of a run: on what, how often, and how the target encoder runs for it
    (the evaluation's precision and attention kernel are `stoptool probe`'s)."""

    evalset: EvalSet
    every: int  # epochs
    img_size: int
    autocast: Callable
    attn: tuple[str, str]  # (while evaluating, while training)
    device: torch.device
    world: World

    def due(self, step: int, ipe: int, last_step: int) -> bool:
        """After every `every` epochs, and after the last step."""
        return step == last_step or (step % ipe == 0 and (step // ipe) % self.every == 0)

    def __call__(self, nets: Nets) -> dict:
        target = nets.model.target_encoder
        set_attention(target, self.attn[0])
        try:
            return online_knn(nets, self.evalset, self.img_size, self.autocast, self.device, self.world)
        finally:
            set_attention(target, self.attn[1])


@dataclass
class Watch:
    """What the loop reports beside the loss: health metrics on logged steps, alarms, and the
    online evaluation (None: off)."""

    alarms: Alarms = field(default_factory=Alarms)
    evaluate: OnlineEval | None = None
    flops: Callable[[torch.Tensor, torch.Tensor], float] | None = None  # per image, from the masks
    matmul_rate: float | None = None  # of one device, FLOP/s
    devices: int = 1

    def health(self, measured, row: dict, batch) -> dict:
        """rankme, feature_std, grad_norm and mfu for `row`, from what the step measured (a
        `StepResult`)."""
        out = {}
        if measured.target_features is not None:
            feats = measured.target_features
            out["rankme"], out["feature_std"] = rankme(feats), feature_std(feats)
        if measured.grad_norm is not None:
            out["grad_norm"] = float(measured.grad_norm)
        if self.flops and self.matmul_rate:
            per_device = row["img_per_s"] / self.devices
            out["mfu"] = self.flops(batch.ctx_idx, batch.tgt_idx) * per_device / self.matmul_rate
        return out


def eval_splits(cfg, explicit: bool):
    """(train, test, name) of the online k-NN's labelled set: `eval_dataset`, else the
    pretraining set's own labelled splits (an ImageFolder tree's train/ and val/, a prepared
    set's train and val); None where there are none (a tree without val/). Problems with a
    set the user named are theirs to hear of."""
    d = cfg.data
    name = cfg.watch.eval_dataset or d.dataset
    if not explicit and not has_labelled_splits(name):
        return None
    try:
        return open_splits(ProbeConfig(dataset=name, data_root=d.data_root))
    except UserError:
        if explicit:
            raise
        return None


def online_eval(cfg, data, world: World, device: torch.device, precision: str,
                notify=None) -> OnlineEval | None:
    """The run's online k-NN, or None when `eval_every` is 0 or (by default) there is no
    labelled set to evaluate on."""
    w = cfg.watch
    every = w.eval_every if w.eval_every is not None else (1 if isinstance(data, ArrayDataset) else 5)
    if every == 0:
        return None
    splits = eval_splits(cfg, explicit=w.eval_dataset is not None)
    if splits is None:
        if notify and world.main:
            notify(f"no labelled split beside '{cfg.data.dataset}' (train/ and val/): the online k-NN is "
                   "off; name one with eval_dataset")
        return None
    train, test, name = splits
    seed = cfg.runtime.seed
    evalset = EvalSet(train, test, sample(len(train), w.eval_max_images, seed),
                      sample(len(test), w.eval_max_images, seed + 1), len(train.classes), name,
                      w.knn_features)
    eval_precision = resolve_precision(cfg.runtime.precision, device, fp16=False)
    attn = (attention_impl(cfg.runtime.attn, device, eval_precision, training=False),
            attention_impl(cfg.runtime.attn, device, precision, training=True))
    return OnlineEval(evalset, every, cfg.model.img_size, autocast_factory(device, eval_precision), attn,
                      device, world)
