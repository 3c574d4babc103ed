"""k-nearest-neighbour probe: cosine similarity on whitened features, k = 20, temperature-weighted
votes.

Votes as in DINO's evaluation: each of the k most similar training images votes for its class
with weight exp(similarity / T), T = 0.07. The similarity is taken after PCA whitening by the
training split (the bank): minus the bank's mean, each principal direction of the bank divided
by its standard deviation (plus `EPS` × the largest, so that directions with almost no variance
are not blown up). An encoder's average-pooled tokens can put nearly all their energy in their
mean and a few directions that say little about the class (the default demo's: 97-99 % in the
mean, ~99 % of the rest in three directions), while the logistic probe, which is fit, finds the
class in the others; a cosine on the raw features then measures those few directions and can
fall while the logistic probe rises (benchmarks/knn_vs_probe.py, docs/monitoring.md).
Whitening weighs every direction alike, so the k-NN no longer depends on how the encoder
spreads its variance: adding a vector to every feature, rotating or scaling them all leaves it
unchanged. `features="raw"` is DINO's k-NN as published (cosine on the features as they come).
"""

from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from stoptool.options import KNN_FEATURES, KnnFeatures
from stoptool.probe.metrics import accuracies

FEATURES = get_args(KnnFeatures)
EPS = 1e-3  # of the largest principal standard deviation, added to each (a ridge)
CHUNK_ROWS = 65536  # rows of the bank at a time for its covariance (bounded memory at ImageNet size)


def whitening(x_train: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], W [D, D]) with (x - mean) @ W the bank's principal components over their
    standard deviations (+ eps × the largest); in float64, since the directions that matter can
    have a millionth of the largest's variance."""
    n = len(x_train)
    mean = torch.zeros(x_train.shape[1], dtype=torch.float64, device=x_train.device)
    for rows in x_train.split(CHUNK_ROWS):
        mean += rows.double().sum(0)
    mean /= n
    cov = torch.zeros(len(mean), len(mean), dtype=torch.float64, device=x_train.device)
    for rows in x_train.split(CHUNK_ROWS):
        centred = rows.double() - mean
        cov += centred.T @ centred
    var, vectors = torch.linalg.eigh(cov / n)
    std = var.clamp(min=0).sqrt()
    return mean, vectors / (std + eps * std.max())


def knn_scores(x_train, y_train, x_test, num_classes: int, k: int = 20, temperature: float = 0.07,
               features: str = KNN_FEATURES, chunk: int = 1024,
               device: str | torch.device = "cpu") -> np.ndarray:
    """Class votes [N_test, C]."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    train = torch.as_tensor(x_train, dtype=torch.float32, device=device)
    test = torch.as_tensor(x_test, dtype=torch.float32, device=device)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return x if features == "raw" else ((x.double() - mean) @ w).float()

    if features == "whitened":
        mean, w = whitening(train)
    train = torch.cat([F.normalize(embed(rows), dim=1) for rows in train.split(CHUNK_ROWS)])
    labels = torch.as_tensor(y_train, dtype=torch.int64, device=device)
    k = min(k, len(train))
    out = []
    for start in range(0, len(test), chunk):
        q = F.normalize(embed(test[start : start + chunk]), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=device, dtype=torch.float32)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes.cpu())
    return torch.cat(out).double().numpy()


def knn_probe(x_train, y_train, x_test, y_test, num_classes: int, k: int = 20,
              temperature: float = 0.07, features: str = KNN_FEATURES,
              device: str | torch.device = "cpu") -> dict:
    scores = knn_scores(x_train, y_train, x_test, num_classes, k, temperature, features, device=device)
    result = accuracies(scores, y_test, num_classes)
    result["params"] = {"k": min(k, len(x_train)), "temperature": temperature, "features": features}
    return result
