"""k-nearest-neighbour probe: cosine similarity, k = 20, temperature-weighted votes.

As in DINO's evaluation: each of the k most similar training images votes for its class
with weight exp(similarity / T), T = 0.07.
"""

import numpy as np
import torch
import torch.nn.functional as F

from stoptool.probe.metrics import accuracies


def knn_scores(x_train, y_train, x_test, num_classes: int, k: int = 20, temperature: float = 0.07,
               chunk: int = 1024, device: str | torch.device = "cpu") -> np.ndarray:
    """Class votes [N_test, C]."""
    train = F.normalize(torch.as_tensor(x_train, dtype=torch.float32, device=device), dim=1)
    labels = torch.as_tensor(y_train, dtype=torch.int64, device=device)
    test = torch.as_tensor(x_test, dtype=torch.float32, device=device)
    k = min(k, len(train))
    out = []
    for start in range(0, len(test), chunk):
        q = F.normalize(test[start : start + chunk], dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=device, dtype=torch.float32)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes.cpu())
    return torch.cat(out).double().numpy()


def knn_probe(x_train, y_train, x_test, y_test, num_classes: int, k: int = 20,
              temperature: float = 0.07, device: str | torch.device = "cpu") -> dict:
    scores = knn_scores(x_train, y_train, x_test, num_classes, k, temperature, device=device)
    result = accuracies(scores, y_test, num_classes)
    result["params"] = {"k": min(k, len(x_train)), "temperature": temperature}
    return result
