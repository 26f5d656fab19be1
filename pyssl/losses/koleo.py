"""KoLeo regulariser (Kozachenko-Leonenko differential-entropy estimator), as DINOv2 uses it
(Oquab et al. 2023, after Sablayrolles et al., "Spreading vectors for similarity search",
ICLR 2019) to spread the features of a batch uniformly.

For ``n`` rows ``x_i`` L2-normalised to the unit sphere,
``L = -1/n * sum_i log(d_i + eps)`` with ``d_i = min_{j != i} ||x_i - x_j||`` the distance to
the nearest other row. On the sphere the nearest neighbour is the row of largest inner
product, so it is found with one ``[n, n]`` matrix product; the distance is then computed
directly from the two rows (exact, and the gradient flows to both of them). DINOv2 applies it to
the CLS outputs of each global crop separately, per process, with weight 0.1.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KoLeoLoss", "koleo_loss"]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, normalize: bool = True) -> torch.Tensor:
    """KoLeo loss of the rows of ``x`` ``[n, D]`` (``n >= 2``); see the module docstring."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor, got "
                        + (str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__))
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [n, D], got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 rows (a nearest neighbour), got {x.shape[0]}")
    x = x if x.dtype == torch.float64 else x.float()
    if normalize:
        x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(float("-inf"))
        nn_idx = sim.argmax(dim=1)
    dist = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(dist + eps).mean()


class KoLeoLoss(nn.Module):
    """:func:`koleo_loss` as a module."""

    def __init__(self, eps: float = 1e-8, normalize: bool = True):
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps, self.normalize = float(eps), bool(normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return koleo_loss(x, self.eps, self.normalize)
