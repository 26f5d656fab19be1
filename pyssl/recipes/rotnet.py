"""RotNet: predict which of four rotations (0, 90, 180, 270 degrees) was applied.

Paper: Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018. As in the paper, every image appears in all four rotations in the same
batch (their best setting), and the loss is 4-way cross-entropy.

Small-scale differences: a ResNet-10 (width 32, CIFAR stem) instead of NIN/AlexNet, 32 px
images, AdamW with a cosine schedule instead of SGD with step decay, a 2-layer MLP head on the
pooled features (the paper's classifier sits on conv blocks), tens of epochs -> a few.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.recipe import Recipe, RecipeConfig
from .common import light_augment, mlp, normalize_pixels, resize

__all__ = ["RotNet", "RotNetConfig", "rotate_four"]


def rotate_four(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[C, H, W]`` -> ``([4, C, H, W], labels [4])``: rotations by k * 90 degrees
    counter-clockwise (``torch.rot90`` in the image plane), label ``k``."""
    rots = torch.stack([torch.rot90(img, k, dims=(-2, -1)) for k in range(4)])
    return rots, torch.arange(4)


@dataclass
class RotNetConfig(RecipeConfig):
    head_hidden: int = 256
    crop_scale_min: float = 0.6


class RotNet(Recipe):
    name = "rotnet"
    description = "predict the rotation (0/90/180/270) of an image; all four per batch"
    paper = "Gidaris et al., Unsupervised Representation Learning by Predicting Image Rotations, ICLR 2018"
    small_scale = ("ResNet-10 w32 at 32 px, AdamW + cosine, MLP head on pooled features, "
                   "a few epochs instead of ~100")
    Config = RotNetConfig
    train_defaults = {"lr": 2e-3, "weight_decay": 0.05, "batch_size": 64, "epochs": 10}

    def __init__(self, cfg: RotNetConfig, channels: int):
        super().__init__(cfg, channels)
        self.backbone = self.build_encoder()
        self.head = mlp(self.backbone.num_features, cfg.head_hidden, 4)
        self.aug = light_augment(cfg.image_size, (cfg.crop_scale_min, 1.0))

    @property
    def encoder(self):
        return self.backbone

    def views(self, image, label):
        x = normalize_pixels(self.aug(resize(image, self.cfg.image_size)))
        return rotate_four(x)

    def training_step(self, batch, ctx):
        x, y = batch                                   # [B, 4, C, H, W], [B, 4]
        x, y = x.flatten(0, 1), y.flatten()
        logits = self.head(self.backbone(x))
        loss = F.cross_entropy(logits.float(), y)
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "acc": acc}
