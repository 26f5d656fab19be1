"""SimCLR: two augmented views of each image, an encoder and a projection MLP, and the NT-Xent
contrastive loss over the global batch.

Paper: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020. As in the paper: two views per image from random resized crops,
flips and colour distortion (brightness/contrast on grayscale data) and blur
(:class:`pyssl.data.multicrop.TensorAugment`); a 2-layer
projection MLP with BatchNorm (features for evaluation are taken before it); NT-Xent with
cosine similarity and temperature; negatives are the other ``2N - 2`` views of the global
batch, gathered from every process *with* gradients (:func:`pyssl.losses.nt_xent`).

Small-scale differences: ResNet-10 (width 16-32, CIFAR stem) at 28-32 px instead of ResNet-50
at 224 px; batch 256 instead of 4096; AdamW + cosine instead of LARS; temperature 0.2; crop
scale (0.2, 1) and no blur by default at 28 px; a few epochs instead of hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.multicrop import TensorAugment
from ..losses.contrastive import nt_xent
from ..models.heads import projection_mlp
from ..data.transforms import match_channels
from .common import normalize_pixels
from .modern import ModernConfig, ModernRecipe, check_range

__all__ = ["SimCLR", "SimCLRConfig"]


@dataclass
class SimCLRConfig(ModernConfig):
    temperature: float = 0.2
    proj_hidden: int = 512
    proj_dim: int = 128
    proj_layers: int = 2
    crop_scale_min: float = 0.2
    jitter: float = 0.4         # colour-jitter strength (brightness/contrast[/saturation/hue])
    jitter_p: float = 0.8
    gray_p: float = 0.2         # colour images only
    blur_p: float = 0.0         # paper: 0.5 at 224 px
    solarize_p: float = 0.0


class SimCLR(ModernRecipe):
    name = "simclr"
    description = "SimCLR: two augmented views, projection MLP, NT-Xent over the global batch"
    paper = ("Chen et al., A Simple Framework for Contrastive Learning of Visual "
             "Representations, ICML 2020")
    small_scale = ("ResNet-10 w16-32 at 28-32 px, batch 256, AdamW + cosine instead of LARS, "
                   "temperature 0.2, no blur at 28 px, a few epochs instead of hundreds")
    Config = SimCLRConfig
    train_defaults = {"lr": 2e-3, "weight_decay": 1e-4, "batch_size": 256, "epochs": 20,
                      "warmup_epochs": 1.0}
    find_unused_parameters = False

    def __init__(self, cfg: SimCLRConfig, channels: int):
        super().__init__(cfg, channels)
        self.check_config()
        check_range(cfg, "temperature", 0, lo_open=True)
        check_range(cfg, "crop_scale_min", 0, 1, lo_open=True)
        for k in ("jitter_p", "gray_p", "blur_p", "solarize_p"):
            check_range(cfg, k, 0, 1)
        for k in ("proj_hidden", "proj_dim", "proj_layers"):
            check_range(cfg, k, 1)
        self.backbone = self.build_encoder()
        self.projector = projection_mlp(self.backbone.num_features, cfg.proj_hidden,
                                        cfg.proj_dim, cfg.proj_layers)
        self.aug = TensorAugment(cfg.image_size, channels, (cfg.crop_scale_min, 1.0),
                                 jitter=cfg.jitter, jitter_p=cfg.jitter_p, gray_p=cfg.gray_p,
                                 blur_p=cfg.blur_p, solarize_p=cfg.solarize_p)

    @property
    def encoder(self):
        return self.backbone

    def views(self, image, label):
        img = match_channels(image, self.channels)
        return normalize_pixels(self.aug(img)), normalize_pixels(self.aug(img))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def training_step(self, batch, ctx):
        x1, x2 = batch
        n = x1.shape[0]
        z = self.embed(torch.cat([x1, x2]))          # one pass: BatchNorm sees both views
        z1, z2 = z[:n], z[n:]
        loss = nt_xent(z1, z2, self.cfg.temperature)
        with torch.no_grad():
            a, b = torch.nn.functional.normalize(z1.float(), dim=1), \
                torch.nn.functional.normalize(z2.float(), dim=1)
            sim = a @ b.T
            acc = (sim.argmax(1) == torch.arange(n, device=sim.device)).float().mean()
        return {"loss": loss, "pos_sim": sim.diagonal().mean(), "top1": acc}
