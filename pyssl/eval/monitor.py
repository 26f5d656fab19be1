"""k-NN accuracy during pretraining (DINO's monitor): after each epoch, the encoder's frozen
features of a labelled training subset vote for the classes of a test subset (weighted k-NN,
:func:`pyssl.eval.knn.knn_accuracy`), and the curve is written into the run folder:
``knn.jsonl`` (one record per epoch; epoch 0 is the encoder before training) and
``figures/knn.png``."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..engine.distributed import is_rank_zero
from ..engine.logger import save_figure
from .features import extract_features
from .knn import knn_accuracy

__all__ = ["KNNMonitor", "plot_knn_curve"]


class KNNMonitor:
    """``KNNMonitor(run_dir, data, train_size, test_size)``; ``evaluate(encoder, spec, epoch)``
    returns the accuracy and records it. ``data`` is a ``--data`` name or path with labels
    (unlabelled data disables the monitor with one warning)."""

    def __init__(self, run_dir, data: str, train_size: int = 2000, test_size: int = 1000,
                 k: int = 20, temperature: float = 0.07, seed: int = 0, root: str | None = None,
                 batch_size: int = 256):
        from ..data.datasets import resolve_data

        self.dir = Path(run_dir)
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.train = resolve_data(data, "train", subset=train_size, seed=seed, root=root)
        self.test = resolve_data(data, "test", subset=test_size, seed=seed + 1, root=root)
        self.enabled = bool(self.train.num_classes)
        if not self.enabled:
            warnings.warn(f"k-NN monitor: --data {data!r} has no labels; monitor disabled",
                          RuntimeWarning, stacklevel=2)
        self.data = data

    @property
    def path(self) -> Path:
        return self.dir / "knn.jsonl"

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def has(self, epoch: int) -> bool:
        return any(r.get("epoch") == epoch for r in self.records())

    @torch.no_grad()
    def evaluate(self, encoder: nn.Module, spec: dict, epoch: int, extra: dict | None = None
                 ) -> float | None:
        if not self.enabled:
            return None
        modes = {m: m.training for m in encoder.modules()}
        try:
            dev = next(encoder.parameters()).device
            tr = extract_features(encoder, spec, self.train, self.batch_size, device=dev)
            te = extract_features(encoder, spec, self.test, self.batch_size, device=dev)
        finally:
            for m, mode in modes.items():
                m.train(mode)
        acc = knn_accuracy(*tr, *te, k=self.k, temperature=self.temperature,
                           num_classes=self.train.num_classes)
        if not is_rank_zero():
            return acc  # a sharded encoder: every rank computes, rank 0 writes
        recs = [r for r in self.records() if r.get("epoch") != epoch]
        recs.append({"epoch": int(epoch), "knn": acc, "k": self.k, "data": self.data,
                     "train": len(self.train), "test": len(self.test), **(extra or {})})
        recs.sort(key=lambda r: r["epoch"])
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(".knn.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
        os.replace(tmp, self.path)
        plot_knn_curve(recs, self.dir / "figures" / "knn.png")
        return acc


def plot_knn_curve(records: list[dict], out_png, title: str | None = None) -> Path | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in records]
    acc = [100 * r["knn"] for r in records]
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ax.plot(ep, acc, "o-", lw=1.5)
    for e, a in zip(ep, acc):
        ax.annotate(f"{a:.1f}", (e, a), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=7)
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("k-NN top-1 (%)")
    r0 = records[-1]
    ax.set_title(title or f"k-NN (k={r0.get('k')}) on {r0.get('data')}: "
                          f"{r0.get('train')}/{r0.get('test')}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)
