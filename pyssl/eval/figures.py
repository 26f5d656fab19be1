"""Figures the modern recipes write into their run folder: DINO's CLS self-attention maps, MAE's
masked / reconstruction / original triplets, BEiT tokenizer reconstructions and codebook usage.
All are written atomically (temporary file + rename) with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.transforms import preprocess
from ..engine.logger import save_figure

__all__ = ["attention_figure", "codebook_figure", "image_grid_figure", "save_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show_image(ax, x: torch.Tensor) -> None:
    """``x`` float ``[C, H, W]`` in [0, 1]."""
    x = x.clamp(0, 1)
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(x.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def attention_maps(vit, images: list[torch.Tensor], spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs ``[B, C, H, W]`` in [0, 1], CLS attention over patches ``[B, heads, h, w]``)
    from the last block of ``vit`` (a :class:`pyssl.models.VisionTransformer`)."""
    was = vit.training
    vit.eval()
    try:
        x = torch.stack([preprocess(im, spec) for im in images])
        dev = next(vit.parameters()).device
        attn = vit.last_self_attention(x.to(dev)).float().cpu()  # [B, heads, 1+L, 1+L]
    finally:
        vit.train(was)
    h = x.shape[-2] // vit.patch_size
    w = x.shape[-1] // vit.patch_size
    cls = attn[:, :, 0, 1:].reshape(x.shape[0], -1, h, w)
    shown = x * torch.tensor(spec.get("std", [0.5])).view(-1, 1, 1) + \
        torch.tensor(spec.get("mean", [0.5])).view(-1, 1, 1)
    return shown, cls


def attention_figure(vit, images: list[torch.Tensor], spec: dict, out_png,
                     title: str = "CLS self-attention (last block)") -> Path:
    """One row per image: the image, the head-averaged CLS attention over it, and each head's
    map (upsampled to the image with bilinear interpolation)."""
    shown, cls = attention_maps(vit, images, spec)
    B, heads = cls.shape[:2]
    plt = _plt()
    cols = 2 + heads
    fig, axes = plt.subplots(B, cols, figsize=(1.35 * cols, 1.4 * B + 0.4), squeeze=False)
    size = shown.shape[-2:]
    for i in range(B):
        _show_image(axes[i, 0], shown[i])
        maps = [cls[i].mean(0)] + [cls[i, k] for k in range(heads)]
        for j, m in enumerate(maps):
            up = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            ax = axes[i, 1 + j]
            ax.imshow(shown[i].mean(0).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.imshow(up.numpy(), cmap="inferno", alpha=0.65)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("mean" if j == 0 else f"head {j}", fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_png)


def image_grid_figure(rows: list[list[torch.Tensor]], col_titles: list[str], out_png,
                      title: str = "") -> Path:
    """A grid of ``[C, H, W]`` images in [0, 1]: ``rows[i][j]`` at row i, column j."""
    plt = _plt()
    n, m = len(rows), len(col_titles)
    fig, axes = plt.subplots(n, m, figsize=(1.4 * m, 1.4 * n + 0.4), squeeze=False)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            _show_image(axes[i, j], img.float())
            if i == 0:
                axes[i, j].set_title(col_titles[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_png)


def codebook_figure(counts: torch.Tensor, out_png, title: str = "") -> Path:
    """Code frequencies sorted from most to least used (log scale), with the share of the
    codebook used."""
    plt = _plt()
    c = counts.double().sort(descending=True).values
    p = c / c.sum().clamp_min(1)
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    ax.semilogy(range(1, len(p) + 1), p.clamp_min(1e-8).numpy(), lw=1.4)
    used = int((c > 0).sum())
    ent = -(p[p > 0] * p[p > 0].log()).sum().exp()
    ax.set_xlabel("code rank")
    ax.set_ylabel("frequency")
    ax.set_title(title or f"codebook usage: {used}/{len(c)} codes used, perplexity {ent:.0f}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)
