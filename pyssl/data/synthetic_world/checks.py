"""Self-consistency checks of a multi-camera + LiDAR sample and of ground-truth flow.

They only use the public sample format, so they apply as well to any loader that returns it
(e.g. a nuScenes-format loader): LiDAR points projected with the sample's calibration must
land on pixels of matching depth and label; warping frame t+1 with the forward flow must
reproduce frame t where the flow says the pixel is visible; forward and backward flow must
invert each other there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def default_projector():
    """pyssl.ops.project_points when the fused op exists, else the plain reference."""
    try:
        from pyssl import ops
        fn = getattr(ops, "project_points", None)
        if fn is not None:
            return fn
    except Exception:  # pragma: no cover - extension mid-rebuild
        pass
    from pyssl.ops.reference.projection import project_points
    return project_points


def _bilinear(img: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """img [H, W]; u, v [N] inside the image -> values [N] and the 4 corner values [N, 4]."""
    h, w = img.shape
    u0 = u.floor().clamp(0, max(w - 2, 0))
    v0 = v.floor().clamp(0, max(h - 2, 0))
    fu, fv = (u - u0).clamp(0, 1), (v - v0).clamp(0, 1)
    u0, v0 = u0.long(), v0.long()
    u1, v1 = (u0 + 1).clamp(max=w - 1), (v0 + 1).clamp(max=h - 1)
    corners = torch.stack([img[v0, u0], img[v0, u1], img[v1, u0], img[v1, u1]], -1)
    val = (corners[:, 0] * (1 - fu) + corners[:, 1] * fu) * (1 - fv) \
        + (corners[:, 2] * (1 - fu) + corners[:, 3] * fu) * fv
    return val, corners


def lidar_camera_agreement(sample: dict, rel_tol: float = 0.02, abs_tol: float = 0.05,
                           edge_ratio: float = 1.05, min_depth: float = 0.5,
                           project=None) -> dict:
    """Projects every LiDAR point into every camera (``project_points`` contract) and compares,
    for each projection that lands in an image:

    * depth: the point's camera z-depth vs the rendered depth map at (u, v), interpolated
      bilinearly in inverse depth (exact on planes); agreement = ``|d_map - d| <= abs_tol +
      rel_tol * d``;
    * label: the point's label vs the label of the nearest pixel (round(v), round(u)).

    "Edge" projections are those whose 2x2 interpolation support contains sky or spans a depth
    ratio above ``edge_ratio`` or mixes labels (occlusion boundaries; the LiDAR, 0.3 m above
    the cameras, sees over cars the cameras cannot: there the map is nearer than the point).
    Returns counts and fractions, overall and on non-edge projections, and the fraction of
    non-edge projections where the map is *farther* than the point (a point in front of the
    visible surface: a calibration or rendering error, never occlusion).
    """
    project = project or default_projector()
    imgs = sample["depth"]
    c, h, w = imgs.shape
    pix, depth, valid = project(sample["points"].float(), sample["lidar_to_cam"].float(),
                                sample["intrinsics"].float(), (h, w), min_depth=min_depth)
    n_total = n_depth = n_label = n_inner = n_inner_depth = n_inner_label = n_farther = 0
    per_camera = []
    for ci in range(c):
        sel = valid[ci]
        if not sel.any():
            per_camera.append(0)
            continue
        u, v, d = pix[ci, sel, 0].double(), pix[ci, sel, 1].double(), depth[ci, sel].double()
        dm = imgs[ci].double()
        inv = torch.where(dm > 0, 1.0 / dm.clamp_min(1e-9), torch.zeros_like(dm))
        w_map, corners = _bilinear(inv, u, v)
        d_map = torch.where(w_map > 0, 1.0 / w_map.clamp_min(1e-12), torch.full_like(w_map, float("inf")))
        depth_ok = (d_map - d).abs() <= abs_tol + rel_tol * d
        lab_img = sample["labels"][ci]
        lab_pt = sample["point_labels"][sel]
        rows = v.round().long().clamp(0, h - 1)
        cols = u.round().long().clamp(0, w - 1)
        label_ok = lab_img[rows, cols] == lab_pt
        _, lab_corners = _bilinear(lab_img.double(), u, v)
        d_corners = torch.where(corners > 0, 1.0 / corners.clamp_min(1e-12), torch.zeros_like(corners))
        edge = ((corners <= 0).any(-1)
                | (d_corners.amax(-1) > edge_ratio * d_corners.amin(-1))
                | (lab_corners.amax(-1) != lab_corners.amin(-1)))
        n_total += int(sel.sum())
        n_depth += int(depth_ok.sum())
        n_label += int(label_ok.sum())
        inner = ~edge
        n_inner += int(inner.sum())
        n_inner_depth += int((depth_ok & inner).sum())
        n_inner_label += int((label_ok & inner).sum())
        n_farther += int((~depth_ok & inner & (d_map > d)).sum())
        per_camera.append(int(sel.sum()))
    frac = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "projections": n_total, "per_camera": per_camera,
        "depth_agree": frac(n_depth, n_total), "label_agree": frac(n_label, n_total),
        "edge_fraction": frac(n_total - n_inner, n_total),
        "depth_agree_interior": frac(n_inner_depth, n_inner),
        "label_agree_interior": frac(n_inner_label, n_inner),
        # a point in front of the surface the camera sees there: impossible away from edges
        # (the reverse, the camera seeing something nearer, is parallax occlusion)
        "map_farther_interior": frac(n_farther, n_inner),
    }


def warp_with_flow(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Samples ``image`` [B, ch, H, W] at p + flow(p) (bilinear, pixel centres at integers:
    grid_sample with align_corners=True): with forward flow t->t+1 and image = frame t+1 this
    rebuilds frame t."""
    b, _, h, w = image.shape
    jj = torch.arange(w, dtype=flow.dtype)[None, None, :]
    ii = torch.arange(h, dtype=flow.dtype)[None, :, None]
    u = jj + flow[:, 0]
    v = ii + flow[:, 1]
    grid = torch.stack([2.0 * u / max(w - 1, 1) - 1.0, 2.0 * v / max(h - 1, 1) - 1.0], -1)
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="border",
                         align_corners=True)


