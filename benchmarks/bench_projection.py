"""Point-to-pixel projection ops vs what image-to-LiDAR distillation code does today, on the
same inputs.

  * project: 35k points x 6 cameras, 1600x900 images (nuScenes-like) — pyssl vs the
    nuscenes-devkit algorithm (per camera: copy the cloud, rotate + translate, view_points with
    normalisation, depth and border masks, in numpy) and vs a vectorised PyTorch version
    (pyssl.ops.reference.project_points) on the same device.
  * gather + cosine distillation loss: C = 6, D in {64, 768}, M ~ 20k pairs, forward+backward —
    pyssl gather_pixel_features (+ the fused pixel_to_point_distillation_loss) vs ScaLR's
    gather from a permuted NCHW map.
  * segment_mean vs SLidR's superpixel pooling with a sparse one-hot matrix product.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyssl import ops
from pyssl.ops import reference

from .common import PYSSL, peak_memory, run, saved_bytes

H_IMG, W_IMG = 900, 1600


def nuscenes_rig(C=6, dtype=torch.float32):
    yaws = torch.arange(C, dtype=torch.float64) * (2 * math.pi / C)
    M = torch.zeros(C, 4, 4, dtype=torch.float64)
    for c, yaw in enumerate(yaws):
        z = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
        x = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
        y = torch.tensor([0.0, 0.0, -1.0])
        M[c, :3, :3] = torch.stack([x, y, z])
        M[c, :3, 3] = torch.tensor([0.0, -0.3, 0.8])
        M[c, 3, 3] = 1
    K = torch.tensor([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]], dtype=torch.float64).repeat(C, 1, 1)
    return M.to(dtype), K.to(dtype)


def lidar_scan(P=35000, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = 2 + torch.rand(P, generator=g) ** 2 * 68
    az = torch.rand(P, generator=g) * 2 * math.pi
    el = (torch.rand(P, generator=g) - 0.7) * 0.5
    pts = torch.stack([r * torch.cos(az) * torch.cos(el), r * torch.sin(az) * torch.cos(el),
                       r * torch.sin(el), torch.rand(P, generator=g)], 1)
    return pts


def nuscenes_devkit_projection(points_np, M_np, K_np, min_dist=1.0):
    """Per camera, as nuscenes-devkit's map_pointcloud_to_image: copy, transform, view_points,
    masks (its images are 1600x900)."""
    out = []
    for c in range(M_np.shape[0]):
        pc = points_np[:, :3].T.copy()  # [3, P], a deep copy per camera as the devkit does
        pc = M_np[c, :3, :3] @ pc
        pc = pc + M_np[c, :3, 3:4]
        depths = pc[2, :]
        viewpad = np.eye(4)
        viewpad[:3, :3] = K_np[c]
        hom = np.concatenate([pc, np.ones((1, pc.shape[1]))])
        proj = (viewpad @ hom)[:3]
        proj = proj / proj[2:3, :].repeat(3, 0)
        mask = np.ones(depths.shape[0], dtype=bool)
        mask = np.logical_and(mask, depths > min_dist)
        mask = np.logical_and(mask, proj[0, :] > 1)
        mask = np.logical_and(mask, proj[0, :] < W_IMG - 1)
        mask = np.logical_and(mask, proj[1, :] > 1)
        mask = np.logical_and(mask, proj[1, :] < H_IMG - 1)
        out.append((proj[:2, mask], mask))
    return out


@pytest.mark.parametrize("impl", [PYSSL, "nuscenes_devkit_numpy", "torch_vectorised"])
def test_project(benchmark, device, impl):
    M, K = nuscenes_rig()
    pts = lidar_scan()
    if impl == "nuscenes_devkit_numpy":
        if torch.device(device).type != "cpu":
            pytest.skip("numpy runs on the CPU")
        pn, Mn, Kn = pts.numpy().astype(np.float64), M.double().numpy(), K.double().numpy()

        def fn():
            return nuscenes_devkit_projection(pn, Mn, Kn)
    else:
        pts, M, K = pts.to(device), M.to(device), K.to(device)
        if impl == PYSSL:
            def fn():
                return ops.project_points(pts, M, K, (H_IMG, W_IMG))
        else:
            def fn():
                return reference.project_points(pts, M, K, (H_IMG, W_IMG))
    run(benchmark, fn, device, impl=impl, group=f"project_points P=35000 C=6 1600x900 [{device}]")


def _cosine_loss(a, b):
    # normalise once (cosine_similarity would normalise the unit vectors again)
    return (1 - (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)).mean()


def scalr_gather_loss(point_feats, feats, cam, row, col):
    pix = feats.permute(0, 2, 3, 1)[cam, row, col]  # ScaLR-style gather from a permuted map
    return _cosine_loss(point_feats, pix)


def pyssl_gather_loss(point_feats, feats, cam, row, col):
    return _cosine_loss(point_feats, ops.gather_pixel_features(feats, cam, row, col))


def pyssl_fused_loss(point_feats, feats, cam, row, col):
    return ops.pixel_to_point_distillation_loss(point_feats, feats, cam, row, col)


GATHER_IMPLS = {PYSSL: pyssl_gather_loss, "pyssl_fused": pyssl_fused_loss,
                "scalr_permute_gather": scalr_gather_loss}


@pytest.mark.parametrize("D", [64, 768])
@pytest.mark.parametrize("impl", list(GATHER_IMPLS))
def test_gather_loss(benchmark, device, quick, D, impl):
    if quick and D != 64:
        pytest.skip("--bench-quick")
    if impl == "pyssl_fused" and not hasattr(ops, "pixel_to_point_distillation_loss"):
        pytest.skip("no fused loss in this build")
    C, H, W, M = 6, 56, 100, 20000
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(C, D, H, W, generator=g).to(device).requires_grad_(True)
    point_feats = torch.randn(M, D, generator=g).to(device).requires_grad_(True)
    cam = torch.randint(0, C, (M,), generator=g).to(device)
    row = torch.randint(0, H, (M,), generator=g).to(device)
    col = torch.randint(0, W, (M,), generator=g).to(device)
    loss_fn = GATHER_IMPLS[impl]

    def forward():
        return loss_fn(point_feats, feats, cam, row, col)

    def fn():
        feats.grad = point_feats.grad = None
        forward().backward()

    run(benchmark, fn, device, impl=impl,
        group=f"gather + cosine loss fwd+bwd C=6 D={D} M=20000 map 56x100 [{device}]",
        saved_bytes=saved_bytes(forward, inputs=(feats, point_feats, cam, row, col)),
        peak_bytes=peak_memory(fn, device))


def slidr_sparse_pooling(values, ids, num_segments):
    """SLidR-style superpixel pooling: a sparse one-hot [S, N] matrix times the features."""
    n = values.shape[0]
    one_hot = torch.sparse_coo_tensor(torch.stack([ids, torch.arange(n, device=values.device)]),
                                      torch.ones(n, device=values.device), (num_segments, n))
    counts = torch.sparse.sum(one_hot, 1).to_dense()
    return torch.sparse.mm(one_hot, values) / counts.clamp(min=1)[:, None]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [PYSSL, "slidr_sparse_mm"])
def test_segment_mean(benchmark, device, quick, mode, impl):
    N, D, S = (100000 if quick else 560000), 64, 900  # 6 images of 224x416 pixels, 150 superpixels each
    g = torch.Generator().manual_seed(2)
    values = torch.randn(N, D, generator=g).to(device).requires_grad_(mode == "fwd+bwd")
    ids = torch.randint(0, S, (N,), generator=g).to(device)
    if impl == PYSSL:
        def forward():
            return ops.segment_mean(values, ids, S)[0]
    else:
        def forward():
            return slidr_sparse_pooling(values, ids, S)
    if mode == "fwd":
        fn = forward
    else:
        grad = torch.randn(S, D, device=device)

        def fn():
            values.grad = None
            forward().backward(grad)
    run(benchmark, fn, device, impl=impl, group=f"segment_mean {mode} N={N} D={D} S={S} [{device}]")
