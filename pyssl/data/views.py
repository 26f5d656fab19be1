"""Deterministic views: the augmentation randomness of sample ``i`` in epoch ``e`` is a pure
function of ``(seed, e, i)``, and the order of samples is a pure function of ``(seed, e)``.

That makes a resumed run exact: skipping the batches already seen gives the same next batches,
whatever the number of data-loader workers or processes."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["EpochSampler", "ViewDataset", "mix_seed"]

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across processes and Python runs)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK))
    return h & ((1 << 63) - 1)


class ViewDataset(Dataset):
    """Wraps an image dataset with a ``views(image, label)`` function. Each ``__getitem__``
    runs ``views`` under a CPU RNG forked and seeded with ``mix_seed(seed, epoch, index)``, so
    torchvision's (global-RNG) transforms are reproducible per sample; the caller's RNG is
    untouched."""

    def __init__(self, base: Dataset, views, seed: int = 0):
        self.base, self.views, self.seed, self.epoch = base, views, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, i))
            return self.views(img, label)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (seeded per epoch, rank ``r`` takes every ``world``-th index of
    the epoch's permutation) that can start part-way through an epoch: ``start`` is the number
    of this rank's samples to skip (``batches_done * per_rank_batch``)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
