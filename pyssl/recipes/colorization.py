"""Colorization: predict the ab (colour) channels of CIE Lab from the L (lightness) channel.

Paper: Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016. As in the paper: ab is
quantised on a grid of step 10 keeping the in-gamut bins (:func:`ab_bins`: 259 bins from an sRGB
sweep; the paper's 313 also count bins reached at some L only by rounding), each target pixel is soft-encoded over its 5 nearest bins with a Gaussian
(sigma 5), predictions are made at 1/4 resolution, and the cross-entropy is rebalanced per
pixel by ``w ∝ ((1 - λ) p̃ + λ / Q)^-1`` (λ = 0.5, ``p̃`` the empirical ab distribution of the
training data smoothed with a sigma-5 Gaussian, ``E_p̃[w] = 1``) — the prior is estimated from
the first ``prior_samples`` training views in ``on_train_start`` and saved in the checkpoint.
``loss=regression`` gives the plain L2 regression of ab the paper compares against.

The RGB <-> Lab conversion is done in torch (:mod:`pyssl.data.color`). The encoder sees only
L (input spec ``mode="lab_l"``: ``L / 50 - 1``), so it evaluates on grayscale images too.

Colour images are required: Fashion-MNIST and digits are grayscale, so the default data is
``synth-crops`` (:mod:`pyssl.data.synth_crops`: class-labelled 32 px colour crops of the
synthetic driving world, so the encoder can be evaluated on the same kind of data against a
random encoder); ``photos`` (crops of the dozen colour photos shipped with
scikit-image/scikit-learn) or any colour image folder work too.

Small-scale differences: 32 px crops, ResNet-10 w32 encoder + a transposed-conv head instead of
the paper's VGG-style network at 256 px, prior from 2000 views, SGD + momentum with a cosine
schedule (the paper used Adam; at a few hundred steps AdamW measured 2-5 points worse), and
20,000 synthetic colour crops instead of ImageNet.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.color import rgb_to_lab
from ..data.transforms import input_spec, to_float
from ..engine.config import ConfigError
from ..engine.recipe import Recipe, RecipeConfig
from .common import light_augment, resize

__all__ = ["Colorization", "ColorizationConfig", "ab_bins", "soft_encode"]


@functools.lru_cache(maxsize=4)
def ab_bins(step: int = 10, levels: int = 33) -> torch.Tensor:
    """Centres ``[Q, 2]`` of the ab grid cells (multiples of ``step``) that some sRGB colour
    falls into (an sRGB cube with ``levels`` values per channel is converted to Lab)."""
    v = torch.linspace(0, 1, levels, dtype=torch.float64)
    rgb = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(3, 1, -1)
    ab = rgb_to_lab(rgb)[1:].reshape(2, -1).T
    idx = torch.unique(torch.round(ab / step).long(), dim=0)
    return (idx * step).float()


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, k: int = 5, sigma: float = 5.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """ab ``[B, 2, h, w]`` -> (soft targets ``[B, Q, h, w]`` over the ``k`` nearest bins with
    Gaussian weights, nearest-bin index ``[B, h, w]``)."""
    B, _, h, w = ab.shape
    pts = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()
    d2 = torch.cdist(pts, bins.to(pts)) ** 2
    dk, ik = d2.topk(k, dim=1, largest=False)
    wk = torch.exp(-dk / (2 * sigma ** 2))
    wk = wk / wk.sum(1, keepdim=True)
    soft = torch.zeros(pts.shape[0], bins.shape[0], device=ab.device)
    soft.scatter_(1, ik, wk)
    return (soft.reshape(B, h, w, -1).permute(0, 3, 1, 2),
            ik[:, 0].reshape(B, h, w))


def rebalance_weights(counts: torch.Tensor, bins: torch.Tensor, lam: float = 0.5,
                      sigma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed prior ``p̃``, weights ``w`` with ``sum(p̃ * w) == 1``) from bin counts."""
    p = counts.double() / counts.sum().clamp_min(1)
    d2 = torch.cdist(bins.double(), bins.double()) ** 2
    k = torch.exp(-d2 / (2 * sigma ** 2))
    p = (k @ p) / k.sum(1)
    p = p / p.sum()
    w = 1.0 / ((1 - lam) * p + lam / len(p))
    w = w / (p * w).sum()
    return p.float(), w.float()


