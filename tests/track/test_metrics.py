"""The DAVIS 2017 metric against cases worked out by hand and against the published definition
written out here with plain loops (davis2017-evaluation's metrics.py and utils.py): J, F, the
boundary map, the tolerance, recall, decay, and the mean over objects."""

import math

import numpy as np
import pytest

from stoptool.track.metrics import (
    ObjectScore,
    boundary,
    boundary_f,
    jaccard,
    score_sequence,
    statistics,
    summarize,
    tolerance,
)


def rect(shape, top, left, height, width) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top:top + height, left:left + width] = True
    return m


def square(shape, top, left, side) -> np.ndarray:
    return rect(shape, top, left, side, side)


# ------------------------------------------------------------------ the definition, with loops


def boundary_by_definition(mask: np.ndarray) -> np.ndarray:
    """seg2bmap: a pixel differs from its east, south or south-east neighbour (outside: 0);
    last row: east only; last column: south only; the bottom-right corner: never."""
    h, w = mask.shape
    at = lambda y, x: bool(mask[y, x]) if y < h and x < w else False  # noqa: E731
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            here = at(y, x)
            if y == h - 1 and x == w - 1:
                out[y, x] = False
            elif y == h - 1:
                out[y, x] = here != at(y, x + 1)
            elif x == w - 1:
                out[y, x] = here != at(y + 1, x)
            else:
                out[y, x] = here != at(y, x + 1) or here != at(y + 1, x) or here != at(y + 1, x + 1)
    return out


