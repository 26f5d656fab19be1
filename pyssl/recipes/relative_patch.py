"""Relative patch location: given a centre patch and one of its 8 neighbours on a 3x3 grid,
predict which neighbour (8-way classification).

Paper: Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning by Context
Prediction", ICCV 2015. Against trivial shortcuts, as in the paper: a gap between patches (no
continuous edges or textures to match), a random jitter of each patch inside its cell, and —
for colour images — colour dropping (two of the three channels replaced by Gaussian noise, a
guard against chromatic aberration). Both patches go through one shared (siamese) encoder; the
pooled features are concatenated and classified by an MLP (the paper's fc layers).

Neighbour labels, row-major around the centre::

    0 1 2
    3 . 4
    5 6 7

Small-scale differences: the image is resized to a 3x3 grid of ``patch_size + gap`` cells
(default 10 px patches with a 6 px gap, jitter up to 1 px, so patches are always >= 4 px apart:
the paper used 96 px patches, 48 px gaps and 7 px jitter on 224 px-scale images), ResNet-10
instead of AlexNet; SGD + momentum as in the paper, with a cosine schedule (AdamW measured 1-2
points worse at this budget).
Evaluation: the encoder is trained on patches, so an image's feature is the mean of its encoder
features over the 3x3 grid of patches at the centres of the cells (the protocol Kolesnikov et
al., CVPR 2019, used for patch-based methods); evaluate on whole images at ``image_size`` with
``pyssl eval ... view=image``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.config import ConfigError
from ..data.transforms import input_spec
from ..engine.recipe import Recipe, RecipeConfig
from .common import mlp, normalize_pixels, resize

__all__ = ["NEIGHBOURS", "RelativePatch", "RelativePatchConfig", "patch_pair"]

NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def patch_pair(img: torch.Tensor, label: int, patch: int, gap: int, jitter: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the centre patch and neighbour ``label`` (0-7) from ``img`` (already resized to
    ``3 * (patch + gap)``); each patch is placed at its cell's centre then shifted by a random
    jitter in ``[-jitter, jitter]`` per axis. Returns ``(centre, neighbour, offsets)`` where
    ``offsets`` is ``[2, 2]`` (row, col) of the two patches' top-left corners."""
    cell = patch + gap
    base = gap // 2
    dr, dc = NEIGHBOURS[label]
    offs = []
    for (r, c) in ((1, 1), (1 + dr, 1 + dc)):
        j = torch.randint(-jitter, jitter + 1, (2,)) if jitter > 0 else torch.zeros(2, dtype=torch.long)
        offs.append([r * cell + base + int(j[0]), c * cell + base + int(j[1])])
    crops = [img[..., y:y + patch, x:x + patch] for y, x in offs]
    return crops[0], crops[1], torch.tensor(offs)


def drop_colour(x: torch.Tensor) -> torch.Tensor:
    """Keep one random channel of a 3-channel patch; replace the others by Gaussian noise with
    that patch's standard deviation (Doersch et al.'s colour dropping)."""
    keep = int(torch.randint(3, ()))
    std = x[keep].std().clamp_min(1e-3)
    out = torch.randn_like(x) * std
    out[keep] = x[keep]
    return out


@dataclass
class RelativePatchConfig(RecipeConfig):
    patch_size: int = 10
    gap: int = 6
    jitter: int = 1
    color_drop: bool = True
    head_hidden: int = 256


class RelativePatch(Recipe):
    name = "relative_patch"
    description = "predict the position (8-way) of a neighbour patch relative to a centre patch"
    paper = ("Doersch et al., Unsupervised Visual Representation Learning by Context "
             "Prediction, ICCV 2015")
    small_scale = ("10 px patches, 6 px gap, 1 px jitter on a 48 px canvas (paper: 96/48/7 px), "
                   "ResNet-10, SGD + momentum, cosine")
    Config = RelativePatchConfig
    train_defaults = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                      "weight_decay": 5e-4, "batch_size": 128, "epochs": 10}

    def __init__(self, cfg: RelativePatchConfig, channels: int):
        super().__init__(cfg, channels)
        if cfg.patch_size < 4:
            raise ConfigError(f"patch_size={cfg.patch_size}: must be >= 4")
        if cfg.gap < 0 or cfg.jitter < 0 or 2 * cfg.jitter >= cfg.gap:
            raise ConfigError(f"need gap > 2 * jitter >= 0 so patches never touch; got "
                              f"gap={cfg.gap}, jitter={cfg.jitter}")
        self.backbone = self.build_encoder()
        d = self.backbone.num_features
        self.head = mlp(2 * d, cfg.head_hidden, 8)
        self.canvas = 3 * (cfg.patch_size + cfg.gap)

    @property
    def encoder(self):
        return self.backbone

    def input_spec(self) -> dict:
        cfg = self.cfg
        return input_spec(cfg.image_size, self.channels,
                          patches={"grid": 3, "cell": cfg.patch_size + cfg.gap,
                                   "size": cfg.patch_size})

    def views(self, image, label):
        cfg = self.cfg
        img = resize(image, self.canvas)
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        y = int(torch.randint(8, ()))
        a, b, _ = patch_pair(normalize_pixels(img), y, cfg.patch_size, cfg.gap, cfg.jitter)
        if cfg.color_drop and a.shape[0] == 3:
            a, b = drop_colour(a), drop_colour(b)
        return a, b, torch.tensor(y)

    def training_step(self, batch, ctx):
        a, b, y = batch
        f = self.backbone(torch.cat([a, b]))
        fa, fb = f.chunk(2)
        logits = self.head(torch.cat([fa, fb], 1))
        loss = F.cross_entropy(logits.float(), y)
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}
