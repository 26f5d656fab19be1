"""Loss modules over pyssl's ops (DINO/iBOT, contrastive, reconstruction, distillation).

Import submodules directly (``from pyssl.losses.dino import DINOLoss``) or the names below."""

from .dino import DINOLoss, IBOTPatchLoss

__all__ = ["DINOLoss", "IBOTPatchLoss"]
