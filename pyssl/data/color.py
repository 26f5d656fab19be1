"""sRGB <-> CIE Lab (D65 white, 2-degree observer) in torch, differentiable, on ``[..., 3, H, W]``
tensors; the same formulas as ``skimage.color.rgb2lab`` / ``lab2rgb``."""

from __future__ import annotations

import torch

__all__ = ["lab_to_rgb", "rgb_to_lab"]

_RGB2XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,...jhw->...ihw", m.to(x.dtype).to(x.device), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], ``[..., 3, H, W]`` -> Lab (L in [0, 100], a/b roughly [-128, 127])."""
    if rgb.shape[-3] != 3:
        raise ValueError(f"rgb must have 3 channels at dim -3, got shape {tuple(rgb.shape)}")
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(1e-12) ** 2.4,
                      rgb / 12.92)
    xyz = _mix(_RGB2XYZ, lin) / _WHITE.to(rgb.dtype).to(rgb.device).view(3, 1, 1)
    eps = 0.008856
    f = torch.where(xyz > eps, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    L = torch.where(xyz[..., 1, :, :] > eps, 116 * fy - 16, 903.3 * xyz[..., 1, :, :])
    return torch.stack([L, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab ``[..., 3, H, W]`` -> sRGB clipped to [0, 1]."""
    if lab.shape[-3] != 3:
        raise ValueError(f"lab must have 3 channels at dim -3, got shape {tuple(lab.shape)}")
    L, a, b = lab.unbind(-3)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787)
    xyz = xyz * _WHITE.to(lab.dtype).to(lab.device).view(3, 1, 1)
    lin = _mix(torch.linalg.inv(_RGB2XYZ), xyz)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055,
                      12.92 * lin)
    return rgb.clamp(0, 1)
