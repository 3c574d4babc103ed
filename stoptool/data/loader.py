"""The pretraining input pipeline: augmented images plus multi-block masks, per batch.

Every sample is addressed by (epoch, batch, index), and its augmentation and the batch's
masks are seeded from those numbers. The pipeline is therefore the same with any number of
workers, and a run resumed mid-epoch sees exactly the batches it would have seen.
Masks are sampled in the collate function, i.e. inside the loader workers. Under data
parallelism every rank walks the same global batches, takes its own slice of each, and
samples its own masks for it.
"""

import random

import torch
from torch.utils.data import DataLoader, Dataset

from stoptool.data.base import ImageDataset
from stoptool.data.device_decode import Encoded, EncodedBatch
from stoptool.data.transforms import PretrainTransform
from stoptool.errors import UserError
from stoptool.masks import MaskSampler

PREFETCH_GPU = 4  # batches each worker keeps ready when feeding a GPU (torch's default: 2)


def stream_seed(*parts: int) -> int:
    """A seed for the random stream named by `parts` (e.g. seed, epoch, index)."""
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF


class AugmentedImages(Dataset):
    def __init__(self, data: ImageDataset, transform: PretrainTransform, seed: int):
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[tuple[int, int, int], torch.Tensor, list]:
        """The key (the collate seeds the batch's masks from it), the image, and the images
        skipped on the way as (name, reason) pairs."""
        epoch, _, index = key
        rng = random.Random(stream_seed(self.seed, epoch, index))
        skipped = []
        # An unreadable file is replaced by the next readable one, and named.
        for attempt in range(len(self.data)):
            i = (index + attempt) % len(self.data)
            try:
                img = self.data.load(i)
            except (OSError, ValueError) as err:
                name = self.data.item_name(i)
                skipped.append((name, unreadable_reason(err, name)))
                continue
            return key, self.transform(img, rng), skipped
        raise UserError(f"no readable image in '{self.data.name}'")


def unreadable_reason(err: Exception, name: str) -> str:
    """The decoder's message, without the file name it repeats."""
    text = str(err).replace(f" {name!r}", "").replace(f" '{name}'", "").strip()
    return text or type(err).__name__


class SkipReport:
    """`loader`'s batches, each with its number of skipped images (what the training loop
    counts); the skipped images' names are kept, in the order met, and the first `NAMED` of
    them go to `notify` with the decoder's reason as their batch arrives."""

    NAMED = 10

    def __init__(self, loader, notify=None, listed_in: str = "skipped.txt"):
        self.loader, self.notify, self.listed_in = loader, notify, listed_in
        self.names: dict[str, None] = {}  # each skipped image once, in the order met

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, ctx_idx, tgt_idx, skipped in self.loader:
            for name, reason in skipped:
                self._met(name, reason)
            yield images, ctx_idx, tgt_idx, len(skipped)

    def _met(self, name: str, reason: str) -> None:
        if name in self.names:
            return
        self.names[name] = None
        if self.notify and len(self.names) <= self.NAMED:
            self.notify(f"unreadable image skipped: {name} ({reason})")
            if len(self.names) == self.NAMED:
                self.notify(f"further unreadable images are skipped without a note here; {self.listed_in} "
                            "lists every one")


def check_readable(data: ImageDataset) -> None:
    """At least one image of `data` loads (the first readable one ends the search), so that a
    tree of unreadable files is refused before a run directory is made."""
    for i in range(len(data)):
        try:
            data.load(i)
            return
        except (OSError, ValueError):
            continue
    raise UserError(f"no readable image in '{data.name}'")


class MaskCollate:
    def __init__(self, sampler: MaskSampler, seed: int, rank: int = 0):
        self.sampler, self.seed, self.rank = sampler, seed, rank

    def __call__(self, items: list[tuple[tuple[int, int, int], torch.Tensor, list]]):
        pictures = [x for _, x, _ in items]
        images = EncodedBatch(pictures) if isinstance(pictures[0], Encoded) else torch.stack(pictures)
        skipped = [s for _, _, named in items for s in named]
        epoch, batch, _ = items[0][0]
        # rank 0 keeps the one-process stream; other ranks add their rank (not -1 - rank:
        # Python hashes -1 and -2 alike)
        rank = (self.rank,) if self.rank else ()
        gen = torch.Generator().manual_seed(stream_seed(self.seed, epoch, batch, -1, *rank))
        ctx_idx, tgt_idx = self.sampler(len(items), gen)
        return images, ctx_idx, tgt_idx, skipped


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world: int = 1
):
    """Batches of keys (epoch, batch, index) for one epoch, from batch `start` on (drop_last).

    With `world` > 1, rank `rank`'s slice of each global batch of `batch_size` keys.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(seed, epoch))).tolist()
    local = batch_size // world
    for b in range(start, n // batch_size):
        first = b * batch_size + rank * local
        yield [(epoch, b, i) for i in perm[first : first + local]]


class RunBatches:
    """The batches of keys of steps `first` to `last` of a run, across epoch boundaries (see
    `epoch_batches`), so that one loader, and one set of workers, serves the whole run.
    `order(batch_size, seed, epoch, start, rank, world)`, where given, replaces `epoch_batches`
    over `n` images (a prepared set's shard streams)."""

    def __init__(self, n: int, batch_size: int, seed: int, first: int, last: int, rank: int = 0,
                 world: int = 1, order=None):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.first, self.last = first, last
        self.order = order or (lambda *args: epoch_batches(n, *args))

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __iter__(self):
        per_epoch = self.n // self.batch_size
        step = self.first
        while step < self.last:
            epoch, start = divmod(step, per_epoch)
            for keys in self.order(self.batch_size, self.seed, epoch, start, self.rank, self.world):
                yield keys
                step += 1
                if step == self.last:
                    return


def pretrain_loader(
    data: ImageDataset,
    transform: PretrainTransform,
    sampler: MaskSampler,
    batch_size: int,
    seed: int,
    first: int,
    last: int,
    workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """The batches of steps `first` (0-based) to `last` (excluded), over as many epochs as
    they span; the workers start once, and prefetch across an epoch's end."""
    return DataLoader(
        AugmentedImages(data, transform, seed),
        batch_sampler=RunBatches(len(data), batch_size, seed, first, last, rank, world,
                                 getattr(data, "epoch_batches", None)),
        collate_fn=MaskCollate(sampler, seed, rank),
        num_workers=workers,
        pin_memory=pin_memory,  # (on a GPU: page-locked batches, copied while the step runs)
        prefetch_factor=PREFETCH_GPU if workers and pin_memory else None,
        # its own generator, so that creating a loader never draws from the global RNG that
        # the predictor's noise uses (a resumed run must see the same noise)
        generator=torch.Generator().manual_seed(stream_seed(seed, first, -2)),
    )
