"""Context encoder: mask a region of the image and reconstruct it from its context.

Paper: Pathak, Krähenbühl, Donahue, Darrell, Efros, "Context Encoders: Feature Learning by
Inpainting", CVPR 2016. As in the paper: a region of the image is masked (filled with the mean,
0 in normalised pixels), an encoder-decoder predicts the image, the loss is L2 on the masked
region with the pixels in an ``overlap`` band along the hole's border weighted
``overlap_weight`` (10x in the paper), and optionally an adversarial term
(``adversarial_weight``, paper 0.001 vs 0.999 for reconstruction) from a small discriminator
that tells real from inpainted images. Masks (``mask=``): ``region`` (default; random shapes
covering ``hole_fraction**2`` of the image, the paper's "random region" masks, which gave its
best features), ``central`` (the central square of side ``hole_fraction``) or ``random`` (that
square at a random position: "random block"). Like the paper's encoder, whose features pass
through a global bottleneck (a fully connected layer) before the decoder,
``bottleneck=global`` (default) decodes from the pooled feature vector (one linear layer to a
grid, then up-convolutions), so the pooled features must describe the whole image;
``bottleneck=map`` decodes the last feature map directly.

The adversarial term needs no second optimizer: the discriminator's loss sees the inpainted
patch detached, and the generator's adversarial loss runs the discriminator with its
parameters detached (``torch.func.functional_call``), so one backward gives both players the
right gradients.

Small-scale differences: 28-32 px images (paper 128), ResNet-10 encoder with a transposed-
convolution decoder, region masks from thresholded smooth noise instead of PASCAL segmentation
shapes, SGD + momentum with a cosine schedule (the paper used Adam; at a few hundred steps
from a random init, Adam's per-weight normalised steps overwrote the initial weights and
measured 1-2 points worse on Fashion-MNIST); the adversarial term is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..engine.config import ConfigError
from ..engine.recipe import Recipe, RecipeConfig
from .common import light_augment, normalize_pixels, resize

__all__ = ["Inpainting", "InpaintingConfig", "hole_mask", "region_mask"]


def hole_mask(size: int, hole: int, top: int | None = None, left: int | None = None
              ) -> torch.Tensor:
    """bool ``[size, size]``, True inside the square hole (centred unless top/left given)."""
    top = (size - hole) // 2 if top is None else top
    left = (size - hole) // 2 if left is None else left
    m = torch.zeros(size, size, dtype=torch.bool)
    m[top:top + hole, left:left + hole] = True
    return m


def region_mask(size: int, fraction: float, grid: int = 4) -> torch.Tensor:
    """bool ``[size, size]``: a random-region mask (Pathak et al.'s "random region" variant,
    which gave their best features): smooth random noise on a ``grid`` x ``grid`` lattice,
    upsampled bilinearly and thresholded so that about ``fraction`` of the pixels are masked,
    giving one or a few blobs of arbitrary shape. Randomness from torch's global RNG."""
    noise = torch.rand(1, 1, grid, grid)
    up = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    k = max(1, min(size * size, round(fraction * size * size)))
    thr = up.flatten().kthvalue(size * size - k + 1).values
    return up >= thr


def border_weights(mask: torch.Tensor, overlap: int, weight: float) -> torch.Tensor:
    """Loss weights ``[..., H, W]``: 1 inside the hole, ``weight`` within ``overlap`` px of the
    hole's border (inside it), 0 outside."""
    m = mask.float()
    if overlap <= 0:
        return m
    inner = -F.max_pool2d(-m.reshape(-1, 1, *m.shape[-2:]), 2 * overlap + 1, 1, overlap)
    inner = inner.reshape(m.shape)
    return m * (1 + (weight - 1) * (1 - inner))


class _Bottleneck(nn.Module):
    """Pooled encoder features ``[B, D]`` -> a ``[B, width, h, h]`` grid through one fully
    connected layer (the context encoder's global bottleneck)."""

    def __init__(self, in_dim: int, width: int, h: int):
        super().__init__()
        self.width, self.h = width, h
        self.fc = nn.Linear(in_dim, width * h * h)
        self.post = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(True))

    def forward(self, x):
        return self.post(self.fc(x).view(x.shape[0], self.width, self.h, self.h))


