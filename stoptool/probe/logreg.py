"""Multinomial logistic regression on standardized features (scikit-learn, L2).

The inverse regularization strength C is picked from a small grid on a held-out, stratified
part of the training split; the chosen C is then refit on the whole training split.
"""

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from stoptool.probe.metrics import accuracies, full_scores

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    clf = LogisticRegression(C=c, max_iter=max_iter, tol=1e-4)
    # One BLAS thread: these fits are many small matrix products, which spinning BLAS
    # threads slow down by 10-50x when torch's threads hold the other cores.
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def choose_c(x: np.ndarray, y: np.ndarray, grid=C_GRID, held_out: float = 0.2, seed: int = 0,
             max_iter: int = 1000) -> tuple[float, dict[float, float]]:
    """C with the best held-out accuracy (the smaller C on ties); x is already standardized.

    With too few images per class to hold some out, C = 1 is used.
    """
    counts = np.bincount(y)
    counts = counts[counts > 0]
    n_val = int(round(held_out * len(y)))
    if counts.min() < 2 or n_val < len(counts) or len(y) - n_val < len(counts):
        return 1.0, {}
    x_fit, x_val, y_fit, y_val = train_test_split(
        x, y, test_size=n_val, random_state=seed, stratify=y
    )
    scores = {c: float((_fit(x_fit, y_fit, c, max_iter).predict(x_val) == y_val).mean()) for c in grid}
    best = max(scores.values())
    return min(c for c, s in scores.items() if s == best), scores


def logreg_probe(x_train, y_train, x_test, y_test, num_classes: int, seed: int = 0,
                 grid=C_GRID, max_iter: int = 1000) -> dict:
    scaler = StandardScaler().fit(x_train)
    xs_train, xs_test = scaler.transform(x_train), scaler.transform(x_test)
    c, val_scores = choose_c(xs_train, y_train, grid, seed=seed, max_iter=max_iter)
    clf = _fit(xs_train, y_train, c, max_iter)
    raw = clf.decision_function(xs_test)
    if len(clf.classes_) == 2:  # binary: sklearn returns one column, the positive class's
        raw = np.stack([-raw, raw], 1)
    scores = full_scores(raw.reshape(len(x_test), -1), clf.classes_, num_classes)
    result = accuracies(scores, y_test, num_classes)
    result["params"] = {"C": c, "held_out_accuracy": {str(k): v for k, v in val_scores.items()}}
    return result