def flow_photometric_error(pair: dict, direction: str = "fw") -> dict:
    """Mean absolute RGB error (0-255 scale) on valid pixels between frame t and frame t+1
    warped back with flow_fw (``direction="fw"``; "bw": frame t+1 vs frame t warped with
    flow_bw), and the same error with no warp (zero flow)."""
    if direction == "fw":
        src, dst = pair["t0"]["images"].float(), pair["t1"]["images"].float()
        flow, valid = pair["flow_fw"], pair["flow_fw_valid"]
    elif direction == "bw":
        src, dst = pair["t1"]["images"].float(), pair["t0"]["images"].float()
        flow, valid = pair["flow_bw"], pair["flow_bw_valid"]
    else:
        raise ValueError(f"direction must be 'fw' or 'bw', got {direction!r}")
    warped = warp_with_flow(dst, flow)
    err_w = (warped - src).abs().mean(1)[valid]
    err_0 = (dst - src).abs().mean(1)[valid]
    return {"valid_fraction": float(valid.float().mean()),
            "warped": float(err_w.mean()) if err_w.numel() else float("nan"),
            "warped_median": float(err_w.median()) if err_w.numel() else float("nan"),
            "no_warp": float(err_0.mean()) if err_0.numel() else float("nan")}


def forward_backward_error(pair: dict) -> dict:
    """|flow_fw(p) + flow_bw(p + flow_fw(p))| in pixels over pixels valid in flow_fw_valid
    (median, 90th / 99th percentile, mean)."""
    fw, valid = pair["flow_fw"], pair["flow_fw_valid"]
    bw_at = warp_with_flow(pair["flow_bw"], fw)
    e = (fw + bw_at).norm(dim=1)[valid].double()
    if e.numel() == 0:
        return {"median": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    q = torch.quantile(e[:: max(1, e.numel() // 1_000_000)], torch.tensor([0.5, 0.9, 0.99], dtype=e.dtype))
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "mean": float(e.mean())}
