"""Loss modules over pyssl's ops (DINO/iBOT, contrastive, reconstruction, distillation).

Import submodules directly (``from pyssl.losses.dino import DINOLoss``) or the names below."""

from .contrastive import ClipLoss, InfoNCELoss, NTXentLoss, gather_with_grad, info_nce, nt_xent
from .dino import DINOLoss, IBOTPatchLoss
from .koleo import KoLeoLoss, koleo_loss

__all__ = ["ClipLoss", "DINOLoss", "IBOTPatchLoss", "InfoNCELoss", "KoLeoLoss", "NTXentLoss",
           "gather_with_grad", "info_nce", "koleo_loss", "nt_xent"]
