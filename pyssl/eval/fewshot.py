"""Few-shot classification on frozen features: ``n_way``-way ``n_shot``-shot episodes drawn
from the test set; each episode's classifier is nearest prototype (class means of the support
features, after centring on the base-set mean and L2 normalisation: SimpleShot's CL2N) or a
logistic regression fitted on the support set. Reported: mean accuracy over episodes with its
95% confidence interval (1.96 * std / sqrt(episodes))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["fewshot_eval"]


def _logreg(xs, ys, xq, n_way, steps=100):
    w = torch.zeros(xs.shape[1], n_way, requires_grad=True)
    b = torch.zeros(n_way, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, ys) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xq @ w + b).argmax(1)


def fewshot_eval(features: torch.Tensor, labels: torch.Tensor, n_way: int = 5,
                 n_shot: int = 5, n_query: int = 15, episodes: int = 200,
                 classifier: str = "prototype", base_mean: torch.Tensor | None = None,
                 seed: int = 0) -> dict:
    """Returns ``{"acc", "ci95", "episodes", "n_way", "n_shot"}`` (accuracies in [0, 1])."""
    if n_shot < 1 or n_query < 1 or episodes < 1:
        raise ValueError("n_shot, n_query and episodes must be positive")
    if classifier not in ("prototype", "logistic"):
        raise ValueError(f"classifier must be 'prototype' or 'logistic', got {classifier!r}")
    x = features.float() - (base_mean if base_mean is not None else features.mean(0))
    x = F.normalize(x, dim=1)
    by_class = {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}
    # classes with too few samples for an episode are left out of the draw
    by_class = {c: idx for c, idx in by_class.items() if len(idx) >= n_shot + n_query}
    classes = torch.tensor(sorted(by_class))
    if n_way < 2:
        raise ValueError(f"n_way must be >= 2, got {n_way}")
    if n_way > len(classes):
        raise ValueError(f"n_way={n_way} needs {n_way} classes with at least n_shot + n_query = "
                         f"{n_shot + n_query} samples each, but only {len(classes)} have that many "
                         "(lower n_way, n_shots or n_query, or use more data: train_subset)")
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(episodes):
        cls = classes[torch.randperm(len(classes), generator=g)[:n_way]]
        s_idx, q_idx = [], []
        for c in cls.tolist():
            idx = by_class[c][torch.randperm(len(by_class[c]), generator=g)]
            s_idx.append(idx[:n_shot])
            q_idx.append(idx[n_shot:n_shot + n_query])
        xs = x[torch.cat(s_idx)]
        xq = x[torch.cat(q_idx)]
        ys = torch.arange(n_way).repeat_interleave(n_shot)
        yq = torch.arange(n_way).repeat_interleave(n_query)
        if classifier == "prototype":
            protos = F.normalize(xs.reshape(n_way, n_shot, -1).mean(1), dim=1)
            pred = (xq @ protos.T).argmax(1)
        else:
            pred = _logreg(xs, ys, xq, n_way)
        accs.append(float((pred == yq).float().mean()))
    a = torch.tensor(accs)
    ci = 1.96 * float(a.std(unbiased=True)) / math.sqrt(len(a)) if len(a) > 1 else 0.0
    return {"acc": float(a.mean()), "ci95": ci, "episodes": episodes, "n_way": n_way,
            "n_shot": n_shot}
