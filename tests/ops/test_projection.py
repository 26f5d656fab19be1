"""Point-to-pixel projection ops against float64 references, a geometric round trip, and real
calibrated stereo data (Middlebury 2014 motorcycle, via scikit-image)."""

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.utils.deterministic
from hypothesis import given, settings
from hypothesis import strategies as st

from pyssl import ops
from pyssl.ops import reference


def random_rig(C, seed, dtype=torch.float64, B=None):
    """C cameras around the origin looking outwards, nuScenes-like (LiDAR x fwd, y left, z up)."""
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if B else ()
    yaw = torch.rand(*lead, C, generator=g, dtype=torch.float64) * 2 * math.pi
    # camera axes in LiDAR coordinates: z_cam = (cos, sin, 0), x_cam = (sin, -cos, 0), y_cam = -z_lidar
    zc = torch.stack([torch.cos(yaw), torch.sin(yaw), torch.zeros_like(yaw)], -1)
    xc = torch.stack([torch.sin(yaw), -torch.cos(yaw), torch.zeros_like(yaw)], -1)
    yc = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64).expand_as(zc)
    R = torch.stack([xc, yc, zc], -2)  # rows: camera axes -> maps lidar vectors to camera frame
    t = torch.randn(*lead, C, 3, generator=g, dtype=torch.float64) * 0.5
    M = torch.zeros(*lead, C, 4, 4, dtype=torch.float64)
    M[..., :3, :3] = R
    M[..., :3, 3] = t
    M[..., 3, 3] = 1
    f = 200 + torch.rand(*lead, C, generator=g, dtype=torch.float64) * 800
    K = torch.zeros(*lead, C, 3, 3, dtype=torch.float64)
    K[..., 0, 0] = f
    K[..., 1, 1] = f * (0.9 + 0.2 * torch.rand(*lead, C, generator=g, dtype=torch.float64))
    K[..., 0, 2] = 320 + torch.randn(*lead, C, generator=g, dtype=torch.float64) * 10
    K[..., 1, 2] = 240 + torch.randn(*lead, C, generator=g, dtype=torch.float64) * 10
    K[..., 2, 2] = 1
    return M.to(dtype), K.to(dtype)


def random_points(P, seed, dtype=torch.float64, extra=1):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(P, 3 + extra, generator=g, dtype=torch.float64) * 15
    return pts.to(dtype)


def assert_projection_close(got, want, H, W, margin, tol, raw=None, rounding="none", points=None):
    """``raw``: the unrounded reference pixels; a rounded pixel may differ by one where the
    unrounded value lies within rounding error of a rounding boundary. ``points``: for float32
    results, pixels are compared only where the depth is not a near-cancellation (|depth| at
    least 1% of the point's distance): there the depth's own rounding error, relative to it,
    exceeds any fixed tolerance."""
    pix, depth, valid = got
    rpix, rdepth, rvalid = want
    torch.testing.assert_close(depth.double(), rdepth.double(), rtol=tol, atol=tol)
    finite = torch.isfinite(rpix).all(-1) & (rdepth.abs() > 1e-3)
    if points is not None:
        finite &= rdepth.abs() > 1e-2 * (1 + points[:, :3].double().norm(dim=1))
    if raw is not None and rounding != "none":
        frac = raw.double() - torch.floor(raw.double())
        edge = (frac - 0.5).abs() if rounding == "round" else torch.minimum(frac, 1 - frac)
        finite &= ~(edge < tol * (1 + raw.double().abs())).any(-1)
    torch.testing.assert_close(pix.double()[finite], rpix.double()[finite], rtol=tol, atol=tol * 1e3)
    # validity may legitimately differ only for points within rounding error of a border
    u, v = rpix.double()[..., 0], rpix.double()[..., 1]
    near = ((u - margin).abs() < 1e-6) | ((u - (W - 1 - margin)).abs() < 1e-6) | \
           ((v - margin).abs() < 1e-6) | ((v - (H - 1 - margin)).abs() < 1e-6)
    assert torch.equal(valid[~near], rvalid[~near])