@dataclass
class ColorizationConfig(RecipeConfig):
    loss: str = "classification"      # classification (rebalanced) | regression
    rebalance_lambda: float = 0.5
    prior_samples: int = 2000
    head_width: int = 128


class Colorization(Recipe):
    name = "colorization"
    description = "predict Lab colour (ab as ~260 rebalanced classes) from lightness L"
    paper = "Zhang, Isola, Efros, Colorful Image Colorization, ECCV 2016"
    small_scale = ("32 px synthetic colour crops (synth-crops), ResNet-10 w32 + transposed-conv "
                   "head at 1/4 resolution, prior from 2000 views, SGD (paper: Adam) + cosine")
    Config = ColorizationConfig
    train_defaults = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                      "batch_size": 128, "epochs": 10, "data": "synth-crops"}
    needs_color = True
    default_eval_data = "fashion-mnist"

    def __init__(self, cfg: ColorizationConfig, channels: int):
        super().__init__(cfg, channels)
        if cfg.loss not in ("classification", "regression"):
            raise ConfigError(f"loss={cfg.loss!r}: must be 'classification' or 'regression'")
        if not 0 <= cfg.rebalance_lambda <= 1:
            raise ConfigError(f"rebalance_lambda={cfg.rebalance_lambda}: must be in [0, 1]")
        self.backbone = self.build_encoder(in_chans=1)
        bins = ab_bins()
        self.register_buffer("bins", bins)
        self.register_buffer("prior", torch.full((len(bins),), 1.0 / len(bins)))
        self.register_buffer("class_weights", torch.ones(len(bins)))
        out = len(bins) if cfg.loss == "classification" else 2
        d = self.backbone.num_features
        size = cfg.image_size
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            h = self.backbone.forward_features(torch.zeros(1, 1, size, size))["map"].shape[-1]
            self.backbone.train(was)
        self.out_size = max(1, size // 4)
        steps = max(0, (self.out_size // h).bit_length() - 1)
        layers: list[nn.Module] = [nn.Conv2d(d, cfg.head_width, 1), nn.ReLU(True)]
        for _ in range(steps):
            layers += [nn.ConvTranspose2d(cfg.head_width, cfg.head_width, 4, 2, 1),
                       nn.BatchNorm2d(cfg.head_width), nn.ReLU(True)]
        layers.append(nn.Conv2d(cfg.head_width, out, 1))
        self.head = nn.Sequential(*layers)
        self.aug = light_augment(size, (0.6, 1.0))

    @property
    def encoder(self):
        return self.backbone

    def input_spec(self) -> dict:
        return input_spec(self.cfg.image_size, 1, mode="lab_l")

    def views(self, image, label):
        if image.shape[0] != 3:
            raise ValueError("colorization needs 3-channel images")
        lab = rgb_to_lab(to_float(self.aug(resize(image, self.cfg.image_size))))
        return lab[:1] / 50.0 - 1.0, lab[1:]

    @torch.no_grad()
    def on_train_start(self, ctx):
        """Estimate the empirical ab distribution from the first training views."""
        ds = ctx.dataset
        n = min(len(ds), self.cfg.prior_samples)
        counts = torch.zeros(len(self.bins))
        for i in range(n):
            _, ab = ds[i]
            ab = F.adaptive_avg_pool2d(ab[None], self.out_size)
            _, near = soft_encode(ab, self.bins.cpu(), k=1)
            counts += torch.bincount(near.flatten(), minlength=len(self.bins)).float()
        p, w = rebalance_weights(counts, self.bins.cpu(), self.cfg.rebalance_lambda)
        self.prior.copy_(p)
        self.class_weights.copy_(w)

    def training_step(self, batch, ctx):
        L, ab = batch
        pred = self.head(self.backbone.forward_features(L)["map"])
        if pred.shape[-1] != self.out_size:
            pred = F.interpolate(pred, size=self.out_size, mode="bilinear", align_corners=False)
        ab_small = F.adaptive_avg_pool2d(ab.float(), self.out_size)
        if self.cfg.loss == "regression":
            loss = F.mse_loss(pred.float(), ab_small / 110.0)
            return {"loss": loss}
        target, near = soft_encode(ab_small, self.bins)
        logp = F.log_softmax(pred.float(), dim=1)
        ce = -(target * logp).sum(1)                       # [B, h, w]
        w = self.class_weights[near]
        loss = (w * ce).mean()
        acc = (pred.argmax(1) == near).float().mean()
        return {"loss": loss, "unweighted_ce": ce.mean(), "acc": acc}
