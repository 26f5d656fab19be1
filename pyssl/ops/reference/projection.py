"""Reference implementations of the point-to-pixel projection ops (plain PyTorch)."""

from __future__ import annotations

import torch


def _image_hw(image_size, n_cams: int, like: torch.Tensor):
    """(H, W) or [C, 2] -> two [C] float tensors."""
    size = torch.as_tensor(image_size, dtype=like.dtype, device=like.device)
    if size.dim() == 1:
        size = size.expand(n_cams, 2)
    return size[:, 0], size[:, 1]


def project_points(points: torch.Tensor, lidar_to_cam: torch.Tensor, intrinsics: torch.Tensor,
                   image_size, min_depth: float = 1.0, margin: float = 0.0,
                   rounding: str = "none"):
    """Projects LiDAR points into C calibrated pinhole cameras.

    ``p_cam = R p + t`` (``lidar_to_cam`` [C, 4, 4]), ``depth = p_cam.z``,
    ``(u, v) = (K p_cam)[:2] / depth`` (``intrinsics`` [C, 3, 3]) — nuscenes-devkit's
    ``view_points(..., normalize=True)``; u = column, v = row, pixel centres at integers.
    ``rounding``: "none" | "floor" (ScaLR) | "round" (SLidR, half to even).
    ``valid = depth > min_depth and margin <= u <= W-1-margin and margin <= v <= H-1-margin``
    after rounding, and all finite. Returns ``(pixels [C, P, 2], depth [C, P], valid [C, P])``.
    """
    xyz = points[:, :3]
    rot = lidar_to_cam[:, :3, :3]
    trans = lidar_to_cam[:, :3, 3]
    p_cam = torch.einsum("cij,pj->cpi", rot, xyz) + trans[:, None, :]
    depth = p_cam[..., 2]
    proj = torch.einsum("cij,cpj->cpi", intrinsics, p_cam)
    pixels = proj[..., :2] / depth[..., None]
    if rounding == "floor":
        pixels = torch.floor(pixels)
    elif rounding == "round":
        pixels = torch.round(pixels)
    elif rounding != "none":
        raise ValueError(f"rounding must be 'none', 'floor' or 'round', got {rounding!r}")
    h, w = _image_hw(image_size, lidar_to_cam.shape[0], pixels)
    u, v = pixels[..., 0], pixels[..., 1]
    valid = (
        (depth > min_depth)
        & (u >= margin) & (u <= (w - 1 - margin)[:, None])
        & (v >= margin) & (v <= (h - 1 - margin)[:, None])
        & torch.isfinite(pixels).all(-1) & torch.isfinite(depth)
    )
    return pixels, depth, valid


def point_pixel_pairs(points, lidar_to_cam, intrinsics, image_size, min_depth=1.0, margin=0.0,
                      rounding="round"):
    """All valid (point, camera, row, col) pairs, ordered by point then camera."""
    pixels, _, valid = project_points(points, lidar_to_cam, intrinsics, image_size, min_depth,
                                      margin, rounding)
    cam, pt = torch.nonzero(valid, as_tuple=True)
    order = torch.argsort(pt * valid.shape[0] + cam)
    cam, pt = cam[order], pt[order]
    uv = pixels[cam, pt]
    return pt, cam, uv[:, 1].long(), uv[:, 0].long()


def segment_mean(values, segment_ids, num_segments):
    """Per-segment row means by a sparse one-hot matrix product (SLidR's superpixel pooling)."""
    keep = segment_ids >= 0
    rows = torch.nonzero(keep, as_tuple=True)[0]
    one_hot = torch.sparse_coo_tensor(torch.stack([segment_ids[keep], rows]),
                                      torch.ones(rows.numel(), dtype=values.dtype, device=values.device),
                                      (num_segments, values.shape[0]), check_invariants=True)
    counts = torch.bincount(segment_ids[keep], minlength=num_segments)
    sums = torch.sparse.mm(one_hot, values)
    return sums / counts.clamp(min=1).to(values.dtype)[:, None], counts


def pixel_to_point_distillation_loss(point_features, features, image_index, xy, mode, loss):
    """Gather the pixel features, then the loss on F.normalize'd vectors (mean over pairs)."""
    from .sampling import sample_points

    pix = sample_points(features, image_index, xy, mode)
    a = torch.nn.functional.normalize(pix, dim=1)
    b = torch.nn.functional.normalize(point_features.to(pix.dtype), dim=1)
    per = 1 - (a * b).sum(1) if loss == "cosine" else (a - b).pow(2).sum(1)
    return per.mean()
