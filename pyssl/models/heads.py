"""Heads of the joint-embedding recipes: SimCLR's projection MLP and DINO's head (MLP,
bottleneck, L2-normalised bottleneck features, weight-normalised prototype layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear", "projection_mlp"]


def projection_mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2,
                   batch_norm: bool = True, last_bn: bool = False) -> nn.Sequential:
    """SimCLR-style projection head: ``layers - 1`` blocks of Linear (+ BatchNorm) + ReLU, then
    a Linear to ``out_dim`` (optionally followed by an affine-free BatchNorm, as SimCLR v2)."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods.append(nn.Linear(d, hidden, bias=not batch_norm))
        if batch_norm:
            mods.append(nn.BatchNorm1d(hidden))
        mods.append(nn.ReLU(inplace=True))
        d = hidden
    mods.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation (Salimans & Kingma 2016):
    ``W[k] = g[k] * v[k] / ||v[k]||``, ``y = x W^T``. ``fix_norm=True`` freezes ``g`` at 1
    (DINO's ``norm_last_layer``: every prototype is a unit vector, which stabilises training);
    otherwise ``g`` is learned. Row ``k`` of :attr:`weight` is prototype ``k``."""

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be positive, got {in_dim}, {out_dim}")
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim), requires_grad=not fix_norm)
        self.in_features, self.out_features = in_dim, out_dim

    @property
    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return self.weight_g.to(v.dtype)[:, None] * F.normalize(v, dim=1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fix_norm={not self.weight_g.requires_grad}")


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021): an MLP ``in_dim -> hidden -> ... ->
    bottleneck`` (GELU, optional BatchNorm), L2 normalisation of the bottleneck features, and a
    weight-normalised linear layer to ``out_dim`` prototypes (K = 65536 in the paper).

    ``last_layer`` is the prototype layer; ``norm_last_layer=True`` fixes its weight norm at 1.
    DINO freezes it during the first epoch (the recipe drops its gradients then)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, layers: int = 3, batch_norm: bool = False,
                 norm_last_layer: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(d, hidden_dim))
            if batch_norm:
                mods.append(nn.BatchNorm1d(hidden_dim))
            mods.append(nn.GELU())
            d = hidden_dim
        mods.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype != torch.float32 else 1e-12)
        return self.last_layer(z)