@given(P=st.integers(0, 300), C=st.integers(0, 7), seed=st.integers(0, 2**31 - 1),
       rounding=st.sampled_from(["none", "floor", "round"]), min_depth=st.sampled_from([0.0, 0.5, 1.0]),
       margin=st.sampled_from([0.0, 2.0]), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_project_points_matches_reference(P, C, seed, rounding, min_depth, margin, dtype):
    pts = random_points(P, seed, dtype)
    M, K = random_rig(C, seed + 1, dtype)
    H, W = 480, 640
    got = ops.project_points(pts, M, K, (H, W), min_depth=min_depth, margin=margin, rounding=rounding)
    want = reference.project_points(pts.double(), M.double(), K.double(), (H, W), min_depth, margin, rounding)
    raw = reference.project_points(pts.double(), M.double(), K.double(), (H, W), min_depth, margin)[0]
    assert got.pixels.shape == (C, P, 2) and got.valid.dtype == torch.bool
    assert_projection_close(got, want, H, W, margin, 1e-9 if dtype == torch.float64 else 2e-4,
                            raw, rounding, points=pts if dtype == torch.float32 else None)


@pytest.mark.parametrize("rounding", ["none", "floor", "round"])
@pytest.mark.parametrize("extra", [0, 2])
def test_project_points_past_the_point_blocks(rounding, extra):
    """More points than one CPU block (1024), rows of 3 and 5 columns, single and batched scans
    whose runs cross block boundaries: against the float64 reference and per-scan calls."""
    P, C = 2500, 3
    pts = random_points(P, 11, torch.float64, extra=extra)
    M, K = random_rig(C, 12)
    got = ops.project_points(pts, M, K, (480, 640), margin=1.0, rounding=rounding)
    want = reference.project_points(pts, M, K, (480, 640), 1.0, 1.0, rounding)
    raw = reference.project_points(pts, M, K, (480, 640), 1.0, 1.0)[0]
    assert_projection_close(got, want, 480, 640, 1.0, 1e-9, raw, rounding)
    assert got.valid.sum() > 100
    B = 3
    Mb, Kb = random_rig(C, 13, B=B)
    batch = torch.cat([torch.full((n,), b) for b, n in enumerate((700, 1100, 700))])
    for bt in (batch, batch[torch.randperm(P, generator=torch.Generator().manual_seed(3))]):
        gotb = ops.project_points(pts, Mb, Kb, (480, 640), batch=bt, rounding=rounding)
        for b in range(B):
            sel = bt == b
            wantb = ops.project_points(pts[sel], Mb[b], Kb[b], (480, 640), rounding=rounding)
            for g_, w_ in zip(gotb, wantb):
                assert torch.equal(g_[:, sel], w_)


def test_non_finite_points_are_invalid_and_do_not_crash():
    pts = torch.tensor([[5.0, 0, 0], [math.nan, 0, 0], [math.inf, 1, 1], [0, 0, 0]])
    M, K = random_rig(2, 0, torch.float32)
    M[0] = torch.tensor([[0.0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])  # looks along +x
    r = ops.project_points(pts, M, K, (480, 640))
    assert r.valid[0, 0] and not r.valid[:, 1:3].any()
    assert not r.valid[:, 3].any()  # depth 0 <= min_depth


def test_batched_form_equals_per_scan_calls():
    B, C, P = 3, 4, 500
    M, K = random_rig(C, 5, B=B)
    pts = random_points(P, 6)
    batch = torch.randint(0, B, (P,), generator=torch.Generator().manual_seed(7))
    sizes = torch.tensor([[480, 640]] * C).expand(B, C, 2)
    got = ops.project_points(pts, M, K, sizes, batch=batch)
    for b in range(B):
        sel = batch == b
        want = ops.project_points(pts[sel], M[b], K[b], (480, 640))
        for g_, w_ in zip(got, want):
            assert torch.equal(g_[:, sel], w_)
    pairs = ops.point_pixel_pairs(pts, M, K, (480, 640), batch=batch)
    for b in range(B):
        sel = torch.nonzero(batch == b).squeeze(1)
        want = ops.point_pixel_pairs(pts[sel], M[b], K[b], (480, 640))
        mine = torch.isin(pairs.point_index, sel)
        assert torch.equal(sel[want.point_index], pairs.point_index[mine])
        assert torch.equal(want.camera_index, pairs.camera_index[mine])
        assert torch.equal(want.row, pairs.row[mine]) and torch.equal(want.col, pairs.col[mine])


@given(P=st.integers(0, 400), C=st.integers(0, 6), seed=st.integers(0, 2**31 - 1),
       rounding=st.sampled_from(["floor", "round"]))
def test_point_pixel_pairs_all_and_first(P, C, seed, rounding):
    pts = random_points(P, seed)
    M, K = random_rig(C, seed + 1)
    got = ops.point_pixel_pairs(pts, M, K, (480, 640), rounding=rounding)
    want = reference.point_pixel_pairs(pts, M, K, (480, 640), rounding=rounding)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)
    first = ops.point_pixel_pairs(pts, M, K, (480, 640), rounding=rounding, cameras="first")
    pi, keep = torch.unique_consecutive(got.point_index, return_counts=True)
    starts = torch.cumsum(keep, 0) - keep
    assert torch.equal(first.point_index, pi)
    assert torch.equal(first.camera_index, got.camera_index[starts])


def test_point_pixel_pairs_random_camera_is_valid_uniform_and_reproducible():
    C = 6
    M, K = random_rig(C, 11)
    # cameras with overlapping views: every point seen by several cameras
    M[:, :3, :3] = M[0, :3, :3]
    pts = torch.tensor([[0.0, 0.0, 0.0]]) + torch.stack([M[0, 2, :3] * 20] * 4000) + \
        torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    allp = ops.point_pixel_pairs(pts, M, K, (480, 640))
    a = ops.point_pixel_pairs(pts, M, K, (480, 640), cameras="random", generator=torch.Generator().manual_seed(3))
    b = ops.point_pixel_pairs(pts, M, K, (480, 640), cameras="random", generator=torch.Generator().manual_seed(3))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    valid_set = set(zip(allp.point_index.tolist(), allp.camera_index.tolist()))
    assert all((p, c) in valid_set for p, c in zip(a.point_index.tolist(), a.camera_index.tolist()))
    counts = torch.bincount(a.camera_index, minlength=C).double()
    n_valid = torch.bincount(allp.point_index)
    assert (n_valid == C).float().mean() > 0.9  # all six see almost every point
    assert (counts / counts.sum() - 1 / C).abs().max() < 0.03


def test_round_trip_back_projected_pixels():
    C, H, W = 5, 300, 400
    M, K = random_rig(C, 21)
    g = torch.Generator().manual_seed(22)
    n = 2000
    cam = torch.randint(0, C, (n,), generator=g)
    u = torch.rand(n, generator=g, dtype=torch.float64) * (W - 1)
    v = torch.rand(n, generator=g, dtype=torch.float64) * (H - 1)
    z = 1.5 + torch.rand(n, generator=g, dtype=torch.float64) * 60
    pix_h = torch.stack([u * z, v * z, z], -1)
    p_cam = torch.einsum("nij,nj->ni", torch.linalg.inv(K[cam]), pix_h)
    inv = torch.linalg.inv(M[cam])
    p_lidar = torch.einsum("nij,nj->ni", inv[:, :3, :3], p_cam) + inv[:, :3, 3]
    r = ops.project_points(p_lidar, M, K, (H, W))
    idx = torch.arange(n)
    torch.testing.assert_close(r.pixels[cam, idx], torch.stack([u, v], -1), rtol=0, atol=1e-8)
    torch.testing.assert_close(r.depth[cam, idx], z, rtol=0, atol=1e-9)
    assert r.valid[cam, idx].all()


def _motorcycle_points():
    """Middlebury 2014 'motorcycle' (down-sampled 4x): left-image pixels with ground-truth
    disparity back-projected to 3D with the published calibration, in a nuScenes-like LiDAR
    frame; returns points, the pixels, the disparities and a 2-camera rig (left, right)."""
    skimage_data = pytest.importorskip("skimage.data")
    _, _, disp = skimage_data.stereo_motorcycle()
    f, cx, cy, doffs, baseline = 994.978, 311.193, 254.877, 31.086, 0.193001
    rows, cols = np.nonzero(np.isfinite(disp))
    d = disp[rows, cols].astype(np.float64)
    Z = f * baseline / (d + doffs)
    X = (cols - cx) * Z / f
    Y = (rows - cy) * Z / f
    cam_pts = np.stack([X, Y, Z], 1)
    # LiDAR frame (x forward, y left, z up) = camera (z, -x, -y), LiDAR 1.2 m behind the camera
    lidar_pts = np.stack([Z + 1.2, -X, -Y], 1)
    to_cam = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, -1.2], [0, 0, 0, 1.0]])
    right = to_cam.copy()
    right[0, 3] -= baseline  # right camera: baseline along camera +x
    K_left = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]])
    K_right = np.array([[f, 0, cx + doffs], [0, f, cy], [0, 0, 1]])
    M = torch.tensor(np.stack([to_cam, right]))
    K = torch.tensor(np.stack([K_left, K_right]))
    return torch.tensor(lidar_pts), rows, cols, d, M, K, disp.shape


