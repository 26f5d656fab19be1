"""Reference implementation of point sampling (plain PyTorch, differentiable)."""

from __future__ import annotations

import torch

BILINEAR, NEAREST = 0, 1


def _image_of_points(image_index, M, N, device):
    if image_index is not None:
        return image_index
    per_image = M // N if N else 0
    return torch.arange(M, device=device) // max(per_image, 1)


def sample_points(features: torch.Tensor, image_index, xy: torch.Tensor, mode: int = BILINEAR):
    """Samples ``features`` [N, D, H, W] at points ``xy`` [M, 2] (x = column, y = row, pixel
    units; pixel (i, j) is centred at x = j, y = i) of images ``image_index`` [M] (or, when None,
    point m in image m // (M / N)). Bilinear with zeros outside (= grid_sample with
    align_corners=True, padding_mode="zeros"), or nearest (round half to even). Returns [M, D]."""
    N, D, H, W = features.shape
    M = xy.shape[0]
    n = _image_of_points(image_index, M, N, xy.device)
    x, y = xy[:, 0], xy[:, 1]
    finite = torch.isfinite(x) & torch.isfinite(y) & (x > -2) & (x < W + 1) & (y > -2) & (y < H + 1)
    x = torch.where(finite, x, torch.zeros_like(x))
    y = torch.where(finite, y, torch.zeros_like(y))

    def tap(ix, iy, w):
        inside = finite & (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
        vals = features[n, :, iy.clamp(0, H - 1).long(), ix.clamp(0, W - 1).long()]  # [M, D]
        return vals * (w * inside).unsqueeze(-1).to(vals.dtype)

    if mode == NEAREST:
        return tap(torch.round(x), torch.round(y), torch.ones_like(x))
    x0, y0 = torch.floor(x), torch.floor(y)
    ax, ay = x - x0, y - y0
    return (tap(x0, y0, (1 - ax) * (1 - ay)) + tap(x0 + 1, y0, ax * (1 - ay))
            + tap(x0, y0 + 1, (1 - ax) * ay) + tap(x0 + 1, y0 + 1, ax * ay))
