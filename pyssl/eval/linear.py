"""Linear probe on frozen features: features standardised with the training set's mean and
standard deviation (a BatchNorm without affine parameters, as in MAE's linear probe), one
linear layer trained with AdamW and a cosine schedule on cross-entropy; top-1 accuracy on the
test features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["linear_probe"]


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, epochs: int = 100,
                 lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256,
                 seed: int = 0, num_classes: int | None = None) -> dict:
    """Returns ``{"train_acc", "test_acc"}``."""
    if epochs <= 0 or batch_size <= 0:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    mean = train_features.mean(0)
    std = train_features.std(0).clamp_min(1e-6)
    xtr = (train_features.float() - mean) / std
    xte = (test_features.float() - mean) / std
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=g)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    n = xtr.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            for grp in opt.param_groups:
                grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(layer(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        tr_acc = float((layer(xtr).argmax(1) == train_labels).float().mean())
        te_acc = float((layer(xte).argmax(1) == test_labels).float().mean())
    return {"train_acc": tr_acc, "test_acc": te_acc}