def test_real_stereo_data_projects_to_left_pixels_and_right_disparity():
    pts, rows, cols, d, M, K, (H, W) = _motorcycle_points()
    r = ops.project_points(pts, M, K, (H, W), min_depth=0.1)
    np.testing.assert_allclose(r.pixels[0, :, 0].numpy(), cols, atol=1e-6)
    np.testing.assert_allclose(r.pixels[0, :, 1].numpy(), rows, atol=1e-6)
    np.testing.assert_allclose(r.pixels[1, :, 0].numpy(), cols - d, atol=1e-6)
    np.testing.assert_allclose(r.pixels[1, :, 1].numpy(), rows, atol=1e-6)
    # every point is in front of both cameras; borders are decided up to rounding error
    inner = torch.tensor((cols > 0) & (cols < W - 1) & (rows > 0) & (rows < H - 1))
    assert r.valid[0][inner].all()
    right_col = cols - d
    decided = torch.tensor(np.abs(right_col) > 1e-6) & inner
    assert torch.equal(r.valid[1][decided], torch.tensor(right_col >= 0)[decided])
    assert (~torch.tensor(right_col >= 0)).sum() > 100  # the check is not vacuous
    # float32 data path too
    r32 = ops.project_points(pts.float(), M.float(), K.float(), (H, W), min_depth=0.1)
    assert (r32.pixels[1, :, 0].double() - torch.tensor(cols - d)).abs().max() < 2e-3


# --------------------------------------------------------------------------------------------
# gather_pixel_features and segment_mean
# --------------------------------------------------------------------------------------------


