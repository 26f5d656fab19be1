"""Weighted k-nearest-neighbour classification on frozen features, as in DINO (Caron et al.
2021, after Wu et al. 2018): cosine similarity, the ``k`` most similar training samples vote
for their class with weight ``exp(sim / T)``; defaults ``k = 20``, ``T = 0.07``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "knn_predict"]


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                test_features: torch.Tensor, num_classes: int | None = None, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``[N_test, num_classes]`` (the weighted votes)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels have different lengths")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    tr = F.normalize(train_features.float(), dim=1)
    te = F.normalize(test_features.float(), dim=1)
    out = []
    for i in range(0, te.shape[0], chunk):
        sim = te[i:i + chunk] @ tr.T
        s, idx = sim.topk(k, dim=1)
        w = (s / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], w)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None) -> float:
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k,
                         temperature)
    return float((scores.argmax(1) == test_labels).float().mean())
