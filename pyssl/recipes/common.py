"""Small pieces the classic recipes share: light augmentation, pixel normalisation, MLP heads."""

from __future__ import annotations

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import nn

from ..data.transforms import to_float

__all__ = ["light_augment", "mlp", "normalize_pixels", "resize"]


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(img.shape[-2:]) == (size, size):
        return img
    return TF.resize(img, [size, size], antialias=True)


def light_augment(size: int, scale=(0.6, 1.0), flip: bool = True) -> T.Compose:
    """Random resized crop (mild) + horizontal flip, on uint8 tensors."""
    ops: list = [T.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops)


def normalize_pixels(img: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float -> [-1, 1] (the default input spec: mean 0.5, std 0.5)."""
    return to_float(img) * 2.0 - 1.0


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, norm: bool = True) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden)]
        if norm:
            mods.append(nn.LayerNorm(hidden))
        mods.append(nn.GELU())
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)
