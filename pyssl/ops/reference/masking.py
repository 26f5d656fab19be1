"""Reference implementations of the patch-masking ops (plain PyTorch / Python)."""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


class SplitMix64:
    """Python twin of csrc/kernels/rng.h: the same seed gives the same stream."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self, a: float = 0.0, b: float = 1.0) -> float:
        u = (self.next() >> 11) * 2.0**-53
        return a + (b - a) * u

    def randint(self, a: int, b: int) -> int:
        r = a + int(self.uniform() * float(b - a + 1))
        return min(r, b)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """MAE's random masking (He et al., 2022), exactly: stable ascending argsort of the noise,
    keep the first ``int(L * (1 - mask_ratio))`` tokens, restore order by the inverse
    permutation. Returns (visible, mask, ids_keep, ids_restore)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, dtype=torch.bool, device=x.device)
    mask[:, :len_keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_keep, ids_restore


def unshuffle_tokens(visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor):
    """MAE's decoder restore: append L - K mask tokens, then gather by ids_restore."""
    N, K, D = visible.shape
    L = ids_restore.shape[1]
    full = torch.cat([visible, mask_token.view(1, 1, D).expand(N, L - K, D)], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))


def _block_mask_sample(seed, height, width, num_masking, min_patches, max_patches, log_lo,
                       log_hi, exact):
    rng = SplitMix64(seed)
    mask = [[False] * width for _ in range(height)]
    count = 0
    while count < num_masking:
        budget = min(num_masking - count, max_patches)
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(float(min_patches), float(budget))
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(target_area * aspect)))  # round half to even, as rint
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                already = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                fresh = h * w - already
                if 0 < fresh <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            mask[i][j] = True
                    delta += fresh
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    if exact and count < num_masking:
        free = [i * width + j for i in range(height) for j in range(width) if not mask[i][j]]
        for i in range(num_masking - count):
            j = rng.randint(i, len(free) - 1)
            free[i], free[j] = free[j], free[i]
            mask[free[i] // width][free[i] % width] = True
    return mask


def block_masking(seeds: torch.Tensor, height: int, width: int, num_masking_patches: int,
                  min_num_patches: int = 4, max_num_patches: int | None = None,
                  min_aspect: float = 0.3, max_aspect: float | None = None,
                  exact: bool = True) -> torch.Tensor:
    """BEiT's block-wise masking (Bao et al., 2022) driven by one SplitMix64 seed per sample,
    a per-sample Python loop. The compiled kernels run the same algorithm on the same streams."""
    if max_num_patches is None:
        max_num_patches = num_masking_patches
    if max_aspect is None:
        max_aspect = 1.0 / min_aspect
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    masks = [
        _block_mask_sample(int(s), height, width, num_masking_patches, min_num_patches,
                           max_num_patches, log_lo, log_hi, exact)
        for s in seeds.tolist()
    ]
    out = torch.tensor(masks, dtype=torch.bool).reshape(len(masks), height, width)
    return out.to(seeds.device)
