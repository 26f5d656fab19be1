"""MAE: masked autoencoder — encode a random 25% of the patches, reconstruct the rest.

Paper: He, Chen, Xie, Li, Dollár, Girshick, "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022. As in the paper: the patch tokens (with position embeddings) are randomly masked per
image with :func:`pyssl.ops.random_masking` (``mask_ratio`` = 0.75 by default) and the ViT
encoder runs on the visible tokens only (+ CLS); a light decoder (:class:`pyssl.models.mae.
MAEDecoder`) embeds them, restores the image order with a learned mask token at the masked
positions through :func:`pyssl.ops.unshuffle_tokens`, adds fixed sine-cosine position
embeddings and predicts each patch's pixels; the targets are the patch pixels normalised per
patch (``norm_pix_loss``: mean 0, unit variance per patch) and the mean-squared error is
averaged over the *masked* patches only; views are a random resized crop + flip only.

Figure (``figures=true``): ``figures/reconstruction.png`` — for a few training images, the masked
input, the reconstruction (visible patches pasted back, the per-patch normalisation undone with
each patch's true mean and variance for display), and the original.

Small-scale differences: a 4-block, 128-d ViT with 4 px patches at 28 px (paper ViT-B/16+ at
224 px), decoder 2 blocks x 128-d (paper 8 x 512), batch 128, AdamW lr 1.5e-3 + cosine, a few
epochs (paper 800-1600); evaluation reads the mean of the patch tokens (``vit_pool=mean``; the
paper's linear probe uses the CLS token with an extra BatchNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.multicrop import TensorAugment
from ..data.transforms import match_channels
from ..models.mae import MAEDecoder, normalized_patch_targets, patchify, unpatchify
from ..ops import random_masking
from .common import normalize_pixels
from .modern import ModernRecipe, ViTConfig, check_range

__all__ = ["MAE", "MAEConfig", "masked_mse"]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error: ``pred``/``target``
    ``[B, L, P]``, ``mask`` bool ``[B, L]`` (True = masked, the patches that count)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1)


@dataclass
class MAEConfig(ViTConfig):
    vit_pool: str = "mean"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    crop_scale_min: float = 0.2
    compile: bool = False            # torch.compile forward + loss (fullgraph)


class MAE(ModernRecipe):
    name = "mae"
    description = ("MAE: ViT encoder on 25% visible patches (random_masking), light decoder "
                   "(unshuffle_tokens), normalised-pixel loss on masked patches")
    paper = "He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022"
    small_scale = ("ViT 4x128 (4 px patches) at 28 px, decoder 2x128, batch 128, a few epochs "
                   "instead of 800-1600, mean-pooled patch features for evaluation")
    Config = MAEConfig
    train_defaults = {"lr": 1.5e-3, "weight_decay": 0.05, "batch_size": 128, "epochs": 10,
                      "warmup_epochs": 1.0}
    needs_vit = True

    def __init__(self, cfg: MAEConfig, channels: int):
        super().__init__(cfg, channels)
        self.check_config()
        check_range(cfg, "mask_ratio", 0, 1, hi_open=True)
        check_range(cfg, "crop_scale_min", 0, 1, lo_open=True)
        for k in ("decoder_dim", "decoder_depth", "decoder_heads"):
            check_range(cfg, k, 1)
        self.backbone = self.build_encoder()
        p = self.backbone.patch_size
        g = self.backbone.grid
        self.decoder = MAEDecoder(self.backbone.num_features, (g, g), p * p * channels,
                                  cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
        self.aug = TensorAugment(cfg.image_size, channels, (cfg.crop_scale_min, 1.0),
                                 jitter=0.0, gray_p=0.0)
        self._compute = (torch.compile(self.forward_loss, fullgraph=True) if cfg.compile
                         else self.forward_loss)

    @property
    def encoder(self):
        return self.backbone

    def views(self, image, label):
        return normalize_pixels(self.aug(match_channels(image, self.channels)))

    def forward_loss(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """``(loss, pred [B, L, p*p*C], mask [B, L])`` for images ``x``; ``noise`` ``[B, L]``
        fixes the masking (default: ``torch.rand``)."""
        enc = self.backbone
        tokens = enc.embed(x)                                            # [B, L, D] + pos
        if noise is None:
            noise = torch.rand(tokens.shape[:2], device=x.device)
        r = random_masking(tokens, self.cfg.mask_ratio, noise=noise)
        latent = enc.forward_blocks(torch.cat([enc.cls_embed(x.shape[0]), r.visible], 1))
        pred = self.decoder(latent, r.ids_restore)                       # [B, L, P]
        target = patchify(x, enc.patch_size)
        if self.cfg.norm_pix_loss:
            target = normalized_patch_targets(target)
        return masked_mse(pred, target, r.mask), pred, r.mask

    def training_step(self, batch, ctx):
        loss, _, _ = self._compute(batch)
        return {"loss": loss}

    # ------------------------------------------------------------------ figures
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """(masked input, reconstruction with the visible patches pasted in, original), all
        ``[B, C, H, W]`` in the input's normalisation."""
        was = self.training
        self.eval()
        try:
            _, pred, mask = self.forward_loss(x, noise)
        finally:
            self.train(was)
        p, C = self.backbone.patch_size, self.channels
        patches = patchify(x, p)
        if self.cfg.norm_pix_loss:     # undo the per-patch normalisation (display only)
            mean = patches.mean(-1, keepdim=True)
            std = (patches.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
            pred = pred * std + mean
        m = mask[..., None].to(x.dtype)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        masked = unpatchify(patches * (1 - m) + m * -1.0, p, C, grid)     # hidden = black
        recon = unpatchify(patches * (1 - m) + pred.to(x.dtype) * m, p, C, grid)
        return masked, recon, x

    def write_figures(self, ctx, epoch):
        from ..data.transforms import preprocess
        from ..eval.figures import image_grid_figure

        base = ctx.dataset.base if hasattr(ctx.dataset, "base") else ctx.dataset
        n = min(6, len(base))
        x = torch.stack([preprocess(base[i][0], self.input_spec()) for i in range(n)])
        dev = next(self.parameters()).device
        g = torch.Generator().manual_seed(0)
        noise = torch.rand(n, self.backbone.num_patches, generator=g).to(dev)
        masked, recon, orig = (t.cpu() * 0.5 + 0.5 for t in self.reconstruct(x.to(dev), noise))
        rows = [[masked[i], recon[i], orig[i]] for i in range(n)]
        image_grid_figure(rows, [f"masked {100 * self.cfg.mask_ratio:.0f}%", "reconstruction",
                                 "original"], ctx.trainer.out / "figures" / "reconstruction.png",
                          title=f"mae, epoch {epoch}")