@given(C=st.integers(1, 4), D=st.integers(1, 20), H=st.integers(1, 9), W=st.integers(1, 9),
       M=st.integers(0, 60), seed=st.integers(0, 2**31 - 1), channels_last=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_gather_pixel_features_nearest_and_bilinear(C, D, H, W, M, seed, channels_last, dtype):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(C, D, H, W, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    cam = torch.randint(0, C, (M,), generator=g)
    row = torch.randint(0, H, (M,), generator=g)
    col = torch.randint(0, W, (M,), generator=g)
    got = ops.gather_pixel_features(feats, cam, row, col)
    assert torch.equal(got, feats[cam, :, row, col])
    # bilinear, including coordinates outside the image
    rowf = torch.rand(M, generator=g, dtype=torch.float64) * (H + 2) - 1.5
    colf = torch.rand(M, generator=g, dtype=torch.float64) * (W + 2) - 1.5
    f64 = feats.double().requires_grad_(True)
    out = ops.gather_pixel_features(f64, cam, rowf, colf, mode="bilinear")
    grid = torch.stack([2 * colf / max(W - 1, 1) - 1 if W > 1 else colf * 0, 2 * rowf / max(H - 1, 1) - 1 if H > 1 else rowf * 0], -1)
    if H > 1 and W > 1:
        want = torch.nn.functional.grid_sample(f64[cam], grid.view(M, 1, 1, 2), mode="bilinear",
                                               padding_mode="zeros", align_corners=True).view(M, D)
        torch.testing.assert_close(out, want)
        gr = torch.randn(M, D, generator=g, dtype=torch.float64)
        (g1,) = torch.autograd.grad(out, f64, gr)
        (g2,) = torch.autograd.grad(want, f64, gr)
        torch.testing.assert_close(g1, g2)


def test_gather_gradcheck_opcheck_and_determinism():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    cam = torch.tensor([0, 1, 1, 0, 1])
    row = torch.tensor([0.5, 2.2, 3.6, 1.7, 3.3], dtype=torch.float64, requires_grad=True)
    col = torch.tensor([0.1, 4.6, 2.6, 3.3, 4.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, r, c: ops.gather_pixel_features(f, cam, r, c, mode="bilinear"),
                                    (feats, row, col))
    xy = torch.stack([col, row], -1).detach()
    torch.library.opcheck(torch.ops.pyssl.sample_points.default, (feats, cam, xy, 0))
    torch.library.opcheck(torch.ops.pyssl.sample_points.default, (feats.float(), None, xy[:4].float(), 1))
    many = torch.randint(0, 2, (5000,), generator=g)
    r = torch.randint(0, 5, (5000,), generator=g)
    c = torch.randint(0, 6, (5000,), generator=g)
    f32 = feats.detach().float()
    grads = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            x = f32.clone().requires_grad_(True)
            ops.gather_pixel_features(x, many, r, c).backward(torch.ones(5000, 3))
            grads.append(x.grad)
        finally:
            torch.set_num_threads(prev)
    assert torch.equal(grads[0], grads[1])
    hits = torch.zeros(2, 5, 6).index_put_((many, r, c), torch.ones(5000), accumulate=True)
    assert torch.equal(grads[0], hits[:, None].expand(2, 3, 5, 6))


def _strided_grad(kind, M, D, dtype, g):
    """grad [M, D] in non-contiguous strides (as tests/ops/test_cuda_emulated.py's helper)."""
    if kind == "expanded":  # strides (1, 0): a loss on the channel sum
        return torch.randn(M, 1, generator=g).to(dtype).expand(M, D)
    if kind == "one_value":  # strides (0, 0): out.sum()
        return torch.randn(1, 1, generator=g).to(dtype).expand(M, D)
    if kind == "transposed":
        return torch.randn(D, M, generator=g).to(dtype).t()
    return torch.randn(M, 2 * D, generator=g).to(dtype)[:, ::2]


@pytest.mark.parametrize("kind", ["expanded", "transposed", "every_other_column", "one_value"])
@pytest.mark.parametrize("layout", ["pairs_planar", "pairs_channels_last", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_sample_points_backward_reads_gradient_strides(kind, layout, dtype):
    """The CPU backward of sample_points reads grad in its own strides, without a contiguous
    copy, on every path (pairs on planar and on channels-last features, dense sampling; the
    feature and the xy gradient; bilinear and nearest): the same bits as for the copy."""
    g = torch.Generator().manual_seed(7)
    N, D, H, W, M = 3, 19, 9, 13, 300
    f = torch.randn(N, D, H, W, generator=g).to(dtype)
    if layout == "pairs_channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    idx = None if layout == "dense" else torch.randint(0, N, (M,), generator=g)
    xy_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xy = (torch.rand(M, 2, generator=g) * torch.tensor([W + 2.0, H + 2.0]) - 1).to(xy_dtype)
    grad = _strided_grad(kind, M, D, dtype, g)
    assert not grad.is_contiguous()
    for mode in (0, 1):
        got = torch.ops.pyssl.sample_points_backward(grad, f, idx, xy, mode, True, mode == 0, False)
        want = torch.ops.pyssl.sample_points_backward(grad.contiguous(), f, idx, xy, mode, True, mode == 0,
                                                      False)
        assert got[0].abs().sum() > 0
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@given(N=st.integers(0, 200), D=st.integers(1, 40), S=st.integers(0, 30), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_segment_mean_matches_sparse_pooling(N, D, S, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(-1, S, (N,), generator=g) if S else torch.full((N,), -1)
    means, counts = ops.segment_mean(values, ids, S)
    rmeans, rcounts = reference.segment_mean(values.double(), ids, S)
    assert torch.equal(counts, rcounts)
    tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(means.double(), rmeans, rtol=tol, atol=tol)


def test_segment_mean_gradcheck_opcheck():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(30, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 7, (30,), generator=g)
    assert torch.autograd.gradcheck(lambda v: ops.segment_mean(v, ids, 7)[0], (v,))
    assert torch.autograd.gradgradcheck(lambda v: ops.segment_mean(v, ids, 7)[0], (v,))
    _, counts = ops.segment_mean(v, ids, 7)
    torch.library.opcheck(torch.ops.pyssl.segment_mean_backward.default,
                          (torch.randn(7, 4, dtype=torch.float64, requires_grad=True), ids, counts))
    torch.library.opcheck(torch.ops.pyssl.segment_mean.default, (v, ids, 7, False))
    assert ops.segment_mean(v, torch.full((30,), -1), 0)[0].shape == (0, 4)


def test_projection_opcheck_and_gradients():
    M, K = random_rig(3, 31)
    pts = random_points(40, 32)
    size = torch.tensor([[480.0, 640.0]] * 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pyssl.project_points.default, (pts, M, K, size, None, 1.0, 0.0, 0))
    torch.library.opcheck(torch.ops.pyssl.point_pixel_pairs.default,
                          (pts, M, K, size, None, 1.0, 0.0, 2, 0, None),
                          test_utils=("test_schema", "test_faketensor"))
    p = pts.clone().requires_grad_(True)
    Mr = M.clone().requires_grad_(True)
    Kr = K.clone().requires_grad_(True)
    front = torch.tensor([[10.0, 1.0, 0.5, 0.0]], dtype=torch.float64).repeat(3, 1) + torch.randn(3, 4, dtype=torch.float64)
    Mr0 = M.clone()
    Mr0[:, :3, :3] = torch.tensor([[0.0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=torch.float64)
    Mr0 = Mr0.requires_grad_(True)
    fp = front.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, M, K: ops.project_points(p, M, K, (480, 640))[:2],
                                    (fp, Mr0, Kr))
    batch = torch.tensor([0, 1, 1])
    Mb = torch.stack([Mr0.detach(), Mr0.detach() * 1.01]).requires_grad_(True)
    Kb = torch.stack([K, K * 1.02]).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p, M, K: ops.project_points(p, M, K, (480, 640), batch=batch)[:2], (fp, Mb, Kb))
    del p, Mr


def test_compile_fullgraph_projection_and_gather():
    M, K = random_rig(3, 41, torch.float32)
    pts = random_points(200, 42, torch.float32)
    feats = torch.randn(3, 8, 48, 64)

    def f(pts, feats):
        r = ops.project_points(pts, M, K, (48, 64), rounding="round")
        cam = r.valid.float().argmax(0)
        idx = torch.arange(pts.shape[0])
        pix = r.pixels[cam, idx].long()  # points outside every image: clamped to the border
        out = ops.gather_pixel_features(feats, cam, pix[:, 1].clamp(0, 47), pix[:, 0].clamp(0, 63))
        means, _ = ops.segment_mean(out, cam, 3)
        return means

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(pts, feats), f(pts, feats))


def test_nearest_gather_and_loss_trace_under_fake_tensors():
    """The nearest-mode range check reads values on the host; under FakeTensorMode (shape
    propagation, export) there are none, so it must step aside instead of raising
    DataDependentOutputException, and the shapes must come out as on real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        feats = torch.randn(3, 8, 6, 7)
        cam, row, col = (torch.zeros(5, dtype=torch.long) for _ in range(3))
        out = ops.gather_pixel_features(feats, cam, row, col)
        loss = ops.pixel_to_point_distillation_loss(torch.randn(5, 8), feats, cam, row, col)
    assert out.shape == (5, 8) and loss.shape == ()


def test_compile_point_pixel_pairs_dynamic_output():
    import torch._dynamo

    M, K = random_rig(3, 51, torch.float32)
    pts = random_points(300, 52, torch.float32)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        fn = torch.compile(lambda p: ops.point_pixel_pairs(p, M, K, (480, 640)).point_index * 2,
                           fullgraph=True)
        torch.testing.assert_close(fn(pts), ops.point_pixel_pairs(pts, M, K, (480, 640)).point_index * 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda M, K: ops.project_points(torch.randn(5, 2), M, K, (4, 4)), "points"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M[:2], K, (4, 4)), "cameras"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K[..., :2], (4, 4)), "intrinsics"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M[..., :3, :], K, (4, 4)), "lidar_to_cam"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K, (4, 4, 4)), "image_size"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K, (0, 4)), "image_size"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K, (4, 4), rounding="ceil"), "rounding"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M.to("meta"), K, (4, 4)), "lidar_to_cam"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K, (4, 4), batch=torch.tensor([0, 0, 0, 0, 1])), "lidar_to_cam"),
        (lambda M, K: ops.point_pixel_pairs(torch.randn(5, 3), M, K, (4, 4), rounding="none"), "rounding"),
        (lambda M, K: ops.point_pixel_pairs(torch.randn(5, 3), M, K, (4, 4), cameras="best"), "cameras"),
        (lambda M, K: ops.gather_pixel_features(torch.randn(3, 2, 4, 4), torch.tensor([5]), torch.tensor([0]), torch.tensor([0])), r"camera_index values must be in \[0, 3\).*\[5, 5\]"),
        (lambda M, K: ops.gather_pixel_features(torch.randn(3, 2, 4, 4), torch.tensor([0, 1]), torch.tensor([0, 4]), torch.tensor([0, 0])), r"row values must be in \[0, 4\) in mode=.nearest., got values in \[0, 4\]"),
        (lambda M, K: ops.gather_pixel_features(torch.randn(3, 2, 4, 5), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([-3, 0])), r"col values must be in \[0, 5\).*\[-3, 0\]"),
        (lambda M, K: ops.pixel_to_point_distillation_loss(torch.randn(2, 2), torch.randn(3, 2, 4, 4), torch.tensor([0, 1]), torch.tensor([0, 600]), torch.tensor([0, 0])), r"row values must be in \[0, 4\)"),
        (lambda M, K: ops.gather_pixel_features(torch.randn(3, 2, 4, 4), torch.tensor([0]), torch.tensor([True]), torch.tensor([0])), "row of dtype torch.bool"),
        (lambda M, K: ops.gather_pixel_features(torch.randn(3, 2, 4, 4), torch.tensor([0]), torch.tensor([0.5]), torch.tensor([0.5])), "nearest"),
        (lambda M, K: ops.gather_pixel_features(torch.randn(3, 2, 4, 4), torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0])), "same length"),
        (lambda M, K: ops.segment_mean(torch.randn(4, 2), torch.tensor([0, 1, 5, 0]), 3), "segment_ids"),
        (lambda M, K: ops.segment_mean(torch.randn(4, 2), torch.tensor([0, 1, 1]), 3), "segment_ids"),
        (lambda M, K: ops.segment_mean(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), -1), "num_segments"),
        (lambda M, K: ops.segment_mean(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 2.0), "num_segments"),
        (lambda M, K: ops.gather_pixel_features(torch.randn(3, 2, 4, 4), torch.tensor([0.9]), torch.tensor([0]), torch.tensor([0])), "camera_index"),
        (lambda M, K: ops.pixel_to_point_distillation_loss(torch.randn(1, 2), torch.randn(3, 2, 4, 4), torch.tensor([True]), torch.tensor([0]), torch.tensor([0])), "camera_index"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K, (float("nan"), 4)), "image_size"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K, (4, 4), min_depth=-5), "min_depth must be finite and >= 0"),
        (lambda M, K: ops.point_pixel_pairs(torch.randn(5, 3), M, K, (4, 4), min_depth=float("nan")), "min_depth must be finite"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K, torch.tensor([4 + 9j, 4])), "image_size must be a real tensor"),
        (lambda M, K: ops.project_points(torch.randn(5, 3), M, K, torch.tensor([4, 4], device="meta")), "image_size is a meta tensor"),
        (lambda M, K: ops.point_pixel_pairs(torch.randn(5, 3), M, K, (1e30, 1e30)), "image_size"),
        (lambda M, K: ops.gather_pixel_features(torch.randn(3, 2, 4, 4), torch.tensor([0]).to("meta"), torch.tensor([0]), torch.tensor([0])), "camera_index must be on features's device"),
        (lambda M, K: ops.pixel_to_point_distillation_loss(torch.randn(1, 2), torch.randn(3, 2, 4, 4), torch.tensor([0]), torch.tensor([0.5]).to("meta"), torch.tensor([0.5]), mode="bilinear"), "row must be on features's device"),
        (lambda M, K: ops.pixel_to_point_distillation_loss(torch.randn(1, 2), torch.randn(3, 2, 4, 4), torch.tensor([0]), torch.tensor([0.5], requires_grad=True), torch.tensor([0.5]), mode="bilinear"), "row requires grad"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    M, K = random_rig(3, 0, torch.float32)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(M, K)


def test_empty_inputs_give_clean_empty_results():
    M, K = random_rig(3, 0, torch.float32)
    r = ops.project_points(torch.zeros(0, 3), M, K, (10, 10))
    assert r.pixels.shape == (3, 0, 2)
    r = ops.project_points(torch.randn(4, 3), M[:0], K[:0], (10, 10))
    assert r.pixels.shape == (0, 4, 2) and r.valid.shape == (0, 4)
    pairs = ops.point_pixel_pairs(torch.randn(4, 3), M[:0], K[:0], (10, 10))
    assert all(t.shape == (0,) for t in pairs)
    behind = torch.tensor([[-10.0, 0, 0]]).repeat(5, 1)
    M1 = M.clone()
    M1[:, :3, :3] = torch.tensor([[0.0, -1, 0], [0, 0, -1], [1, 0, 0]])
    assert all(t.shape == (0,) for t in ops.point_pixel_pairs(behind, M1, K, (10, 10)))
    assert ops.gather_pixel_features(torch.randn(3, 4, 5, 5), torch.zeros(0, dtype=torch.long),
                                     torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)).shape == (0, 4)


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_projection_matches_cpu(dtype):
    M, K = random_rig(6, 61, dtype)
    pts = random_points(35000, 62, dtype)
    # nvcc builds projection.cu without FMA contraction (CMakeLists.txt), so the GPU rounds each
    # product and sum as the CPU does: the same bits, also for float32 pixels near a border or
    # an integer (floor, round) and for points near depth 0 (u, v ~ 1e5).
    for rounding in ("none", "floor", "round"):
        a = ops.project_points(pts, M, K, (900, 1600), rounding=rounding)
        b = ops.project_points(pts.cuda(), M.cuda(), K.cuda(), (900, 1600), rounding=rounding)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y.cpu(), rtol=0, atol=0, equal_nan=True)
    for cameras in ("all", "first"):
        a = ops.point_pixel_pairs(pts, M, K, (900, 1600), cameras=cameras)
        b = ops.point_pixel_pairs(pts.cuda(), M.cuda(), K.cuda(), (900, 1600), cameras=cameras)
        for x, y in zip(a, b):
            assert torch.equal(x, y.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_gather_and_segment_mean(deterministic):
    g = torch.Generator().manual_seed(71)
    feats = torch.randn(6, 64, 90, 160, generator=g)
    cam = torch.randint(0, 6, (20000,), generator=g)
    row = torch.rand(20000, generator=g) * 89
    col = torch.rand(20000, generator=g) * 159
    fc = feats.cuda().requires_grad_(True)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        out = ops.gather_pixel_features(fc, cam.cuda(), row.cuda(), col.cuda(), mode="bilinear")
        grad = torch.randn(20000, 64, generator=g)
        out.backward(grad.cuda())
        fr = feats.clone().requires_grad_(True)
        ref = ops.gather_pixel_features(fr, cam, row, col, mode="bilinear")
        ref.backward(grad)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fc.grad.cpu(), fr.grad, rtol=1e-4, atol=1e-4)
        if deterministic:
            fc2 = feats.cuda().requires_grad_(True)
            ops.gather_pixel_features(fc2, cam.cuda(), row.cuda(), col.cuda(), mode="bilinear").backward(grad.cuda())
            assert torch.equal(fc2.grad, fc.grad)
        vals = torch.randn(50000, 64, generator=g)
        ids = torch.randint(-1, 3000, (50000,), generator=g)
        m_gpu, c_gpu = ops.segment_mean(vals.cuda(), ids.cuda(), 3000, deterministic=deterministic)
        m_cpu, c_cpu = ops.segment_mean(vals, ids, 3000)
        assert torch.equal(c_gpu.cpu(), c_cpu)
        torch.testing.assert_close(m_gpu.cpu(), m_cpu, rtol=1e-5, atol=1e-6)
        if deterministic:
            assert torch.equal(ops.segment_mean(vals.cuda(), ids.cuda(), 3000, deterministic=True)[0], m_gpu)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
def test_cuda_opcheck_projection_family():
    M, K = random_rig(3, 81)
    pts = random_points(40, 82)
    size = torch.tensor([[480.0, 640.0]] * 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pyssl.project_points.default, (pts.cuda(), M.cuda(), K.cuda(), size.cuda(), None, 1.0, 0.0, 0))
    feats = torch.randn(2, 3, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    xy = torch.rand(7, 2, dtype=torch.float64, device="cuda") * 5
    torch.library.opcheck(torch.ops.pyssl.sample_points.default, (feats, torch.tensor([0, 1, 1, 0, 1, 0, 0], device="cuda"), xy, 0))
    v = torch.randn(30, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.pyssl.segment_mean.default, (v, torch.randint(-1, 7, (30,), device="cuda"), 7, True))


# --------------------------------------------------------------------------------------------
# fused distillation loss
# --------------------------------------------------------------------------------------------


@given(C=st.integers(1, 3), D=st.integers(1, 24), H=st.integers(1, 8), W=st.integers(1, 8),
       M=st.integers(1, 80), seed=st.integers(0, 2**31 - 1), loss=st.sampled_from(["cosine", "l2_normalized"]),
       mode=st.sampled_from(["nearest", "bilinear"]), channels_last=st.booleans())
def test_fused_distillation_loss_matches_gather_then_loss(C, D, H, W, M, seed, loss, mode, channels_last):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(C, D, H, W, generator=g, dtype=torch.float64)
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    feats.requires_grad_(True)
    pf = torch.randn(M, D, generator=g, dtype=torch.float64, requires_grad=True)
    if seed % 5 == 0:
        pf.data[0] = 0  # a zero vector (normalised with F.normalize's eps)
    cam = torch.randint(0, C, (M,), generator=g)
    if mode == "nearest":
        row, col = torch.randint(0, H, (M,), generator=g), torch.randint(0, W, (M,), generator=g)
    else:
        row = torch.rand(M, generator=g, dtype=torch.float64) * (H + 1) - 1
        col = torch.rand(M, generator=g, dtype=torch.float64) * (W + 1) - 1
    got = ops.pixel_to_point_distillation_loss(pf, feats, cam, row, col, loss=loss, mode=mode)
    pix = ops.gather_pixel_features(feats, cam, row, col, mode=mode)
    a, b = torch.nn.functional.normalize(pix, dim=1), torch.nn.functional.normalize(pf, dim=1)
    want = (1 - (a * b).sum(1)).mean() if loss == "cosine" else (a - b).pow(2).sum(1).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(got, (pf, feats))
    g2 = torch.autograd.grad(want, (pf, feats))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)


def test_fused_distillation_loss_gradcheck_opcheck_compile():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    pf = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cam = torch.randint(0, 2, (9,), generator=g)
    row = torch.rand(9, generator=g, dtype=torch.float64) * 4
    col = torch.rand(9, generator=g, dtype=torch.float64) * 5
    assert torch.autograd.gradcheck(
        lambda p, f: ops.pixel_to_point_distillation_loss(p, f, cam, row, col, mode="bilinear"), (pf, feats))
    xy = torch.stack([col, row], -1)
    torch.library.opcheck(torch.ops.pyssl.distill_loss.default, (pf, feats, cam, xy, None, 0, 0))
    torch.library.opcheck(torch.ops.pyssl.distill_loss.default, (pf.float(), feats.float(), cam, xy.float(), torch.rand(9), 1, 1))
    fn = torch.compile(lambda p, f: ops.pixel_to_point_distillation_loss(p, f, cam, row.long(), col.long()), fullgraph=True)
    torch.testing.assert_close(fn(pf, feats), ops.pixel_to_point_distillation_loss(pf, feats, cam, row.long(), col.long()))


def _with_threads(n, fn):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("outside", ["none", "some", "all"])
def test_nearest_feature_gradient_is_zero_where_no_pair_lands(outside):
    """The nearest-mode planar backwards (gather_pixel_features, the fused loss) zero their
    accumulator in the same pass as the adds: pixels no pair reads, whole cameras, and pairs
    outside every image must still give exact zeros with uninitialised memory NaN-filled.
    Integer pixels outside the image are refused by the public functions, so the kernels
    (torch.ops.pyssl.sample_points / distill_loss, which read zeros at coordinates outside)
    are called directly."""
    g = torch.Generator().manual_seed(3)
    C, D, H, W, M = 3, 2, 30, 40, 700  # several blocks of pairs, two tasks with two threads
    feats = torch.randn(C, D, H, W, generator=g, dtype=torch.float64)
    pf = torch.randn(M, D, generator=g, dtype=torch.float64)
    cam = torch.randint(0, 2, (M,), generator=g)  # camera 2 gets no pair
    row, col = torch.randint(0, H, (M,), generator=g), torch.randint(0, W, (M,), generator=g)
    if outside != "none":
        off = torch.arange(M) % 3 == 0 if outside == "some" else torch.ones(M, dtype=torch.bool)
        row = torch.where(off, torch.where(torch.arange(M) % 2 == 0, -1, H), row)
    inside = (row >= 0) & (row < H)
    seen = torch.zeros(C, H, W, dtype=torch.bool)
    seen[cam[inside], row[inside], col[inside]] = True
    xy = torch.stack([col, row], -1).double()

    def gather(f):
        return torch.ops.pyssl.sample_points(f, cam, xy, 1)

    def fused(p, f):
        return torch.ops.pyssl.distill_loss(p, f, cam, xy, None, 1, 0)[0]

    f64, p64 = feats.clone().requires_grad_(True), pf.clone().requires_grad_(True)
    pix = gather(f64)
    a, b = torch.nn.functional.normalize(pix, dim=1), torch.nn.functional.normalize(p64, dim=1)
    want = torch.autograd.grad((1 - (a * b).sum(1)).mean(), (f64, p64))
    grad_out = torch.randn(M, D, generator=g, dtype=torch.float64)
    want_x = torch.zeros(C, H, W, D, dtype=torch.float64)
    want_x.index_put_((cam[inside], row[inside], col[inside]), grad_out[inside], accumulate=True)
    for threads in (1, 2):
        with _nan_filled_empty(threads):
            f = feats.clone().requires_grad_(True)
            p = pf.clone().requires_grad_(True)
            gf, gp = torch.autograd.grad(fused(p, f), (f, p))
            (gx,) = torch.autograd.grad(gather(f), f, grad_out)
        assert not gf.isnan().any() and not gp.isnan().any()
        assert torch.equal(gf.permute(0, 2, 3, 1)[~seen], torch.zeros((~seen).sum(), D, dtype=torch.float64))
        torch.testing.assert_close(gf, want[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gp, want[1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gx, want_x.permute(0, 3, 1, 2), rtol=1e-12, atol=0)
    if outside == "none":  # the public functions are these kernels
        torch.testing.assert_close(ops.gather_pixel_features(feats, cam, row, col), gather(feats), rtol=0, atol=0)
        torch.testing.assert_close(ops.pixel_to_point_distillation_loss(pf, feats, cam, row, col),
                                   fused(pf, feats), rtol=0, atol=0)


@contextlib.contextmanager
def _nan_filled_empty(threads):
    """torch.empty (and at::empty in the kernels) NaN-filled, and `threads` CPU threads."""
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory, torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.utils.deterministic.fill_uninitialized_memory = prev[1]
        torch.set_num_threads(prev[2])


@given(N=st.integers(1, 4), D=st.sampled_from([1, 3, 64, 65, 130]), H=st.integers(1, 12),
       W=st.integers(1, 12), M=st.sampled_from([0, 1, 255, 256, 257, 600, 1500]),
       hot=st.floats(0, 0.7), outside=st.floats(0, 0.3), threads=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       grads=st.sampled_from(["both", "points", "features"]), weights=st.booleans(),
       mode=st.sampled_from(["nearest", "bilinear"]), sliced=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_planar_pair_backward_matches_channels_last_bitwise(N, D, H, W, M, hot, outside, threads, dtype,
                                                            grads, weights, mode, sliced, seed):
    """The one-pass backward of pairs on planar features (uninitialised accumulator, zeroed
    block by block; threads own pixel runs (nearest) or channel ranges (bilinear)) against the
    channels-last path (zeroed accumulator, channel slices per thread): the same bits, with every
    uninitialised allocation NaN-filled, pixel runs of a hot pixel across block and thread cuts,
    pairs outside the images (rows and columns), empty cameras, zero weights, one or both
    gradients."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(N, D, H, W, generator=g).to(dtype)
    cam = torch.randint(0, N, (M,), generator=g)
    row, col = torch.randint(0, H, (M,), generator=g), torch.randint(0, W, (M,), generator=g)
    at_hot = torch.rand(M, generator=g) < hot
    cam[at_hot], row[at_hot], col[at_hot] = N - 1, H - 1, W - 1 if seed % 2 else W // 2  # or the last pixel
    off = torch.rand(M, generator=g) < outside
    row[off & (torch.arange(M) % 2 == 0)] = -1
    col[off & (torch.arange(M) % 2 == 1)] = W
    xy = torch.stack([col, row], -1).float()
    code = 1
    if mode == "bilinear":  # off the pixel centres, also just outside the borders
        xy = xy + torch.rand(M, 2, generator=g) * 1.5 - 0.75
        code = 0
    pf = torch.randn(M, D, generator=g).to(dtype)
    w = torch.rand(M, generator=g) * (torch.rand(M, generator=g) < 0.8) if weights else None
    grad_out = torch.randn(M, D, generator=g).to(dtype)
    need_p, need_f = grads in ("both", "points"), grads in ("both", "features")
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        f = torch.empty_like(feats, memory_format=layout).copy_(feats)
        if sliced and layout == torch.contiguous_format:  # planar, strides other than the accumulator's
            f = torch.cat([f, f[:, :2]], 1)[:, :D]
        with _nan_filled_empty(threads):
            loss, stats = torch.ops.pyssl.distill_loss(pf, f, cam, xy, w, code, 0)
            gp, gf = torch.ops.pyssl.distill_loss_backward(torch.tensor(0.5), pf, f, cam, xy, w, stats, code, 0,
                                                           need_p, need_f, False)
            inside = xy.clamp(torch.zeros(2), torch.tensor([W - 1.0, H - 1.0]))  # pairs of the gather
            if mode == "nearest":
                inside = inside.round()
            gx = torch.ops.pyssl.sample_points_backward(grad_out, f, cam, inside, code, True, False, False)[0]
        results.append((loss, stats, gp, gf.contiguous(), gx.contiguous()))
    assert gf.numel() == (N * D * H * W if need_f else 0) and gp.numel() == (M * D if need_p else 0)
    for a, b in zip(*results):
        assert not a.isnan().any()
        assert torch.equal(a, b)
    if mode == "nearest":
        want = torch.zeros(N, H, W, D, dtype=torch.float64)
        want.index_put_((cam, row.clamp(0, H - 1), col.clamp(0, W - 1)), grad_out.double(), accumulate=True)
        torch.testing.assert_close(results[0][4].double(), want.permute(0, 3, 1, 2).to(dtype).double(),
                                   rtol=2e-2 if dtype != torch.float32 else 1e-4,
                                   atol=1e-2 if dtype != torch.float32 else 1e-3)


@pytest.mark.parametrize("layout", ["planar", "channels_last"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("D", [40, 70])
def test_scattered_pairs_at_scale_match_references_for_any_thread_count(layout, mode, D):
    """Sizes past the CPU kernels' blocking (more than one 2048-pair tile, channel chunks with a
    remainder): gather, its feature gradient and the fused loss against float64 references, and
    bitwise the same for 1, 2 and 3 threads."""
    g = torch.Generator().manual_seed(D)
    C, H, W, M = 3, 11, 13, 5000
    feats = torch.randn(C, D, H, W, generator=g)
    if layout == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    cam = torch.randint(0, C, (M,), generator=g)
    if mode == "nearest":
        row, col = torch.randint(0, H, (M,), generator=g), torch.randint(0, W, (M,), generator=g)
    else:
        row = torch.rand(M, generator=g) * (H + 1) - 1
        col = torch.rand(M, generator=g) * (W + 1) - 1
    pf = torch.randn(M, D, generator=g)
    grad_out = torch.randn(M, D, generator=g)

    def run():
        x = feats.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        out = ops.gather_pixel_features(x, cam, row, col, mode=mode)
        (gx,) = torch.autograd.grad(out, x, grad_out)
        y = feats.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        p = pf.clone().requires_grad_(True)
        loss = ops.pixel_to_point_distillation_loss(p, y, cam, row, col, mode=mode)
        gy, gp = torch.autograd.grad(loss, (y, p))
        return out, gx, loss, gy, gp

    results = [_with_threads(n, run) for n in (1, 2, 3)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    out, gx, loss, gy, gp = results[0]
    assert gx.stride() == feats.stride() and gy.stride() == feats.stride()
    f64 = feats.double().requires_grad_(True)
    p64 = pf.double().requires_grad_(True)
    want = reference.sample_points(f64, cam, torch.stack([col, row], -1).double(),
                                   0 if mode == "bilinear" else 1)
    if mode == "nearest":
        assert torch.equal(out, feats[cam, :, row, col])
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    (gx_want,) = torch.autograd.grad(want, f64, grad_out.double(), retain_graph=True)
    torch.testing.assert_close(gx.double(), gx_want, rtol=1e-5, atol=1e-5)
    a = torch.nn.functional.normalize(want, dim=1)
    b = torch.nn.functional.normalize(p64, dim=1)
    loss_want = (1 - (a * b).sum(1)).mean()
    torch.testing.assert_close(loss.double(), loss_want, rtol=1e-6, atol=1e-7)
    gy_want, gp_want = torch.autograd.grad(loss_want, (f64, p64))
    torch.testing.assert_close(gy.double(), gy_want, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(gp.double(), gp_want, rtol=1e-4, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_fused_distillation_loss(deterministic):
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(6, 64, 56, 100, generator=g)
    pf = torch.randn(20000, 64, generator=g)
    cam = torch.randint(0, 6, (20000,), generator=g)
    row = torch.randint(0, 56, (20000,), generator=g)
    col = torch.randint(0, 100, (20000,), generator=g)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        fc, pc = feats.cuda().requires_grad_(True), pf.cuda().requires_grad_(True)
        out = ops.pixel_to_point_distillation_loss(pc, fc, cam.cuda(), row.cuda(), col.cuda())
        out.backward()
        fr, pr = feats.clone().requires_grad_(True), pf.clone().requires_grad_(True)
        ref = ops.pixel_to_point_distillation_loss(pr, fr, cam, row, col)
        ref.backward()
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pc.grad.cpu(), pr.grad, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(fc.grad.cpu(), fr.grad, rtol=1e-4, atol=1e-8)
    finally:
        torch.use_deterministic_algorithms(False)


def _backward_args():
    feats = torch.randn(2, 3, 4, 5)
    idx = torch.tensor([0, 1, 1])
    xy = torch.tensor([[0.5, 1.0], [2.0, 3.0], [4.0, 0.0]])
    pf = torch.randn(3, 3)
    return feats, idx, xy, pf


@pytest.mark.parametrize(
    "call, match",
    [
        # Backward ops called directly (not through autograd): saved tensors of the wrong kind.
        (lambda f, i, xy, pf: torch.ops.pyssl.segment_mean_backward(
            torch.randn(3, 2), torch.tensor([0, 1, 2], dtype=torch.int32),
            torch.ones(3, dtype=torch.long)), "segment_ids"),
        (lambda f, i, xy, pf: torch.ops.pyssl.segment_mean_backward(
            torch.randn(3, 2), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.int32)), "counts"),
        (lambda f, i, xy, pf: torch.ops.pyssl.segment_mean_backward(
            torch.randn(3, 2), torch.tensor([0, 1, 2]), torch.ones(2, dtype=torch.long)), "counts"),
        (lambda f, i, xy, pf: torch.ops.pyssl.sample_points_backward(
            torch.ones(3, 3, dtype=torch.long), f, i, xy, 1, True, True, False), "grad"),
        (lambda f, i, xy, pf: torch.ops.pyssl.sample_points_backward(
            torch.ones(3, 2), f, i, xy, 1, True, True, False), "grad"),
        (lambda f, i, xy, pf: torch.ops.pyssl.distill_loss_backward(
            torch.tensor(1.0), pf, f, i, xy, None, torch.zeros(2, 3), 1, 0, True, True, False),
         "stats"),
        (lambda f, i, xy, pf: torch.ops.pyssl.distill_loss_backward(
            torch.ones(2), pf, f, i, xy, None, torch.zeros(3, 3), 1, 0, True, True, False),
         "grad_loss"),
        (lambda f, i, xy, pf: torch.ops.pyssl.distill_loss_backward(
            torch.tensor(1.0), pf, f, i, xy, None, torch.zeros(3, 3, dtype=torch.long), 1, 0,
            True, True, False), "stats"),
    ],
)
def test_backward_ops_check_their_inputs(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(*_backward_args())


def test_backward_ops_accept_their_forward_outputs():
    feats, idx, xy, pf = _backward_args()
    loss, stats = torch.ops.pyssl.distill_loss(pf, feats, idx, xy, None, 1, 0)
    gpf, gf = torch.ops.pyssl.distill_loss_backward(torch.ones(()), pf, feats, idx, xy, None,
                                                    stats, 1, 0, True, True, False)
    assert gpf.shape == pf.shape and gf.shape == feats.shape


def test_random_camera_choice_clamps_draws_outside_unit_interval():
    # torch.ops.pyssl.point_pixel_pairs called directly with draws outside [0, 1) or NaN: each
    # point still gets one of its valid cameras (0 for r <= 0 or NaN, the last for r >= 1),
    # never an unwritten output row.
    M, K = random_rig(3, 61, torch.float64)
    pts = random_points(400, 62, torch.float64)
    size = torch.tensor([480.0, 640.0], dtype=torch.float64).expand(3, 2)
    valid = ops.project_points(pts, M, K, (480, 640), rounding="round").valid  # [C, P]
    has = valid.any(0)
    draws = torch.tensor([-1.0, -1e-300, float("nan"), 1.0, 5.0, 1e300, float("inf"),
                          -float("inf")], dtype=torch.float64).repeat(50)
    point_index, camera_index, _, _ = torch.ops.pyssl.point_pixel_pairs(pts, M, K, size, None, 1.0,
                                                                        0.0, 2, 2, draws)
    assert torch.equal(point_index, torch.nonzero(has).flatten())
    cams = valid[:, has].T  # [P', C]
    first = cams.float().argmax(1)
    last = cams.shape[1] - 1 - cams.flip(1).float().argmax(1)
    d = draws[has]
    want = torch.where((d >= 1) & ~d.isnan(), last, first)
    assert torch.equal(camera_index, want)


def test_image_sides_beyond_int_range_count_as_2_to_31():
    # a size tensor is passed through unchecked; a valid pixel must still fit int64
    pts = torch.tensor([[2e19, 2e19, 2.0], [10.0, 20.0, 2.0]], dtype=torch.float64)
    M = torch.eye(4, dtype=torch.float64)[None]
    K = torch.eye(3, dtype=torch.float64)[None]
    size = torch.tensor([[1e30, 1e30]], dtype=torch.float64)
    pairs = ops.point_pixel_pairs(pts, M, K, size)
    assert pairs.point_index.tolist() == [1]
    assert (pairs.row.tolist(), pairs.col.tolist()) == ([10], [5])


def test_negative_margin_is_rejected():
    M, K = random_rig(2, 0, torch.float32)
    with pytest.raises(ValueError, match="margin"):
        ops.project_points(torch.randn(5, 3), M, K, (4, 4), margin=-1)
    size = torch.tensor([[4.0, 4.0]] * 2)
    with pytest.raises(ValueError, match="margin"):
        torch.ops.pyssl.project_points(torch.randn(5, 3), M, K, size, None, 1.0, -0.5, 0)
