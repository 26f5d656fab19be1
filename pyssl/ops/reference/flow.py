"""Reference implementations of the flow-correspondence ops: grid_sample and elementwise
PyTorch, as public unsupervised-flow code writes them (UnFlow's forward-backward check)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_grid(B, H, W, device, dtype):
    ys, xs = torch.meshgrid(torch.arange(H, device=device, dtype=dtype),
                            torch.arange(W, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys], -1).expand(B, H, W, 2)


def normalise(coords, H, W):
    """Pixel coordinates -> grid_sample's [-1, 1] with align_corners=True."""
    scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)], device=coords.device, dtype=coords.dtype)
    return coords * scale - 1


def sample_features(features, coords):
    """grid_sample(bilinear, zeros, align_corners=True) at pixel coordinates [B, Ho, Wo, 2]."""
    H, W = features.shape[-2:]
    return F.grid_sample(features, normalise(coords.to(features.dtype), H, W), mode="bilinear",
                         padding_mode="zeros", align_corners=True)


def flow_correspondence(flow_fw, flow_bw=None, alpha1=0.01, alpha2=0.5):
    B, _, H, W = flow_fw.shape
    acc = torch.float64 if flow_fw.dtype == torch.float64 else torch.float32
    fw = flow_fw.to(acc)
    coords = pixel_grid(B, H, W, fw.device, acc) + fw.permute(0, 2, 3, 1)
    x, y = coords[..., 0], coords[..., 1]
    valid = torch.isfinite(fw).all(1) & (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    if flow_bw is not None:
        bw_warped = sample_features(flow_bw.to(acc), torch.nan_to_num(coords))  # [B, 2, H, W]
        fsum = fw + bw_warped
        lhs = (fsum ** 2).sum(1)
        rhs = alpha1 * ((fw ** 2).sum(1) + (bw_warped ** 2).sum(1)) + alpha2
        valid = valid & (lhs <= rhs)
    return coords, valid


def affine_correspondence(theta, size_in, size_out):
    (hin, win), (hout, wout) = size_in, size_out
    acc = torch.float64 if theta.dtype == torch.float64 else torch.float32
    grid = F.affine_grid(theta.to(acc), (theta.shape[0], 1, hout, wout), align_corners=True)
    scale = torch.tensor([(win - 1) / 2, (hin - 1) / 2], dtype=acc, device=theta.device)
    return (grid + 1) * scale


def dense_correspondence_loss(online, target, coords, valid, loss="cosine"):
    warped = sample_features(target, coords)
    a = F.normalize(online, dim=1)
    b = F.normalize(warped.to(a.dtype), dim=1)
    per = 1 - (a * b).sum(1) if loss == "cosine" else (a - b).pow(2).sum(1)
    w = valid.to(per.dtype)
    total = w.sum()
    return torch.where(total > 0, (per * w).sum() / total.clamp(min=1e-30), per.sum() * 0)
