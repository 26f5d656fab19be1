"""Masked-image-modelling pieces: patchify / unpatchify, MAE's per-patch normalised pixel
targets, fixed 2-D sine-cosine position embeddings, and MAE's light decoder, which receives the
encoder's visible tokens back in image order through :func:`pyssl.ops.unshuffle_tokens`."""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..ops import unshuffle_tokens

__all__ = ["MAEDecoder", "normalized_patch_targets", "patchify", "sincos_pos_embed",
           "unpatchify"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, L, p*p*C]``: patches in row-major order (the ViT token
    order), each flattened as ``(row, column, channel)``."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int,
               grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, L, p*p*C]`` -> ``[B, C, h*p, w*p]`` (square grid
    unless ``grid=(h, w)``)."""
    B, L, _ = patches.shape
    p, C = patch_size, channels
    h, w = grid if grid is not None else (math.isqrt(L), math.isqrt(L))
    if h * w != L:
        raise ValueError(f"{L} patches do not form a {h}x{w} grid")
    x = patches.reshape(B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)


def normalized_patch_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` targets: each patch's pixels minus the patch mean, divided by
    ``sqrt(var + eps)`` with the unbiased variance over the patch's ``p*p*C`` values."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[(1 +) h*w, dim]``: half of the channels
    encode the row, half the column, each with sines and cosines at frequencies
    ``10000^(-k / (dim/4))``; the CLS token (first row) gets zeros."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    q = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(q, dtype=torch.float64) / q))
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None].expand(grid_h, grid_w).reshape(-1)
    cols = torch.arange(grid_w, dtype=torch.float64)[None, :].expand(grid_h, grid_w).reshape(-1)
    parts = []
    for coord in (rows, cols):
        ang = coord[:, None] * freqs[None, :]
        parts += [ang.sin(), ang.cos()]
    emb = torch.cat(parts, dim=1).float()
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb])
    return emb


class MAEDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022): embed the encoder's tokens to ``dim``, put the
    visible ones back in image order and fill the masked positions with a learned mask token
    (:func:`pyssl.ops.unshuffle_tokens`), add fixed sine-cosine position embeddings, run
    ``depth`` transformer blocks and predict ``pixels_per_patch`` values for every patch."""

    def __init__(self, encoder_dim: int, grid: tuple[int, int], pixels_per_patch: int,
                 dim: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, *grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True,
                                           norm_layer=nn.LayerNorm) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, pixels_per_patch)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent`` ``[B, 1 + K, encoder_dim]`` (CLS first, then the K visible tokens in
        :func:`pyssl.ops.random_masking` order), ``ids_restore`` ``[B, L]`` -> predictions
        ``[B, L, pixels_per_patch]`` in image (row-major patch) order."""
        x = self.embed(latent)
        patches = unshuffle_tokens(x[:, 1:], ids_restore, self.mask_token.to(x.dtype),
                                   validate=False)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}
