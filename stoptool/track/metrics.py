"""The DAVIS 2017 semi-supervised score as the official evaluation (davis2017-evaluation)
defines it, as pure functions on numpy masks.

- J, region similarity: the IoU of a predicted and a true object mask, void pixels left out of
  both counts; 1 when the union is empty.
- F, contour accuracy: the F-measure of the two masks' boundaries, a boundary pixel counting as
  found when the other boundary passes within ceil(0.008 × image diagonal) pixels of it (a
  dilation by a disk of that radius).
- Per object, over the scored frames (all but a sequence's first and last): the mean, the
  recall (the share of frames above 0.5) and the decay (the mean over the first quarter of the
  frames minus the mean over the last quarter).
- Over a data set, each statistic is averaged over all objects of all sequences (a sequence of
  three objects weighs three times one of one), and J&F-Mean is the mean of J-Mean and F-Mean.

The official semi-supervised evaluation passes no void mask to J and F (void pixels of the
ground truth, 255, are background there); `score_sequence` does the same. The `void`
arguments of `jaccard` and `boundary_f` are the official functions' own, for other uses.
"""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial import cKDTree

BOUND_TH = 0.008  # the boundary tolerance, as a share of the image diagonal
STATISTICS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def jaccard(truth: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity J of two binary masks; pixels where `void` is set count for neither."""
    truth, pred = truth.astype(bool), pred.astype(bool)
    keep = np.ones_like(truth) if void is None else ~void.astype(bool)
    union = np.count_nonzero((truth | pred) & keep)
    if union == 0:
        return 1.0
    return np.count_nonzero(truth & pred & keep) / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """The one-pixel boundary of a binary mask, drawn as the official evaluation draws it (the
    BSDS benchmark's seg2bmap): a pixel is on it where it differs from its east, south or
    south-east neighbour, neighbours past the image counting as background; in the last row
    only the east neighbour counts, in the last column only the south one, and the bottom-right
    pixel is never on it. The boundary so sits half a pixel towards the top left of the edge,
    and the image's own border is no boundary."""
    m = mask.astype(bool)
    east, south, south_east = (np.zeros_like(m) for _ in range(3))
    east[:, :-1] = m[:, 1:]
    south[:-1, :] = m[1:, :]
    south_east[:-1, :-1] = m[1:, 1:]
    edge = (m ^ east) | (m ^ south) | (m ^ south_east)
    edge[-1, :] = m[-1, :] ^ east[-1, :]
    edge[:, -1] = m[:, -1] ^ south[:, -1]
    edge[-1, -1] = False
    return edge


def tolerance(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """The boundary tolerance in pixels: `bound_th` itself when it is 1 or more, else
    ceil(bound_th × diagonal) (8 px for DAVIS's 854 × 480 frames)."""
    if bound_th >= 1:
        return int(bound_th)
    h, w = shape
    return math.ceil(bound_th * math.sqrt(h * h + w * w))


def _found(points: np.ndarray, target: np.ndarray, radius: int) -> int:
    """How many pixels of `points` lie within `radius` of a pixel of `target`: those that the
    dilation of `target` by the disk x² + y² <= radius² covers. Distances between pixels are
    square roots of whole numbers, so comparing them with the whole `radius` is exact."""
    distance, _ = cKDTree(np.argwhere(target)).query(np.argwhere(points), distance_upper_bound=radius + 0.5)
    return int(np.count_nonzero(distance <= radius))


def boundary_f(truth: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
               bound_th: float = BOUND_TH) -> float:
    """Contour accuracy F of two binary masks (void pixels made background in both first)."""
    keep = True if void is None else ~void.astype(bool)
    found_edge, true_edge = boundary(pred.astype(bool) & keep), boundary(truth.astype(bool) & keep)
    n_found, n_true = np.count_nonzero(found_edge), np.count_nonzero(true_edge)
    if n_found == 0 or n_true == 0:
        # both empty: precision = recall = 1; one empty: one of them is 0, and so is F
        return 1.0 if n_found == n_true else 0.0
    radius = tolerance(truth.shape, bound_th)
    precision = _found(found_edge, true_edge, radius) / n_found
    recall = _found(true_edge, found_edge, radius) / n_true
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame J or F values.

    The decay's quarters are cut as the official code cuts them: at indices
    round(linspace(1, n, 5)) - 1, halves rounded up, the first quarter running from the first
    boundary to the second inclusive and the last from the fourth to the fifth; neighbouring
    quarters share their boundary frame. (The official code keeps those indices in 8 bits, so
    its decay is wrong past 256 scored frames; DAVIS's longest sequence has 104.)"""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("no frame to score")
    n = v.size
    cuts = [(k * (n - 1) + 2) // 4 for k in range(5)]  # round-half-up of 1 + k(n-1)/4, minus 1
    first, last = v[cuts[0]:cuts[1] + 1], v[cuts[3]:cuts[4] + 1]
    return float(v.mean()), float((v > 0.5).mean()), float(first.mean() - last.mean())


@dataclass
class ObjectScore:
    """One object of one sequence: its J and F statistics over the scored frames."""

    sequence: str
    object: int
    frames: int
    j_mean: float
    j_recall: float
    j_decay: float
    f_mean: float
    f_recall: float
    f_decay: float

    @property
    def name(self) -> str:
        """`bike-packing_2`: how the official per-sequence results name an object."""
        return f"{self.sequence}_{self.object}"

    def as_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def score_sequence(name: str, truth: Iterable[np.ndarray], pred: Iterable[np.ndarray],
                   objects: int) -> list[ObjectScore]:
    """Score objects 1..`objects` over paired frames of object ids (the scored frames only:
    the caller leaves out the first and the last). Truth pixels of any other id, void (255)
    included, are background, as in the official semi-supervised evaluation."""
    j_values: list[list[float]] = [[] for _ in range(objects)]
    f_values: list[list[float]] = [[] for _ in range(objects)]
    for true_ids, pred_ids in zip(truth, pred, strict=True):
        for o in range(1, objects + 1):
            t, p = true_ids == o, pred_ids == o
            j_values[o - 1].append(jaccard(t, p))
            f_values[o - 1].append(boundary_f(t, p))
    return [ObjectScore(name, o + 1, len(j_values[o]), *statistics(j_values[o]), *statistics(f_values[o]))
            for o in range(objects)]


def summarize(scores: list[ObjectScore]) -> dict[str, float]:
    """The global statistics, each averaged over all objects: J&F-Mean, J-Mean, J-Recall,
    J-Decay, F-Mean, F-Recall, F-Decay (the official global results' columns, in their order)."""
    if not scores:
        raise ValueError("no object scored")

    def mean(field: str) -> float:
        return float(np.mean([getattr(s, field) for s in scores]))

    j, f = mean("j_mean"), mean("f_mean")
    return {"J&F-Mean": (j + f) / 2, "J-Mean": j, "J-Recall": mean("j_recall"), "J-Decay": mean("j_decay"),
            "F-Mean": f, "F-Recall": mean("f_recall"), "F-Decay": mean("f_decay")}
