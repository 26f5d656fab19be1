"""A one-page figure of a synthetic pair: camera images, label maps, depth, optical flow
(colour wheel), a LiDAR bird's-eye view coloured by label, and class balance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .classes import CLASS_COLORS, CLASS_NAMES


def flow_to_color(flow: torch.Tensor, valid: torch.Tensor | None = None,
                  max_norm: float | None = None) -> np.ndarray:
    """[2, H, W] flow -> [H, W, 3] uint8: hue = direction (0 deg = +u, i.e. rightwards,
    turning towards +v), saturation = magnitude / max_norm (default: the 95th percentile of valid
    magnitudes, larger ones saturate); invalid pixels dimmed."""
    import matplotlib.colors as mcolors

    u, v = flow[0].numpy(), flow[1].numpy()
    mag = np.hypot(u, v)
    if max_norm is None:
        ref = mag[valid.numpy()] if valid is not None and valid.any() else mag
        max_norm = float(np.percentile(ref, 95)) if ref.size else 1.0
    max_norm = max(max_norm, 1e-6)
    hue = (np.arctan2(v, u) / (2 * math.pi)) % 1.0
    sat = np.clip(mag / max_norm, 0, 1)
    rgb = mcolors.hsv_to_rgb(np.stack([hue, sat, np.ones_like(hue)], -1))
    if valid is not None:
        rgb = np.where(valid.numpy()[..., None], rgb, rgb * 0.25)
    return (rgb * 255).astype(np.uint8)


def _wheel(size=64) -> np.ndarray:
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    img = flow_to_color(torch.from_numpy(np.stack([x, y])).float(), max_norm=1.0)
    return np.concatenate([img, ((x * x + y * y) <= 1)[..., None].astype(np.uint8) * 255], -1)


def label_to_color(labels: torch.Tensor) -> np.ndarray:
    pal = np.asarray(CLASS_COLORS, dtype=np.uint8)
    return pal[labels.clamp(0, len(CLASS_COLORS) - 1).numpy()]


def save_figure(item: dict, path, camera_names=None, title: str | None = None,
                dpi: int = 60, bev_range: float = 50.0) -> Path:
    """Writes the figure of a pair (``{"t0", "t1", "flow_fw", ...}``) or a single sample to
    ``path`` (PNG, palette-quantised to stay small). Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    sample = item["t0"] if "t0" in item else item
    flow = item.get("flow_fw")
    valid = item.get("flow_fw_valid")
    imgs, labels, depth = sample["images"], sample["labels"], sample["depth"]
    c, _, h, w = imgs.shape
    names = camera_names or [f"cam {i}" for i in range(c)]
    rows = 4 if flow is not None else 3
    cell_w = 2.6
    cell_h = cell_w * h / w
    side_w = max(rows * cell_h, 3.2)
    fig = plt.figure(figsize=(c * cell_w + side_w * 2.2, rows * cell_h + 0.55))
    gs = GridSpec(rows, c + 3, figure=fig,
                  width_ratios=[cell_w] * c + [side_w, side_w * 0.2, side_w * 0.75],
                  wspace=0.03, hspace=0.06, left=0.012, right=0.995, top=0.92, bottom=0.06)
    inv = torch.where(depth > 0, 1.0 / depth.clamp_min(1e-3), torch.zeros_like(depth))
    vmax = float(inv.max()) if inv.numel() else 1.0
    max_norm = None
    if flow is not None:
        mags = flow.norm(dim=1)[valid] if valid is not None else flow.norm(dim=1).flatten()
        max_norm = float(torch.quantile(mags[:: max(1, mags.numel() // 200000)], 0.95)) if mags.numel() else 1.0
    row_names = ["RGB", "labels", "1 / depth"] + (["flow t->t+1"] if flow is not None else [])
    for ci in range(c):
        panels = [imgs[ci].permute(1, 2, 0).numpy(), label_to_color(labels[ci]),
                  plt.get_cmap("magma")(inv[ci].numpy() / max(vmax, 1e-6))[..., :3]]
        if flow is not None:
            panels.append(flow_to_color(flow[ci], valid[ci] if valid is not None else None,
                                        max_norm))
        for ri, img in enumerate(panels):
            ax = fig.add_subplot(gs[ri, ci])
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if ri == 0:
                ax.set_title(names[ci], fontsize=8)
            if ci == 0:
                ax.set_ylabel(row_names[ri], fontsize=8)
            if ri == 3 and ci == 0:
                ins = ax.inset_axes([0.0, 0.55, 0.45 * h / w * 2, 0.45])
                ins.imshow(_wheel())
                ins.axis("off")
    # LiDAR bird's-eye view
    ax = fig.add_subplot(gs[:, c])
    pts = sample["points"].numpy()
    pl = sample["point_labels"].numpy()
    pal = np.asarray(CLASS_COLORS, dtype=np.float32) / 255.0
    ax.set_facecolor("white")
    ax.scatter(-pts[:, 1], pts[:, 0], s=0.6, c=pal[pl], linewidths=0)
    ax.plot([0], [0], marker="^", color="black", markersize=5)
    ax.set_xlim(-bev_range, bev_range)
    ax.set_ylim(-bev_range, bev_range)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"LiDAR BEV ({len(pts)} pts, x up, +-{bev_range:.0f} m)", fontsize=8)
    # class balance (pixels and LiDAR points)
    ax = fig.add_subplot(gs[:, c + 2])
    n = len(CLASS_NAMES)
    pix = torch.bincount(labels.flatten(), minlength=n).double()
    pix = (pix / pix.sum()).numpy()
    pnt = torch.bincount(sample["point_labels"], minlength=n).double()
    pnt = (pnt / pnt.sum().clamp_min(1)).numpy()
    yy = np.arange(n)
    ax.barh(yy - 0.2, pix * 100, height=0.4, color=pal[:n], edgecolor="black", linewidth=0.3,
            label="pixels")
    ax.barh(yy + 0.2, pnt * 100, height=0.4, color=pal[:n], edgecolor="black", linewidth=0.3,
            hatch="////", label="LiDAR points")
    ax.set_yticks(yy)
    ax.set_yticklabels([f"{i} {nm}" for i, nm in enumerate(CLASS_NAMES)], fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("% pixels (plain), points (hatched)", fontsize=7)
    ax.set_title("class balance", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    try:  # palette quantisation: a 3-5x smaller PNG that looks the same
        from PIL import Image
        with Image.open(path) as im:
            q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        q.save(path, optimize=True)
    except Exception:  # pragma: no cover - Pillow missing or too old: keep the RGB PNG
        pass
    return path