class _Decoder(nn.Module):
    def __init__(self, in_dim: int, out_chans: int, steps: int, width: int = 128,
                 global_h: int = 0):
        super().__init__()
        layers: list[nn.Module] = ([_Bottleneck(in_dim, width, global_h)] if global_h
                                   else [nn.Conv2d(in_dim, width, 1)])
        c = width
        for _ in range(steps):
            n = max(32, c // 2)
            layers += [nn.ConvTranspose2d(c, n, 4, 2, 1), nn.BatchNorm2d(n), nn.ReLU(True)]
            c = n
        layers += [nn.Conv2d(c, out_chans, 3, 1, 1), nn.Tanh()]   # pixels are in [-1, 1]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _discriminator(chans: int, width: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(chans, width, 4, 2, 1), nn.LeakyReLU(0.2, True),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2, True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1))


@dataclass
class InpaintingConfig(RecipeConfig):
    hole_fraction: float = 0.5       # hole side / image side
    mask: str = "region"             # region (random shapes) | central | random (block)
    bottleneck: str = "global"       # global (decode the pooled vector) | map (the last map)
    overlap: int = 2
    overlap_weight: float = 10.0
    adversarial_weight: float = 0.0  # paper: 0.001 (with reconstruction weight 0.999)


class Inpainting(Recipe):
    name = "inpainting"
    description = "context encoder: reconstruct a masked central region (L2, optional GAN term)"
    paper = ("Pathak et al., Context Encoders: Feature Learning by Inpainting, CVPR 2016")
    small_scale = ("28-32 px images, random-region masks over 1/4 of the image, 2 px overlap "
                   "band weighted 10x, ResNet-10 encoder + pooled bottleneck + transposed-conv "
                   "decoder, SGD (paper: Adam), adversarial term off by default")
    Config = InpaintingConfig
    train_defaults = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                      "batch_size": 128, "epochs": 10}

    def __init__(self, cfg: InpaintingConfig, channels: int):
        super().__init__(cfg, channels)
        if not 0 < cfg.hole_fraction < 1:
            raise ConfigError(f"hole_fraction={cfg.hole_fraction}: must be in (0, 1)")
        if cfg.mask not in ("central", "random", "region"):
            raise ConfigError(f"mask={cfg.mask!r}: must be 'central', 'random' or 'region'")
        if cfg.bottleneck not in ("map", "global"):
            raise ConfigError(f"bottleneck={cfg.bottleneck!r}: must be 'map' or 'global'")
        if cfg.adversarial_weight < 0 or cfg.adversarial_weight >= 1:
            raise ConfigError(f"adversarial_weight={cfg.adversarial_weight}: must be in [0, 1)")
        self.backbone = self.build_encoder()
        size = cfg.image_size
        x = torch.zeros(1, channels, size, size)
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            fmap = self.backbone.forward_features(x)["map"]
            self.backbone.train(was)
        steps = max(0, (size // fmap.shape[-1]).bit_length() - 1)
        self.decoder = _Decoder(fmap.shape[1], channels, steps,
                                global_h=fmap.shape[-1] if cfg.bottleneck == "global" else 0)
        self.hole = max(1, round(size * cfg.hole_fraction))
        self.disc = _discriminator(channels) if cfg.adversarial_weight > 0 else None
        self.aug = light_augment(size, (0.7, 1.0))

    @property
    def encoder(self):
        return self.backbone

    def views(self, image, label):
        size, hole = self.cfg.image_size, self.hole
        x = normalize_pixels(self.aug(resize(image, size)))
        if self.cfg.mask == "region":
            return x, region_mask(size, self.cfg.hole_fraction ** 2)
        if self.cfg.mask == "random":
            top, left = (int(v) for v in torch.randint(0, size - hole + 1, (2,)))
        else:
            top = left = (size - hole) // 2
        return x, hole_mask(size, hole, top, left)

    def training_step(self, batch, ctx):
        x, mask = batch                                    # [B, C, H, W], [B, H, W]
        m = mask.unsqueeze(1).to(x.dtype)
        feats = self.backbone.forward_features(x * (1 - m))
        pred = self.decoder(feats["pooled" if self.cfg.bottleneck == "global" else "map"])
        if pred.shape[-2:] != x.shape[-2:]:
            pred = F.interpolate(pred, size=x.shape[-2:], mode="bilinear", align_corners=False)
        w = border_weights(mask, self.cfg.overlap, self.cfg.overlap_weight).unsqueeze(1)
        rec = (w * (pred.float() - x.float()) ** 2).sum() / (w.sum() * x.shape[1]).clamp_min(1)
        out = {"rec_loss": rec}
        loss = rec
        if self.disc is not None:
            lam = self.cfg.adversarial_weight
            fake = pred * m + x * (1 - m)                   # the inpainted image
            real_logit = self.disc(x)
            fake_logit_d = self.disc(fake.detach())
            d_loss = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                      + F.binary_cross_entropy_with_logits(fake_logit_d,
                                                           torch.zeros_like(fake_logit_d)))
            frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
            g_logit = functional_call(self.disc, frozen, (fake,))
            g_adv = F.binary_cross_entropy_with_logits(g_logit, torch.ones_like(g_logit))
            loss = (1 - lam) * rec + lam * g_adv + d_loss
            out.update(d_loss=d_loss, g_adv=g_adv)
        out["loss"] = loss
        return out
