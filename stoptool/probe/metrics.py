"""Top-k accuracy from class scores."""

import numpy as np


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest scores (ties: lowest index first)."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def accuracies(scores: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    """top-1 always; top-5 only when there are more than 5 classes."""
    out = {"top1": topk_accuracy(scores, y, 1)}
    out["top5"] = topk_accuracy(scores, y, 5) if num_classes > 5 else None
    return out


def full_scores(scores: np.ndarray, present: np.ndarray, num_classes: int) -> np.ndarray:
    """Spread scores over the classes a classifier saw (`present`) into all `num_classes`."""
    out = np.full((scores.shape[0], num_classes), -np.inf, dtype=np.float64)
    out[:, present] = scores
    return out
