"""Jigsaw puzzle: cut a 3x3 grid of tiles, shuffle them with one of a fixed set of permutations
and classify which permutation was applied.

Paper: Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles", ECCV 2016. As in the paper: a gap between tiles (each tile is a random crop inside
its cell), per-tile normalisation (each tile standardised on its own, against low-level
shortcuts), a shared (siamese) encoder per tile whose features are concatenated in the shuffled
order, and a permutation set chosen greedily for maximal minimum Hamming distance
(:func:`maximal_hamming_permutations`, deterministic: it starts from the identity and breaks
ties by lexicographic order).

Conventions: tile ``t`` is cell ``t`` in row-major order; the sample shows
``shuffled[i] = tiles[perm[i]]``, so ``tiles = shuffled[argsort(perm)]``.

Evaluation: the encoder is trained on tiles, so an image's feature is the mean of its encoder
features over a 3x3 grid of tiles cut as in training (centred in their cells, each standardised
on its own): the protocol Kolesnikov et al. (CVPR 2019) used for patch-based methods; evaluate
on whole images with ``pyssl eval ... view=image``.

Small-scale differences: 100 permutations instead of 1000, 12 px tiles in 16 px cells of a 48 px
canvas (paper: 64 px tiles in 85 px cells of 255 px), ResNet-10 instead of AlexNet; SGD +
momentum as in the paper, with a cosine schedule (AdamW, the earlier default, measured about 3
points worse on Fashion-MNIST at this budget: its per-weight normalised steps overwrite the
initial weights within a hundred steps).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import input_spec, standardize_patches
from ..engine.config import ConfigError
from ..engine.recipe import Recipe, RecipeConfig
from .common import mlp, normalize_pixels, resize

__all__ = ["Jigsaw", "JigsawConfig", "cut_tiles", "maximal_hamming_permutations"]


def _all_permutations(n: int) -> np.ndarray:
    """All permutations of ``range(n)`` in lexicographic order, int8 ``[n!, n]``."""
    perms = np.zeros((1, 0), dtype=np.int8)
    for m in range(1, n + 1):        # permutations of range(m) from those of range(m - 1)
        blocks = []
        for first in range(m):
            rest = np.array([x for x in range(m) if x != first], dtype=np.int8)
            sub = rest[perms] if perms.shape[1] else np.zeros((1, 0), dtype=np.int8)
            blocks.append(np.concatenate([np.full((len(sub), 1), first, np.int8), sub], 1))
        perms = np.concatenate(blocks)
    return perms


@functools.lru_cache(maxsize=8)
def maximal_hamming_permutations(n: int, tiles: int = 9) -> np.ndarray:
    """``n`` permutations of ``range(tiles)`` chosen greedily: start with the identity, then
    repeatedly add the permutation whose minimum Hamming distance to those chosen is largest
    (ties: the lexicographically first). Returns int64 ``[n, tiles]``."""
    total = int(np.prod(range(1, tiles + 1)))
    if not 1 <= n <= total:
        raise ValueError(f"n must be in [1, {total}], got {n}")
    allp = _all_permutations(tiles)
    chosen = [0]
    mind = (allp != allp[0]).sum(1).astype(np.int16)
    for _ in range(n - 1):
        j = int(np.argmax(mind))           # first index of the maximum
        chosen.append(j)
        np.minimum(mind, (allp != allp[j]).sum(1), out=mind)
    return allp[chosen].astype(np.int64)


def cut_tiles(img: torch.Tensor, tile: int, gap: int, random_offset: bool = True) -> torch.Tensor:
    """``img`` ``[C, 3*(tile+gap), 3*(tile+gap)]`` -> tiles ``[9, C, tile, tile]`` (row-major),
    each a crop at a random offset in ``[gap // 4, gap - gap // 4]`` inside its cell (or
    centred), so that neighbouring tiles never touch."""
    cell = tile + gap
    out = []
    for r in range(3):
        for c in range(3):
            if random_offset and gap > 0:
                # offsets in [gap/4, 3gap/4]: neighbouring tiles stay >= 2 * (gap // 4) px
                # apart, so no edge continues from one tile into the next (a shortcut)
                lo = gap // 4
                oy, ox = (int(v) for v in torch.randint(lo, gap - lo + 1, (2,)))
            else:
                oy = ox = gap // 2
            out.append(img[..., r * cell + oy:r * cell + oy + tile,
                           c * cell + ox:c * cell + ox + tile])
    return torch.stack(out)


@dataclass
class JigsawConfig(RecipeConfig):
    num_permutations: int = 100
    tile_size: int = 12
    gap: int = 4
    tile_dim: int = 128
    head_hidden: int = 512
    flip: bool = True                # random horizontal flip of the image before cutting


class Jigsaw(Recipe):
    name = "jigsaw"
    description = "reorder 3x3 shuffled tiles: classify which of a fixed permutation set was used"
    paper = ("Noroozi & Favaro, Unsupervised Learning of Visual Representations by Solving "
             "Jigsaw Puzzles, ECCV 2016")
    small_scale = ("100 permutations (paper 1000), 12 px tiles in 16 px cells (paper 64/85), "
                   "ResNet-10, SGD + momentum with a cosine schedule")
    Config = JigsawConfig
    train_defaults = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                      "weight_decay": 5e-4, "batch_size": 64, "epochs": 10}

    def __init__(self, cfg: JigsawConfig, channels: int):
        super().__init__(cfg, channels)
        if cfg.tile_size < 4 or cfg.gap < 0:
            raise ConfigError(f"tile_size must be >= 4 and gap >= 0; got {cfg.tile_size}, "
                              f"{cfg.gap}")
        try:
            perms = maximal_hamming_permutations(cfg.num_permutations)
        except ValueError as e:
            raise ConfigError(f"num_permutations={cfg.num_permutations}: {e}") from None
        self.register_buffer("permutations", torch.from_numpy(perms), persistent=True)
        self.backbone = self.build_encoder()
        self.tile_proj = nn.Sequential(nn.Linear(self.backbone.num_features, cfg.tile_dim),
                                       nn.GELU())
        self.head = mlp(9 * cfg.tile_dim, cfg.head_hidden, cfg.num_permutations)
        self.canvas = 3 * (cfg.tile_size + cfg.gap)

    @property
    def encoder(self):
        return self.backbone

    def input_spec(self) -> dict:
        cfg = self.cfg
        return input_spec(cfg.image_size, self.channels,
                          patches={"grid": 3, "cell": cfg.tile_size + cfg.gap,
                                   "size": cfg.tile_size, "standardize": True})

    def views(self, image, label):
        img = resize(image, self.canvas)
        if self.cfg.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        # per-tile normalisation (each tile on its own), as evaluation's patch grid does
        tiles = standardize_patches(cut_tiles(normalize_pixels(img), self.cfg.tile_size,
                                              self.cfg.gap))
        k = int(torch.randint(self.cfg.num_permutations, ()))
        return tiles[self.permutations[k]], torch.tensor(k)

    def training_step(self, batch, ctx):
        tiles, y = batch                                 # [B, 9, C, t, t], [B]
        B = tiles.shape[0]
        f = self.tile_proj(self.backbone(tiles.flatten(0, 1)))
        logits = self.head(f.reshape(B, -1))
        loss = F.cross_entropy(logits.float(), y)
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}
