"""Class-balanced, seeded subsets of the training labels (the 1 % / 10 % protocols)."""

import numpy as np

from stoptool.errors import UserError


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of round(fraction × N) images (at least one per class), spread over the
    classes as evenly as their sizes allow. The same (labels, fraction, seed) give the same
    indices."""
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}", key="fraction")
    labels = np.asarray(labels)
    if fraction == 1:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    total = min(len(labels), max(len(classes), int(round(fraction * len(labels)))))
    rng = np.random.default_rng(seed)
    # Fill classes one image at a time, always the class holding fewest so far (random among
    # ties), skipping full ones: as even as the class sizes allow, and exactly `total` images.
    take = np.zeros(len(classes), dtype=np.int64)
    order = rng.permutation(len(classes))
    base = total // len(classes)
    take[:] = np.minimum(counts, base)
    while take.sum() < total:
        room = take < counts
        level = take[room].min()
        for c in order:
            if room[c] and take[c] == level and take.sum() < total:
                take[c] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=n, replace=False)
        for cls, n in zip(classes, take)
    ]
    return np.sort(np.concatenate(chosen))