def f_by_definition(truth: np.ndarray, pred: np.ndarray) -> float:
    """F: boundary pixels matched within a disk of radius ceil(0.008 × diagonal), by brute force."""
    radius = math.ceil(0.008 * math.sqrt(truth.shape[0] ** 2 + truth.shape[1] ** 2))
    found, true = np.argwhere(boundary_by_definition(pred)), np.argwhere(boundary_by_definition(truth))
    if len(found) == 0 or len(true) == 0:
        return 1.0 if len(found) == len(true) else 0.0

    def matched(a, b):
        return sum(any((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 <= radius ** 2 for q in b) for p in a)

    precision, recall = matched(found, true) / len(found), matched(true, found) / len(true)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------ J and F, by hand


def test_identical_masks_score_one():
    m = square((50, 50), 10, 10, 10)
    assert jaccard(m, m) == 1.0
    assert boundary_f(m, m) == 1.0


def test_disjoint_masks_have_j_zero_and_f_zero_when_far_apart():
    a, b = square((50, 50), 5, 5, 8), square((50, 50), 30, 30, 8)
    assert jaccard(a, b) == 0.0
    assert boundary_f(a, b) == 0.0  # no boundary pixel within the 1 px tolerance of the other


def test_the_tolerance_is_ceil_of_0008_of_the_diagonal():
    assert tolerance((480, 854)) == 8  # 0.008 × 979.6 = 7.84
    assert tolerance((50, 50)) == 1  # 0.008 × 70.7 = 0.57
    assert tolerance((64, 128)) == 2  # 0.008 × 143.1 = 1.14
    assert tolerance((50, 50), bound_th=3) == 3  # a whole number of pixels is taken as it is


def test_a_shift_within_the_tolerance_keeps_f_at_one_but_not_j():
    # 50 × 50: tolerance 1 px. A 10 × 10 square moved one column right: every boundary pixel of
    # each lies 0 or 1 px from the other's; the overlap is 10 × 9 of a union of 10 × 11.
    truth, pred = square((50, 50), 10, 10, 10), square((50, 50), 10, 11, 10)
    assert boundary_f(truth, pred) == 1.0
    assert jaccard(truth, pred) == pytest.approx(90 / 110)


def test_a_shift_beyond_the_tolerance_lowers_f():
    # Each square's boundary is the 11 × 11 ring rows 9..19, cols c-1..c+9 (40 px). Moved 5
    # columns right, a ring's pixels within 1 px of the other ring: 7 on its top row (6 shared
    # columns and one a step away), 7 on its bottom row, and the two ends of its left column,
    # one step from the other's top and bottom rows: 16 of 40 each way. P = R = F = 0.4.
    truth, pred = square((50, 50), 10, 10, 10), square((50, 50), 10, 15, 10)
    assert boundary_f(truth, pred) == pytest.approx(0.4)
    assert jaccard(truth, pred) == pytest.approx(50 / 150)


def test_empty_masks():
    empty, m = np.zeros((40, 40), bool), square((40, 40), 5, 5, 10)
    assert jaccard(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert jaccard(m, empty) == 0.0 and boundary_f(m, empty) == 0.0  # nothing found: recall 0
    assert jaccard(empty, m) == 0.0 and boundary_f(empty, m) == 0.0  # nothing there: precision 0


def test_void_pixels_count_for_neither_mask():
    truth = square((50, 50), 10, 10, 10)
    void = rect((50, 50), 10, 20, 10, 10)  # the ten columns right of the object
    pred = truth | rect((50, 50), 10, 20, 10, 6)  # spills six columns into the void
    assert jaccard(truth, pred) == pytest.approx(100 / 160)
    assert jaccard(truth, pred, void) == 1.0
    assert boundary_f(truth, pred) < 1.0
    assert boundary_f(truth, pred, void) == 1.0
    # a prediction that misses half the object and covers a void pixel besides: 50 / 100
    half = rect((50, 50), 10, 10, 10, 5)
    assert jaccard(truth, half | void, void) == pytest.approx(50 / 100)


def test_boundary_follows_the_definition():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((12, 15)) < 0.4
        assert np.array_equal(boundary(m), boundary_by_definition(m))
    # a 6 × 4 rectangle clear of the edges: its ring has 2·6 + 2·4 pixels
    assert boundary(rect((20, 20), 5, 5, 6, 4)).sum() == 2 * 6 + 2 * 4
    # the image's own border is no boundary: a mask filling the frame has none
    assert not boundary(np.ones((7, 9), bool)).any()


def test_boundary_f_matches_the_definition_by_brute_force():
    rng = np.random.default_rng(1)
    for shape in ((20, 30), (64, 128)):  # tolerance 1 and 2 px
        for _ in range(3):
            truth = np.zeros(shape, bool)
            pred = np.zeros(shape, bool)
            for m in (truth, pred):
                for _ in range(2):
                    r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
                    m[r:r + rng.integers(2, 9), c:c + rng.integers(2, 12)] = True
            assert boundary_f(truth, pred) == pytest.approx(f_by_definition(truth, pred))


# ------------------------------------------------------------------ per object and over objects


def test_recall_and_decay_as_the_official_statistics():
    # n = 7: quarters cut at round(linspace(1, 7, 5)) - 1 = [0, 2, 3, 5, 6] (2.5 -> 3, 5.5 -> 6);
    # the first quarter is frames 0..2, the last 5..6.
    values = [1.0, 1.0, 0.2, 0.4, 0.6, 0.8, 0.0]
    mean, recall, decay = statistics(values)
    assert mean == pytest.approx(4.0 / 7)
    assert recall == pytest.approx(4 / 7)  # 1, 1, 0.6 and 0.8 are above 0.5
    assert decay == pytest.approx((1 + 1 + 0.2) / 3 - (0.8 + 0.0) / 2)
    # n = 4: cuts [0, 1, 2, 2, 3] (1.75 -> 2, 3.25 -> 3): quarters 0..1 and 2..3
    assert statistics([1.0, 0.8, 0.3, 0.1]) == pytest.approx((0.55, 0.5, 0.9 - 0.2))
    # one scored frame: both quarters are that frame
    assert statistics([0.7]) == pytest.approx((0.7, 1.0, 0.0))


def test_ground_truth_void_is_background_as_in_the_semi_supervised_evaluation():
    truth = np.zeros((3, 50, 50), np.uint8)
    truth[:, 10:20, 10:20] = 1
    truth[:, 10:20, 20:25] = 255  # void beside the object
    pred = np.zeros_like(truth)
    pred[:, 10:20, 10:25] = 1  # covers object and void
    (score,) = score_sequence("s", truth, pred, objects=1)
    assert score.j_mean == pytest.approx(100 / 150)
    assert score.frames == 3 and score.name == "s_1"


def test_the_global_means_weigh_objects_not_sequences():
    def obj(seq, o, j, f):
        return ObjectScore(seq, o, 10, j, float(j > 0.5), 0.0, f, float(f > 0.5), 0.0)

    scores = [obj("a", 1, 1.0, 1.0), obj("b", 1, 1.0, 0.8), obj("b", 2, 0.0, 0.2), obj("b", 3, 0.0, 0.0)]
    summary = summarize(scores)
    assert summary["J-Mean"] == pytest.approx((1 + 1 + 0 + 0) / 4)  # per sequence it would be 2/3
    assert summary["F-Mean"] == pytest.approx((1 + 0.8 + 0.2 + 0) / 4)
    assert summary["J&F-Mean"] == pytest.approx((0.5 + 0.5) / 2)
    assert summary["J-Recall"] == pytest.approx(2 / 4)
    assert list(summary) == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
