"""Vision Transformer assembled from timm's ``PatchEmbed`` and ``Block``.

The pieces are exposed separately so that later recipes can run them in their own order:

* ``embed(x)``: patch tokens with position embedding added, ``[B, L, D]`` (no CLS) — MAE masks
  these and runs the encoder on the visible subset (``forward_blocks(cat(cls, visible))``);
* ``prepare_tokens(x, mask)``: CLS + patch tokens, masked patches replaced by ``mask_token``
  before the position embedding is added (BEiT, iBOT);
* ``forward_blocks(tokens)``: the block stack and final norm;
* ``forward_features(x, mask=None)``: ``{"cls", "pooled", "patch"}``;
* ``last_self_attention(x)``: the last block's attention ``[B, heads, 1+L, 1+L]`` (DINO maps:
  ``[:, :, 0, 1:]`` is the CLS attention over patches).

Position embeddings are learned at ``image_size`` and interpolated (bicubic) for other input
sizes (multi-crop local views).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["VisionTransformer"]


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 pool: str = "cls"):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.patch_size = patch_size
        self.image_size = image_size
        self.embed_dim = self.num_features = embed_dim
        self.pool = pool
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, embed_dim,
                                      strict_img_size=False)
        self.grid = image_size // patch_size
        self.num_patches = self.grid ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        rates = [x.item() for x in torch.linspace(0, drop_path, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rates[i],
                  norm_layer=nn.LayerNorm) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- pieces
    def patch_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding of the patch tokens for an ``h x w`` patch grid ``[1, h*w, D]``."""
        pos = self.pos_embed[:, 1:]
        if h == self.grid and w == self.grid:
            return pos
        pos = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=(h, w), mode="bicubic", align_corners=False)
        return pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def _patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the patch "
                             f"size {self.patch_size}")
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.patch_embed(x), h, w

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens ``[B, L, D]`` with position embedding (no CLS). ``mask`` (bool
        ``[B, L]``, True = masked) replaces masked patch embeddings by ``mask_token`` first."""
        t, h, w = self._patchify(x)
        if mask is not None:
            if mask.shape != t.shape[:2]:
                raise ValueError(f"mask must have shape {tuple(t.shape[:2])}, got "
                                 f"{tuple(mask.shape)}")
            m = mask.unsqueeze(-1).to(t.dtype)
            t = t * (1 - m) + self.mask_token.to(t.dtype) * m
        return t + self.patch_pos_embed(h, w)

    def cls_embed(self, batch: int) -> torch.Tensor:
        """CLS token with its position embedding, ``[B, 1, D]``."""
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t = self.embed(x, mask)
        return torch.cat([self.cls_embed(t.shape[0]), t], dim=1)

    def forward_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    # ---------------------------------------------------------------- outputs
    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None
                         ) -> dict[str, torch.Tensor]:
        t = self.forward_blocks(self.prepare_tokens(x, mask))
        cls, patch = t[:, 0], t[:, 1:]
        pooled = cls if self.pool == "cls" else patch.mean(1)
        h = x.shape[-2] // self.patch_size
        fmap = patch.transpose(1, 2).reshape(t.shape[0], -1, h, patch.shape[1] // h)
        return {"cls": cls, "pooled": pooled, "patch": patch, "map": fmap}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["pooled"]

    @torch.no_grad()
    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block, ``[B, heads, 1+L, 1+L]`` (query x key)."""
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        blk = self.blocks[-1]
        attn = blk.attn
        y = blk.norm1(t)
        B, N, _ = y.shape
        qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token"}


def vit_config(name: str) -> dict:
    sizes = {"micro": (64, 2, 2), "tiny": (192, 12, 3), "small": (384, 12, 6),
             "base": (768, 12, 12), "large": (1024, 24, 16)}
    if name not in sizes:
        raise ValueError(f"unknown ViT size {name!r}; valid: {sorted(sizes)}")
    d, depth, heads = sizes[name]
    return {"embed_dim": d, "depth": depth, "num_heads": heads}


