"""Optical-flow correspondence ops against grid_sample references, a synthetic occlusion with a
known answer, and real stereo data with ground-truth disparity (Middlebury motorcycle)."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyssl import ops
from pyssl.ops import reference


@st.composite
def flows(draw, max_b=3, max_hw=12):
    B = draw(st.integers(0, max_b))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.3, 2.0, 6.0]))
    fw = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) * scale
    noise = draw(st.sampled_from([0.0, 0.2, 3.0]))
    bw = -fw + torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) * noise
    if draw(st.booleans()) and B:
        fw[0, 0, 0, 0] = math.nan
    return fw, bw


@given(f=flows(), use_bw=st.booleans(), alpha=st.sampled_from([(0.01, 0.5), (0.1, 0.0)]))
def test_flow_correspondence_matches_reference(f, use_bw, alpha):
    fw, bw = f
    got = ops.flow_correspondence(fw, bw if use_bw else None, alpha1=alpha[0], alpha2=alpha[1])
    want = reference.flow_correspondence(fw, bw if use_bw else None, *alpha)
    torch.testing.assert_close(got.coords, want[0], rtol=1e-12, atol=1e-12, equal_nan=True)
    # valid may only differ where the check is within rounding error of its threshold
    if use_bw:
        warped = reference.sample_features(bw, torch.nan_to_num(want[0]))
        lhs = ((fw + warped) ** 2).sum(1)
        rhs = alpha[0] * ((fw ** 2).sum(1) + (warped ** 2).sum(1)) + alpha[1]
        near = (lhs - rhs).abs() < 1e-9
        assert torch.equal(got.valid[~near], want[1][~near])
    else:
        assert torch.equal(got.valid, want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flow_correspondence_reduced_precision(dtype):
    g = torch.Generator().manual_seed(1)
    fw = (torch.randn(2, 2, 30, 40, generator=g) * 4).to(dtype)
    bw = (-fw.float() + torch.randn(2, 2, 30, 40, generator=g) * 0.3).to(dtype)
    got = ops.flow_correspondence(fw, bw)
    want = reference.flow_correspondence(fw.float(), bw.float())
    assert got.coords.dtype == torch.float32
    torch.testing.assert_close(got.coords, want[0])
    assert (got.valid == want[1]).float().mean() > 0.995


def test_non_finite_flow_is_invalid_not_a_crash():
    fw = torch.zeros(1, 2, 4, 5)
    fw[0, 0, 1, 1] = math.nan
    fw[0, 1, 2, 2] = math.inf
    bw = torch.zeros(1, 2, 4, 5)
    bw[0, :, 3, 3] = math.nan
    c, v = ops.flow_correspondence(fw, bw)
    assert not v[0, 1, 1] and not v[0, 2, 2] and not v[0, 3, 3]
    assert v.sum() == 20 - 3


def test_forward_backward_check_flags_exactly_the_occluded_region():
    # static background; a 10x10 square moves right by k pixels between the frames
    H, W, k = 40, 60, 4
    top, left = 12, 20
    fw = torch.zeros(1, 2, H, W, dtype=torch.float64)
    fw[0, 0, top:top + 10, left:left + 10] = k
    bw = torch.zeros(1, 2, H, W, dtype=torch.float64)
    bw[0, 0, top:top + 10, left + k:left + k + 10] = -k
    occluded = torch.zeros(H, W, dtype=torch.bool)
    occluded[top:top + 10, left + 10:left + 10 + k] = True  # background covered in frame 2
    _, valid = ops.flow_correspondence(fw, bw)
    assert torch.equal(~valid[0], occluded)
    # without the backward flow nothing is flagged: every target is inside the frame
    assert ops.flow_correspondence(fw).valid.all()


@given(B=st.integers(1, 3), C=st.integers(1, 9), H=st.integers(1, 9), W=st.integers(1, 9),
       Ho=st.integers(1, 6), Wo=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       channels_last=st.booleans())
def test_sample_features_equals_grid_sample(B, C, H, W, Ho, Wo, seed, channels_last):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    feats.requires_grad_(True)
    coords = (torch.rand(B, Ho, Wo, 2, generator=g, dtype=torch.float64) *
              torch.tensor([W + 2.0, H + 2.0], dtype=torch.float64) - 1.5).requires_grad_(True)
    out = ops.sample_features(feats, coords)
    if H > 1 and W > 1:
        want = reference.sample_features(feats, coords)
    else:  # grid_sample maps every coordinate of a size-1 axis onto its single pixel
        want = reference.sample_points(feats, None, coords.reshape(-1, 2)).view(B, Ho, Wo, C).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, want)
    gr = torch.randn(B, C, Ho, Wo, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad(out, (feats, coords), gr)
    g2 = torch.autograd.grad(want, (feats, coords), gr)
    torch.testing.assert_close(g1[0], g2[0])
    torch.testing.assert_close(g1[1], g2[1])


@given(B=st.integers(1, 3), C=st.integers(1, 9), H=st.integers(1, 9), W=st.integers(1, 9),
       Ho=st.integers(1, 20), Wo=st.integers(1, 20), seed=st.integers(0, 2**31 - 1),
       inside=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_cpu_fast_path_equals_the_generic_kernel(B, C, H, W, Ho, Wo, seed, inside, dtype):
    # up to 400 points per image: 8-point vector blocks, their tails and several 256-point blocks;
    # `inside`: every corner inside the image (8-point blocks take the paired gathers)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, H, W, generator=g).to(dtype)
    coords = torch.rand(B, Ho, Wo, 2, generator=g) * torch.tensor([W + 2.0, H + 2.0]) - 1.5
    if inside:
        coords = torch.rand(B, Ho, Wo, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
        coords = coords.clamp(max=torch.tensor([max(W - 1.001, 0.0), max(H - 1.001, 0.0)]))
    if seed % 7 == 0:
        coords[0, 0, 0] = torch.tensor([math.nan, 1.0])
        feats[0, :, 0, 0] = math.inf  # only read by points that actually touch pixel (0, 0)
    f1, c1 = feats.clone().requires_grad_(True), coords.clone().requires_grad_(True)
    fast = torch.ops.pyssl.sample_features_dense(f1, c1)
    f2, c2 = feats.clone().requires_grad_(True), coords.clone().requires_grad_(True)
    generic = ops.sample_points(f2, c2.reshape(-1, 2)).view(B, Ho, Wo, C).permute(0, 3, 1, 2)
    assert fast.dtype == dtype and torch.equal(fast, generic)   # same products, same order
    gr = torch.randn(B, C, Ho, Wo, generator=g).to(dtype)
    g1 = torch.autograd.grad(fast, (f1, c1), gr)
    g2 = torch.autograd.grad(generic, (f2, c2), gr)
    tol = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(g1[0], g2[0], equal_nan=True, **tol)
    torch.testing.assert_close(g1[1], g2[1], equal_nan=True)
    assert ops.sample_features(feats, coords).is_contiguous()  # the fast path is what users get


@pytest.mark.parametrize("C", [3, 20])  # planar, and band + planar remainder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_backward_reads_strided_output_gradients_without_a_copy(C, dtype):
    # the gradient of a sum over channels is expanded (channel stride 0), one over the batch
    # has batch stride 0; a transposed one is not points-contiguous: all equal the dense result
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, C, 12, 14, generator=g).to(dtype)
    coords = torch.rand(2, 9, 30, 2, generator=g) * torch.tensor([15.0, 13.0]) - 1.0
    bk = torch.ops.pyssl.sample_features_dense_backward
    for grad in (torch.randn(2, 1, 9, 30, generator=g).expand(2, C, 9, 30),
                 torch.randn(1, C, 9, 30, generator=g).expand(2, C, 9, 30),
                 torch.randn(2, C, 30, 9, generator=g).transpose(2, 3)):
        got = bk(grad, feats, coords, True, True)
        want = bk(grad.contiguous(), feats, coords, True, True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _generic_sample(features, coords):
    B, Ho, Wo, _ = coords.shape
    return ops.sample_points(features, coords.reshape(-1, 2)).view(B, Ho, Wo, -1).permute(0, 3, 1, 2)


def _check_fast_path(feats, coords, g, coord_tol=1e-4):
    """The dense fast path against the generic kernel: the same forward bit for bit, gradients
    close (feature gradients up to the order of their sums; bf16 within bf16 rounding). Returns
    the output gradient used."""
    f1, c1 = feats.clone().requires_grad_(True), coords.clone().requires_grad_(True)
    fast = torch.ops.pyssl.sample_features_dense(f1, c1)
    f2, c2 = feats.clone().requires_grad_(True), coords.clone().requires_grad_(True)
    generic = _generic_sample(f2, c2)
    assert fast.dtype == feats.dtype and torch.equal(fast, generic)  # same products, same order
    gr = torch.randn(fast.shape, generator=g).to(feats.dtype)
    g1 = torch.autograd.grad(fast, (f1, c1), gr)
    g2 = torch.autograd.grad(generic, (f2, c2), gr)
    tol = {} if feats.dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    # the feature gradient has the features' layout: NCHW or channels-last
    cl = not feats.is_contiguous() and feats.is_contiguous(memory_format=torch.channels_last)
    assert g1[0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(g1[0], g2[0], equal_nan=True, **tol)
    torch.testing.assert_close(g1[1], g2[1], equal_nan=True, rtol=coord_tol, atol=coord_tol)
    return gr


def _smooth_coords(B, Ho, Wo, H, W, g, noise):
    """A zoom + shear + noise flow field in pixels: the points of a block read a narrow band of
    source rows (the channels-last band path), or anywhere when the noise is large."""
    ys, xs = torch.meshgrid(torch.linspace(0, H - 1, Ho), torch.linspace(0, W - 1, Wo), indexing="ij")
    base = torch.stack([xs * 0.9 + 0.2 * ys + 1.3, ys * 1.05 - 0.7], -1)
    return base + torch.randn(B, Ho, Wo, 2, generator=g) * noise


@given(B=st.integers(1, 2), C=st.one_of(st.integers(16, 40), st.sampled_from([16, 32, 48])),
       H=st.integers(1, 40), W=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       noise=st.sampled_from([0.0, 1.0, 30.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       channels_last=st.booleans())
def test_band_path_equals_the_generic_kernel(B, C, H, W, seed, noise, dtype, channels_last):
    """C >= 16: 16-channel slices through the channels-last band kernels (csrc/cpu/sample_band.cpp),
    the remaining channels planar; float32 and bfloat16. Channels-last features with a multiple of
    16 channels are read in place, others transposed to NCHW; their gradient is channels-last."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, H, W, generator=g).to(dtype)
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    coords = _smooth_coords(B, H + 3, W + 2, H, W, g, noise)
    if seed % 5 == 0:
        coords[0, 0, 0] = torch.tensor([math.nan, 1.0])
        coords[-1, -1, -1] = torch.tensor([1e30, -1e30])
    _check_fast_path(feats, coords, g, coord_tol=1e-4 * C)


def test_band_path_rows_leaving_and_reentering_the_ring_and_tall_bands():
    """Blocks of 256 points that read rows 0-5, then rows 64-69 (the same ring slots: rows 0-5
    are flushed), then rows 0-5 again; and blocks whose band is taller than the ring (planar
    fallback). Feature gradients accumulate over all of them."""
    g = torch.Generator().manual_seed(11)
    for C, fmt in ((20, torch.contiguous_format), (32, torch.channels_last), (32, torch.contiguous_format)):
        for dtype in (torch.float32, torch.bfloat16):
            _ring_and_tall_bands(C, fmt, g, dtype)


def _ring_and_tall_bands(C, fmt, g, dtype):
    """(bfloat16: the features and output gradient rounded to bfloat16, the reference in float64
    on the same values; with 16k channels the kernels read the bfloat16 gradient as it is, also
    in the planar fallback)"""
    H, W = 140, 300
    feats = torch.randn(1, C, H, W, generator=g).to(dtype).double()
    x = torch.rand(4, 256, generator=g) * (W - 1)
    y = torch.stack([torch.rand(256, generator=g) * 5, 64 + torch.rand(256, generator=g) * 5,
                     torch.rand(256, generator=g) * 5, torch.rand(256, generator=g) * (H - 1)])
    coords = torch.stack([x, y], -1)[None]  # [1, 4, 256, 2]: one block per row
    f1 = feats.to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    c1 = coords.clone().requires_grad_(True)
    out = ops.sample_features(f1, c1)
    assert out.is_contiguous()  # the dense kernels' output, whatever the features' layout
    f2 = feats.clone().requires_grad_(True)
    c2 = coords.double().requires_grad_(True)
    want = reference.sample_features(f2, c2)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    gr = torch.randn(want.shape, generator=g).to(dtype)
    g1 = torch.autograd.grad(out, (f1, c1), gr)
    g2 = torch.autograd.grad(want, (f2, c2), gr.double())
    assert g1[0].is_contiguous(memory_format=fmt) and g1[0].dtype == dtype
    torch.testing.assert_close(g1[0].double(), g2[0], **tol)
    torch.testing.assert_close(g1[1].double(), g2[1], rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 1e-3)


@given(B=st.integers(1, 2), C=st.sampled_from([3, 4]), H=st.integers(1, 6),
       W=st.sampled_from([1, 5, 13, 16, 256, 257, 512]), seed=st.integers(0, 2**31 - 1),
       noise=st.sampled_from([0.0, 1.0, 30.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_quad_path_equals_the_generic_kernel(B, C, H, W, seed, noise, dtype):
    """3 or 4 channels: the image interleaved per pixel (csrc/cpu/sample_dense.h, quad kernels),
    its rows padded where they would be a multiple of 4 KiB apart (W = 256, 512)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, H, W, generator=g).to(dtype)
    coords = _smooth_coords(B, H + 2, min(W, 40) + 3, H, W, g, noise)
    if seed % 5 == 0:
        coords[0, 0, 0] = torch.tensor([math.nan, 1.0])
        coords[-1, -1, -1] = torch.tensor([1e30, -1e30])
        feats[0, :, 0, 0] = math.inf  # only read by points that actually touch pixel (0, 0)
    gr = _check_fast_path(feats, coords, g, coord_tol=1e-4 * C)
    # a bfloat16 output gradient is read as it is (no float32 copy): the same result
    bk = torch.ops.pyssl.sample_features_dense_backward
    half = bk(gr.bfloat16(), feats, coords, True, True)
    wide = bk(gr.bfloat16().float(), feats, coords, True, True)
    for a, b in zip(half, wide):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("C", [1, 3, 20])  # planar, quad, band + planar remainder
def test_coordinate_gradient_is_planar_and_the_flow_gradient_needs_no_copy(C):
    g = torch.Generator().manual_seed(5)
    fw = torch.randn(2, 2, 9, 16, generator=g) * 3
    bw = -fw + 0.1 * torch.randn(2, 2, 9, 16, generator=g)
    feats = torch.randn(2, C, 9, 16, generator=g)
    coords, valid = ops.flow_correspondence(fw, bw)
    gc = torch.ops.pyssl.sample_features_dense_backward(torch.randn(2, C, 9, 16, generator=g), feats,
                                                        coords, False, True)[1]
    assert gc.shape == (2, 9, 16, 2) and gc.permute(0, 3, 1, 2).is_contiguous()
    torch.library.opcheck(torch.ops.pyssl.sample_features_dense_backward.default,
                          (torch.randn(2, C, 9, 16, generator=g), feats, coords, True, True))
    f1, x1 = fw.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    c1, v1 = ops.flow_correspondence(f1, bw)
    (ops.sample_features(x1, c1).sum(1) * v1).sum().backward()
    f2, x2 = fw.double().requires_grad_(True), feats.double().requires_grad_(True)
    c2, v2 = reference.flow_correspondence(f2, bw.double(), 0.01, 0.5)
    (reference.sample_features(x2, c2).sum(1) * v1).sum().backward()
    assert f1.grad.is_contiguous()  # stored as it came: the planar coordinate gradient
    torch.testing.assert_close(f1.grad.double(), f2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-5, atol=1e-5)


def test_quad_scratch_shared_by_threads_gives_the_same_results():
    """The interleaved images and accumulators come from pools lent to one caller at a time;
    concurrent callers get their own buffers, and no call sees what another left in them."""
    import threading

    g = torch.Generator().manual_seed(8)
    cases = []
    for shape in ((2, 3, 20, 33), (1, 4, 7, 256), (3, 3, 31, 17)):
        B, C, H, W = shape
        feats = torch.randn(*shape, generator=g)
        coords = torch.rand(B, H, W, 2, generator=g) * torch.tensor([W + 2.0, H + 2.0]) - 1.5
        grad = torch.randn(B, C, H, W, generator=g)
        cases.append((feats, coords, grad))
    bk = torch.ops.pyssl.sample_features_dense_backward

    def run(case):
        feats, coords, grad = case
        return torch.ops.pyssl.sample_features_dense(feats, coords), *bk(grad, feats, coords, True, True)

    want = [run(c) for c in cases]
    errors = []

    def worker(k):
        try:
            for i in range(30):
                got = run(cases[(k + i) % len(cases)])
                for a, b in zip(got, want[(k + i) % len(cases)]):
                    assert torch.equal(a, b)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def _banded_coords(B, Ho, Wo, H, W, order, g):
    """Output rows in bands of 4; band k reads source rows near 4 * order[k] (a band of -1 is
    NaN: reads nothing). The quad kernels pack (forward) and zero and unpack (backward) source
    rows lazily, as blocks of points first reach them: out-of-order, revisited and never-read
    rows must all give the generic kernel's results."""
    ys = torch.empty(B, Ho, Wo)
    for i in range(Ho):
        k = order[(i // 4) % len(order)]
        ys[:, i] = math.nan if k < 0 else 4.0 * k + (i % 4) + torch.rand(B, Wo, generator=g) * 1.5 - 0.5
    xs = torch.linspace(-1.2, W + 0.2, Wo).expand(B, Ho, Wo) + torch.randn(B, Ho, Wo, generator=g) * 0.5
    return torch.stack([xs, ys], -1).clamp(min=-3, max=max(H, W) + 3).nan_to_num(nan=math.nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_quad_rows_packed_and_unpacked_lazily_in_any_order(dtype, threads):
    g = torch.Generator().manual_seed(21)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # bands read rows 39-45, 0-5, 19-25, nothing, 0-5 again, 55-61, 7-13, 39-45 again; rows
        # 14-18, 26-38 and 46-54 never; 64 output columns: a 256-point block is one band
        order = [10, 0, 5, -1, 0, 14, 2, 10]
        for seed in range(3):  # later calls reuse the pooled buffers the earlier ones filled
            B, C, H, W = (1, 3, 64, 50) if seed != 1 else (2, 4, 64, 50)
            feats = (torch.randn(B, C, H, W, generator=g) * (seed + 1)).to(dtype)
            coords = _banded_coords(B, 4 * len(order) * 2, 64, H, W, order, g)
            gr = _check_fast_path(feats, coords, g, coord_tol=1e-4 * C)
            gf = torch.ops.pyssl.sample_features_dense_backward(gr, feats, coords, True, False)[0]
            for r0, r1 in ((14, 19), (26, 39), (46, 55)):  # never read: zero, whatever the pool held
                assert (gf[:, :, r0:r1] == 0).all()
            assert (gf[:, :, 40:45] != 0).any() and (gf[:, :, 8:13] != 0).any()
    finally:
        torch.set_num_threads(prev)


def test_quad_image_beyond_the_pool_keep_limit():
    # 4 x 2050 x 2100 floats of interleaved image exceed what the scratch pools keep (64 MiB):
    # such calls get buffers of their own, freed after
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(1, 3, 2050, 2100, generator=g)
    coords = torch.rand(1, 16, 40, 2, generator=g) * torch.tensor([2101.0, 2051.0]) - 1.0
    for _ in range(2):  # the second call must not see the first one's accumulator
        _check_fast_path(feats, coords, g)


def test_flow_check_reads_no_neighbour_with_weight_zero():
    # integer targets (zero or whole-pixel flow): three of the four corners have weight 0, and a
    # NaN there must not poison the check; half-pixel targets read all four corners
    for shift, touched in ((0.0, [(2, 7)]), (1.0, [(1, 6)]), (0.5, [(1, 6), (1, 7), (2, 6), (2, 7)])):
        fw = torch.full((1, 2, 6, 20), shift)
        bw = torch.full((1, 2, 6, 20), -shift)  # consistent everywhere but at the NaN
        bw[0, :, 2, 7] = math.nan
        valid = ops.flow_correspondence(fw, bw).valid[0]
        inside = ops.flow_correspondence(fw).valid[0]
        expect = inside.clone()
        for i, j in touched:
            expect[i, j] = False
        assert torch.equal(valid, expect), shift


def test_float32_flow_fast_path_matches_the_float64_kernel():
    g = torch.Generator().manual_seed(12)
    fw = torch.randn(2, 2, 37, 53, generator=g, dtype=torch.float64) * 6
    bw = -fw + torch.randn(2, 2, 37, 53, generator=g, dtype=torch.float64) * 0.4
    fw[0, 0, 3, 4] = math.nan
    fw[1, 1, 5, 9] = math.inf    # non-finite flow: invalid, in the vector and the scalar code
    fw[1, 0, 6, 50] = -math.inf
    bw[1, :, 10, 10] = math.nan  # read with weight 0 or not at all unless a target lands on it
    for with_bw in (True, False):
        got = ops.flow_correspondence(fw.float(), bw.float() if with_bw else None)
        want = ops.flow_correspondence(fw.float().double(), bw.float().double() if with_bw else None)
        assert got.coords.dtype == torch.float32
        torch.testing.assert_close(got.coords.double(), want.coords, equal_nan=True, rtol=0, atol=1e-5)
        agree = (got.valid == want.valid).float().mean().item()
        assert agree > 0.999 if with_bw else agree == 1.0
        assert not got.valid[0, 3, 4] and not got.valid[1, 5, 9] and not got.valid[1, 6, 50]


def _flow_match_float32(fw, bw, alpha1, alpha2):
    """valid of kernels/flow_math.h (flow_match) in float32, one rounded torch op per kernel op
    in the kernel's order (no fused multiply-add): the CPU kernels' result bit for bit."""
    B, _, H, W = fw.shape
    u, v = fw[:, 0], fw[:, 1]
    x = torch.arange(W, dtype=torch.float32) + u
    y = torch.arange(H, dtype=torch.float32)[:, None] + v
    inside = ((u - u) == 0) & ((v - v) == 0) & (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    near = (x > -2) & (x < W + 1) & (y > -2) & (y < H + 1)
    xs, ys = torch.where(near, x, 0.0), torch.where(near, y, 0.0)
    ax, ay = xs - xs.floor(), ys - ys.floor()
    x0, y0 = xs.floor().long(), ys.floor().long()
    bu, bv = torch.zeros_like(u), torch.zeros_like(v)
    for dx, dy, w in ((0, 0, (1 - ax) * (1 - ay)), (1, 0, ax * (1 - ay)), (0, 1, (1 - ax) * ay), (1, 1, ax * ay)):
        cx, cy = x0 + dx, y0 + dy
        read = near & (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H) & (w != 0)  # weight 0: not read
        at = (cy.clamp(0, H - 1) * W + cx.clamp(0, W - 1)).reshape(B, -1)
        su = bw[:, 0].reshape(B, -1).gather(1, at).view(B, H, W)
        sv = bw[:, 1].reshape(B, -1).gather(1, at).view(B, H, W)
        bu = bu + torch.where(read, w * su, 0.0)
        bv = bv + torch.where(read, w * sv, 0.0)
    du, dv = u + bu, v + bv
    lhs = du * du + dv * dv
    rhs = alpha1 * (((u * u + v * v) + bu * bu) + bv * bv) + alpha2
    return inside & (lhs <= rhs)


@given(B=st.integers(1, 2), H=st.integers(1, 12), W=st.integers(1, 70),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.4, 3.0, 20.0]),
       noise=st.sampled_from([0.0, 0.3, 1.0]))
def test_float32_flow_check_equals_its_arithmetic_bit_for_bit(B, H, W, seed, scale, noise):
    """The vector kernels (8 targets at a time; all corners inside: weighted sums over 8 lanes)
    and their scalar tails against flow_match's float32 arithmetic, bit for bit. With the
    backward flow about -F plus noise many pixels sit near the decision boundary: a wrong corner
    or weight, or a sampled flow off by 1e-4 px, flips some of them (checked by breaking the
    kernel); a different rounding order (one ulp) flips a random pixel too rarely to be seen."""
    g = torch.Generator().manual_seed(seed)
    fw = torch.randn(B, 2, H, W, generator=g) * scale
    bw = -fw + torch.randn(B, 2, H, W, generator=g) * noise
    for a1, a2 in ((0.01, 0.5), (0.05, 0.01), (0.0, 1e-6)):
        got = ops.flow_correspondence(fw, bw, alpha1=a1, alpha2=a2).valid
        assert torch.equal(got, _flow_match_float32(fw, bw, a1, a2)), (a1, a2)


def test_float32_flow_check_at_the_boundary_of_large_interior_blocks():
    # a near-constant flow and its inverse plus noise: large blocks of targets with all corners
    # inside (the 8-lane path), the check failing for about half of them
    g = torch.Generator().manual_seed(2)
    fw = torch.tensor([2.3, -1.6]).view(1, 2, 1, 1) + torch.randn(2, 2, 40, 96, generator=g) * 0.05
    bw = torch.tensor([-2.3, 1.6]).view(1, 2, 1, 1) + torch.randn(2, 2, 40, 96, generator=g) * 0.3
    for a1, a2 in ((0.01, 0.05), (0.0, 0.08)):
        want = _flow_match_float32(fw, bw, a1, a2)
        assert 0.2 < want.float().mean() < 0.95  # both outcomes, many near the boundary
        assert torch.equal(ops.flow_correspondence(fw, bw, alpha1=a1, alpha2=a2).valid, want)


def test_sample_features_gradcheck_and_determinism():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    coords = (torch.rand(2, 3, 4, 2, generator=g, dtype=torch.float64) * torch.tensor([4.6, 3.6], dtype=torch.float64)
              + 0.2).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.sample_features, (feats, coords))
    torch.library.opcheck(torch.ops.pyssl.sample_features_dense.default, (feats.float(), coords.float()))
    big = torch.randn(4, 16, 32, 48, generator=g)
    c = torch.rand(4, 32, 48, 2, generator=g) * torch.tensor([47.0, 31.0])
    grads = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            x, cc = big.clone().requires_grad_(True), c.clone().requires_grad_(True)
            ops.sample_features(x, cc).sum().backward()
            grads.append((x.grad, cc.grad))
        finally:
            torch.set_num_threads(prev)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # 16 channels and more: the band kernels (and the remaining channel planar)
    torch.library.opcheck(torch.ops.pyssl.sample_features_dense.default,
                          (torch.randn(1, 17, 6, 9, generator=g), torch.rand(1, 5, 4, 2, generator=g) * 6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flow_ops_in_half_precision_match_the_float64_reference(dtype):
    """fp16 / bf16 inputs of the ops that the float32 and float64 tests do not reach: affine
    correspondence (float32 math on the rounded theta), sample_features and the dense loss
    (float32 accumulation) against float64 references on the same rounded inputs."""
    g = torch.Generator().manual_seed(11)
    theta = (torch.randn(2, 2, 3, generator=g) * 0.5).to(dtype)
    got = ops.affine_correspondence(theta, (20, 30), (7, 9))
    want = reference.affine_correspondence(theta.double(), (20, 30), (7, 9))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    feats = torch.randn(2, 20, 9, 11, generator=g).to(dtype).requires_grad_(True)
    coords = (torch.rand(2, 6, 7, 2, generator=g) * torch.tensor([12.0, 10.0]) - 1).requires_grad_(True)
    out = ops.sample_features(feats, coords)
    f64, c64 = feats.detach().double().requires_grad_(True), coords.detach().double().requires_grad_(True)
    ref = reference.sample_features(f64, c64)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    gout = torch.randn(out.shape, generator=g)
    gf, gc = torch.autograd.grad(out, (feats, coords), gout.to(dtype))
    rf, rc = torch.autograd.grad(ref, (f64, c64), gout.to(dtype).double())
    torch.testing.assert_close(gf.double(), rf, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(gc.double(), rc, rtol=tol, atol=tol * float(rc.abs().max()))
    online = torch.randn(2, 20, 6, 7, generator=g).to(dtype).requires_grad_(True)
    valid = torch.rand(2, 6, 7, generator=g) > 0.3
    loss = ops.dense_correspondence_loss(online, feats, coords.detach(), valid)
    o64 = online.detach().double().requires_grad_(True)
    f64 = feats.detach().double().requires_grad_(True)
    rloss = reference.dense_correspondence_loss(o64, f64, coords.detach().double(), valid)
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-4, atol=1e-5)
    go, gt = torch.autograd.grad(loss, (online, feats))
    ro, rt = torch.autograd.grad(rloss, (o64, f64))
    for a, b in ((go, ro), (gt, rt)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * float(b.abs().max()))


def test_affine_correspondence_compiles_as_eager():
    g = torch.Generator().manual_seed(12)
    theta = torch.randn(3, 2, 3, generator=g, requires_grad=True)

    def step(t):
        return ops.affine_correspondence(t, (20, 30), (7, 9)).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(theta), step(theta))
    torch.testing.assert_close(torch.autograd.grad(compiled(theta), theta)[0],
                               torch.autograd.grad(step(theta), theta)[0])


def test_affine_correspondence_and_crop_views():
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ops.affine_correspondence(theta, (20, 30), (7, 9)),
                               reference.affine_correspondence(theta, (20, 30), (7, 9)))
    theta.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.affine_correspondence(t, (20, 30), (7, 9)), (theta,))
    # a crop + horizontal flip made with affine_grid: sampling the source at the coordinates
    # reproduces the view exactly, and integer crops equal plain slicing
    img = torch.randn(2, 3, 40, 50, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[5.0, 8.0, 24.0, 27.0], [10.0, 0.0, 49.0, 39.0]], dtype=torch.float64)
    flip = torch.tensor([True, False])
    th = ops.crop_theta(boxes, (40, 50), flip)
    view = torch.nn.functional.grid_sample(
        img, torch.nn.functional.affine_grid(th, (2, 3, 20, 40), align_corners=True), align_corners=True)
    coords = ops.affine_correspondence(th, (40, 50), (20, 40))
    torch.testing.assert_close(ops.sample_features(img, coords), view)
    # box 0 spans 20 source pixels onto 40 output pixels, flipped: every other output pixel is a
    # source pixel, in reverse column order
    torch.testing.assert_close(view[0][:, ::19, ::39], img[0, :, 8:28:19, 5:25:19].flip(-1))
    th1 = ops.crop_theta(torch.tensor([[5.0, 8.0, 24.0, 27.0]], dtype=torch.float64), (40, 50))
    v1 = torch.nn.functional.grid_sample(
        img[:1], torch.nn.functional.affine_grid(th1, (1, 3, 20, 20), align_corners=True), align_corners=True)
    torch.testing.assert_close(v1[0], img[0, :, 8:28, 5:25])


@given(B=st.integers(1, 3), C=st.integers(1, 12), H=st.integers(1, 7), W=st.integers(1, 7),
       seed=st.integers(0, 2**31 - 1), loss=st.sampled_from(["cosine", "l2_normalized"]),
       channels_last=st.booleans())
def test_dense_correspondence_loss_matches_sample_then_loss(B, C, H, W, seed, loss, channels_last):
    g = torch.Generator().manual_seed(seed)
    online = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    if channels_last:
        online = online.contiguous(memory_format=torch.channels_last)
    online.requires_grad_(True)
    target = torch.randn(B, C, H + 2, W + 1, generator=g, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(B, H, W, 2, generator=g, dtype=torch.float64) * torch.tensor([W + 1.0, H + 2.0], dtype=torch.float64) - 0.5
    valid = torch.rand(B, H, W, generator=g) > 0.3
    got = ops.dense_correspondence_loss(online, target, coords, valid, loss=loss)
    want = reference.dense_correspondence_loss(online, target, coords, valid, loss)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(got, (online, target))
    g2 = torch.autograd.grad(want, (online, target))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def _dense_loss_inputs(B, C, H, W, Ht, Wt, dtype, layout, seed, special, online_dtype=None,
                       target_layout="nchw"):
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":  # a channel slice of a wider map: not contiguous
        online = torch.randn(B, C + 3, H, W, generator=g)[:, 1:C + 1]
    else:
        online = torch.randn(B, C, H, W, generator=g)
        if layout == "channels_last":
            online = online.contiguous(memory_format=torch.channels_last)
    online = online.to(online_dtype or dtype)
    target = torch.randn(B, C, Ht, Wt, generator=g).to(dtype)
    if target_layout == "channels_last":
        target = target.contiguous(memory_format=torch.channels_last)
    coords = torch.rand(B, H, W, 2, generator=g) * torch.tensor([Wt + 3.0, Ht + 3.0]) - 1.5
    if special:  # on the last row / column, far away, non-finite
        flat = coords.view(-1, 2)
        pick = torch.randperm(flat.shape[0], generator=g)[:6]
        values = [(Wt - 1.0, Ht - 1.0), (0.0, Ht - 1.0), (1e9, 2.0), (-3e7, -1e8),
                  (math.nan, 1.0), (math.inf, -math.inf)]
        for i, v in zip(pick.tolist(), values):
            flat[i] = torch.tensor(v)
    return online, target, coords


def _far_if_not_finite(coords):
    """The ops' contract: non-finite coordinates sample nothing, as far ones do (grid_sample's
    NaN handling is not that contract)."""
    return torch.where(torch.isfinite(coords).all(-1, keepdim=True), coords, torch.full_like(coords, -10.0))


@given(B=st.integers(1, 2), C=st.sampled_from([1, 3, 15, 16, 17, 33]), H=st.integers(1, 8),
       W=st.integers(1, 11), dh=st.integers(-2, 4), dw=st.integers(-2, 4),
       seed=st.integers(0, 2**31 - 1), loss=st.sampled_from(["cosine", "l2_normalized"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       online_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       layout=st.sampled_from(["nchw", "channels_last", "sliced"]),
       target_layout=st.sampled_from(["nchw", "channels_last"]),
       weighted=st.booleans(), special=st.booleans())
def test_dense_loss_fast_path_matches_the_float64_reference(B, C, H, W, dh, dw, seed, loss, dtype,
                                                            online_dtype, layout, target_layout,
                                                            weighted, special):
    """float32 / bfloat16 maps (target: dtype, online: online_dtype) take the CPU's dense-loss
    kernels (16-channel band slices, planar rest, bfloat16 read and written as it is): against
    the float64 reference on the same (rounded) inputs."""
    # targets of 2+ rows and columns: grid_sample (the reference) with align_corners=True maps
    # every coordinate of a size-1 axis to its one pixel, where the ops' pixel units do not
    Ht, Wt = max(2, H + dh), max(2, W + dw)
    online, target, coords = _dense_loss_inputs(B, C, H, W, Ht, Wt, dtype, layout, seed, special,
                                                online_dtype, target_layout)
    g = torch.Generator().manual_seed(seed + 1)
    if weighted:  # float weights, some exactly 0
        valid = torch.rand(B, H, W, generator=g) * (torch.rand(B, H, W, generator=g) > 0.3)
    else:
        valid = torch.rand(B, H, W, generator=g) > 0.3
    assert torch.ops.pyssl.dense_loss_kernels(online, target, None, coords.reshape(-1, 2), 0)
    online.requires_grad_(True)
    target.requires_grad_(True)
    got = ops.dense_correspondence_loss(online, target, coords, valid, loss=loss)
    go, gt = torch.autograd.grad(got, (online, target))
    assert got.dtype == torch.float32 and go.dtype == online_dtype and gt.dtype == dtype
    assert gt.stride() == target.stride() or Ht * Wt == 1  # the target map's layout
    # the online map's layout (a sliced map's gradient is contiguous, as torch.empty_like's)
    assert go.stride() == (online.stride() if layout != "sliced" else online.contiguous().stride())
    o64 = online.detach().double().requires_grad_(True)
    t64 = target.detach().double().requires_grad_(True)
    want = reference.dense_correspondence_loss(o64, t64, _far_if_not_finite(coords.double()),
                                               valid.double(), loss)
    wo, wt = torch.autograd.grad(want, (o64, t64))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # A pixel's gradient is a difference of terms of size w / (sum w * |v|) (|v|: its online or
    # sampled norm), which can cancel (exactly, with one channel): float32 errors scale with them.
    warped = reference.sample_features(t64.detach(), _far_if_not_finite(coords.double()))
    norms = torch.minimum(o64.detach().norm(dim=1), warped.norm(dim=1))
    w = valid.double()
    terms = torch.where((w > 0) & (norms > 1e-12), w / (w.sum() * norms), torch.zeros_like(w))
    bound = terms.max().item() if w.sum() > 0 else 0.0
    for a, b in ((go, wo), (gt, wt)):
        atol = 1e-5 * (bound + b.abs().max().item()) + 1e-12
        # float32 math; a bfloat16 gradient is rounded to bfloat16 once
        torch.testing.assert_close(a.double(), b, rtol=1e-4 if a.dtype == torch.float32 else 2 ** -7, atol=atol)


_GENERIC_CASES = ((2, 37, 9, 13, 11, 12), (1, 16, 300, 8, 300, 8), (1, 5, 6, 7, 6, 7),
                  (1, 32, 40, 50, 42, 52), (1, 16, 40, 2100, 40, 2100))


def _generic_case(case, dtype, online_dtype, g, target_layout="nchw"):
    B, C, H, W, Ht, Wt = case
    online, target, coords = _dense_loss_inputs(B, C, H, W, Ht, Wt, dtype, "nchw", 7, True, online_dtype,
                                                target_layout)
    if H == 300:  # every block of 256 points reads rows all over the image
        coords[..., 1] = torch.rand(B, H, W, generator=g) * (Ht - 1)
    if W == 2100:  # a smooth flow over wide rows: the ring holds 15 rows, reused and evicted
        coords = _smooth_coords(B, H, W, Ht, Wt, g, 1.5).float()
    return online, target, coords


@pytest.mark.parametrize("case", _GENERIC_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype,online_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("target_layout", ["nchw", "channels_last"])
def test_dense_loss_fast_path_equals_the_generic_pair_path(case, dtype, online_dtype, target_layout):
    """The dense kernels against the generic pair path of the same op (point features as [M, D]
    rows): the same values to rounding, with zero-weight pairs (which add nothing), no weights,
    one gradient at a time, non-finite target features, pairs in tall bands of rows (the band
    kernels' planar fallback) and a ring of rows reused and evicted; targets NCHW and
    channels-last (read in place, gradient in the same layout)."""
    g = torch.Generator().manual_seed(3)
    online, target, coords = _generic_case(case, dtype, online_dtype, g, target_layout)
    B, C, H, W = online.shape
    xy = coords.reshape(-1, 2)
    rows = online.permute(0, 2, 3, 1).reshape(-1, C)
    assert torch.ops.pyssl.dense_loss_kernels(online, target, None, xy, 0)
    assert not torch.ops.pyssl.dense_loss_kernels(rows, target, None, xy, 0)
    bf16 = torch.bfloat16 in (dtype, online_dtype)
    tol = dict(rtol=2 ** -7, atol=1e-4) if bf16 else dict(rtol=1e-5, atol=1e-7)
    weight_draws = [torch.rand(B * H * W, generator=g) * (torch.rand(B * H * W, generator=g) > 0.3), None]
    for loss, weights, need in ((0, weight_draws[0], (True, True)), (1, weight_draws[0], (True, True)),
                                (0, None, (True, False)), (1, weight_draws[0], (False, True))):
        outs = []
        for pf in (online, rows):  # the dense map: fast path; [M, D] rows: the generic path
            pf = pf.detach().requires_grad_(need[0])
            t = target.detach().requires_grad_(need[1])
            value = torch.ops.pyssl.distill_loss(pf, t, None, xy, weights, 0, loss)[0]
            grads = torch.autograd.grad(value, [x for x, n in zip((pf, t), need) if n])
            if need[0]:
                gp = grads[0]
                grads = (gp.reshape(B, H, W, C) if gp.dim() == 2 else gp.permute(0, 2, 3, 1), *grads[1:])
            outs.append((value, *grads))
        for a, b in zip(*outs):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), **tol)
        if need[1]:
            assert outs[0][-1].stride() == target.stride()
    # Non-finite target features: the same NaN and inf pattern as the generic path
    bad = target.detach().clone()  # (keeps the layout)
    bad[0, :, 1, 2] = math.nan
    bad[-1, 0, -1, -1] = math.inf
    outs = []
    for pf in (online, rows):
        pf = pf.detach().requires_grad_(True)
        t = bad.clone().requires_grad_(True)
        value, stats = torch.ops.pyssl.distill_loss(pf, t, None, xy, weight_draws[0], 0, 0)
        gp, gt = torch.autograd.grad(value, (pf, t))
        outs.append((stats, gp.reshape(B, H, W, C) if gp.dim() == 2 else gp.permute(0, 2, 3, 1), gt))
    for a, b in zip(*outs):  # stats hold dot products, which cancel: an absolute tolerance
        torch.testing.assert_close(a.float(), b.float(), equal_nan=True, **(tol if bf16 else dict(rtol=1e-5, atol=1e-5)))


@pytest.mark.parametrize("case", _GENERIC_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16])
def test_dense_loss_reads_a_channels_last_online_map_in_place(case, online_dtype):
    """A channels-last online map is read (and its gradient written) in place by the dense
    kernels, with the arithmetic of the NCHW map: equal bits for the loss and both gradients,
    over 16-channel slices and a planar rest, tall bands (the planar fallback) and a ring of rows
    reused and evicted."""
    g = torch.Generator().manual_seed(5)
    for dtype, target_layout in ((torch.float32, "nchw"), (torch.bfloat16, "channels_last")):
        online, target, coords = _generic_case(case, dtype, online_dtype, g, target_layout)
        valid = torch.rand(coords.shape[:3], generator=g) * (torch.rand(coords.shape[:3], generator=g) > 0.3)
        results = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            o = online.contiguous(memory_format=fmt).requires_grad_(True)
            assert torch.ops.pyssl.dense_loss_kernels(o, target, None, coords.reshape(-1, 2), 0)
            t = target.detach().requires_grad_(True)
            value = ops.dense_correspondence_loss(o, t, coords, valid)
            go, gt = torch.autograd.grad(value, (o, t))
            assert go.is_contiguous(memory_format=fmt) and gt.stride() == target.stride()
            results.append((value, go, gt))
        for a, b in zip(*results):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_loss_fast_path_does_not_depend_on_the_thread_count(dtype):
    """Including the forward's split of each task's points across threads (also with a
    channels-last online map), and a ring of rows that evicts (16 channels on 40 rows of 2100
    pixels)."""
    g = torch.Generator().manual_seed(2)
    online, target, coords = _generic_case(_GENERIC_CASES[-1], dtype, dtype, g)  # one task: chunks
    cases = [_dense_loss_inputs(2, 37, 24, 31, 26, 30, dtype, "nchw", 11, True),
             _dense_loss_inputs(2, 37, 24, 31, 26, 30, dtype, "channels_last", 12, True),
             (online, target, coords),
             (online.contiguous(memory_format=torch.channels_last), target, coords),
             _generic_case(_GENERIC_CASES[-1], dtype, dtype, g, "channels_last")]
    threads = torch.get_num_threads()
    try:
        for online, target, coords in cases:
            valid = torch.rand(coords.shape[:3], generator=g) > 0.2
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                o = online.detach().requires_grad_(True)
                t = target.detach().requires_grad_(True)
                value = ops.dense_correspondence_loss(o, t, coords, valid)
                results.append((value, *torch.autograd.grad(value, (o, t))))
            for r in results[1:]:
                for a, b in zip(r, results[0]):
                    assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def test_dense_loss_with_no_valid_pixel_is_zero_with_zero_gradients():
    online = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = ops.dense_correspondence_loss(online, target, torch.zeros(1, 4, 4, 2), torch.zeros(1, 4, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and online.grad.abs().sum() == 0 and target.grad.abs().sum() == 0


def test_opcheck_gradcheck_compile():
    g = torch.Generator().manual_seed(5)
    fw = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bw = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pyssl.flow_correspondence.default, (fw, bw, 0.01, 0.5))
    torch.library.opcheck(torch.ops.pyssl.flow_correspondence.default, (fw.float(), None, 0.01, 0.5))
    theta = torch.randn(2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssl.affine_correspondence.default, (theta, 6, 7, 3, 4))
    assert torch.autograd.gradcheck(lambda f: ops.flow_correspondence(f, bw).coords, (fw,))
    online = torch.randn(2, 8, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 8, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    xy = (torch.rand(60, 2, generator=g, dtype=torch.float64) * 4)
    torch.library.opcheck(torch.ops.pyssl.distill_loss.default, (online, target, None, xy, torch.rand(60, dtype=torch.float64), 0, 0))
    assert torch.autograd.gradcheck(
        lambda o, t: ops.dense_correspondence_loss(o, t, ops.flow_correspondence(fw.detach() * 0.3).coords,
                                                   torch.ones(2, 5, 6, dtype=torch.bool)), (online, target))

    def step(online, target, flow_fw, flow_bw):
        coords, valid = ops.flow_correspondence(flow_fw, flow_bw)
        return ops.dense_correspondence_loss(online, target, coords, valid)

    args = (online.float(), target.float(), fw.detach().float() * 0.3, -fw.detach().float() * 0.3)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(*args), step(*args))


@pytest.mark.parametrize("C", [2, 3, 8, 24, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_features_on_channels_last_maps_not_all_in_bands(C, dtype):
    """Channels-last features whose channels are not all in 16-channel bands take the dense
    kernels through an NCHW transposition: the NCHW map's bits, an NCHW output and a
    channels-last feature gradient, also without a coordinate gradient (then backward reads no
    features and transposes nothing). Forward only, float32 maps with more than 16 channels take
    the pair kernels (a channels-last view out), with the same bits."""
    g = torch.Generator().manual_seed(C)
    feats = torch.randn(2, C, 37, 61, generator=g).to(dtype)  # 2257 pixels: 3 transposed blocks
    feats[0, :, 4, 7] = math.inf  # read by the points that touch pixel (4, 7) only
    # a negative NaN with a payload: the transposition moves its bits (the coordinate gradient,
    # float32, carries them from the features on)
    ints = torch.int16 if dtype == torch.bfloat16 else torch.int32
    feats.view(ints)[1, :, 20, 30] = -63 if dtype == torch.bfloat16 else -4194303  # 0xFFC1, 0xFFC00001
    coords = _smooth_coords(2, 31, 53, 37, 61, g, 2.0).float()
    grad = torch.randn(2, C, 31, 53, generator=g).to(dtype)
    outs, grads = [], {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        for need_c in (True, False):
            f = feats.contiguous(memory_format=fmt).requires_grad_(True)
            c = coords.clone().requires_grad_(need_c)
            out = ops.sample_features(f, c)
            assert out.is_contiguous()
            got = torch.autograd.grad(out, (f, c) if need_c else (f,), grad)
            assert got[0].is_contiguous(memory_format=fmt)
            outs.append(out)
            grads[fmt, need_c] = got
        with torch.no_grad():
            out = ops.sample_features(feats.contiguous(memory_format=fmt), coords)
        pair = fmt == torch.channels_last and dtype == torch.float32 and C > 16
        assert out.is_contiguous() != pair
        outs.append(out)

    def bits(t):
        return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)

    for out in outs[1:]:  # the dense kernels on both layouts: equal bits
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(bits(outs[3]), bits(outs[0]))
    for need_c in (True, False):
        for a, b in zip(grads[torch.contiguous_format, need_c], grads[torch.channels_last, need_c]):
            assert torch.equal(bits(a), bits(b))
    assert torch.equal(bits(grads[torch.channels_last, True][0]), bits(grads[torch.channels_last, False][0]))
    assert grads[torch.channels_last, True][1].isnan().any()  # the NaN reached the gradient


def test_channels_last_routing_compiles_as_eager():
    """A float32 channels-last map of 24 channels takes the pair kernels forward only and the
    dense kernels when a gradient is needed (_dense_sampling): torch.compile(fullgraph=True)
    takes the same route as eager in both cases (the same values and strides)."""
    g = torch.Generator().manual_seed(9)
    f = torch.randn(2, 24, 9, 10, generator=g).contiguous(memory_format=torch.channels_last)
    coords = torch.rand(2, 6, 5, 2, generator=g) * 10 - 0.5
    compiled = torch.compile(ops.sample_features, fullgraph=True)
    with torch.no_grad():
        a, b = ops.sample_features(f, coords), compiled(f, coords)
    assert torch.equal(a, b) and a.stride() == b.stride() and not a.is_contiguous()
    x, y = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
    a, b = ops.sample_features(x, coords), compiled(y, coords)
    assert torch.equal(a, b) and a.stride() == b.stride() and a.is_contiguous()
    ga, gb = torch.autograd.grad(a.square().sum(), x)[0], torch.autograd.grad(b.square().sum(), y)[0]
    torch.testing.assert_close(ga, gb)
    assert ga.stride() == gb.stride() and ga.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_maps_opcheck_and_compile():
    """Channels-last features (sample_features, 16 and 32 channels: the band kernels read them in
    place) and channels-last targets (dense_correspondence_loss): opcheck, and a compiled
    forward+backward equal to eager."""
    g = torch.Generator().manual_seed(8)
    cl = torch.channels_last
    for C in (16, 32):
        f = torch.randn(2, C, 6, 7, generator=g).contiguous(memory_format=cl).requires_grad_(True)
        coords = (torch.rand(2, 5, 4, 2, generator=g) * 7 - 0.5).requires_grad_(True)
        torch.library.opcheck(torch.ops.pyssl.sample_features_dense.default, (f, coords))
        out = torch.ops.pyssl.sample_features_dense(f, coords)
        for flags in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(torch.ops.pyssl.sample_features_dense_backward.default,
                                  (torch.randn_like(out), f.detach(), coords.detach(), *flags))

    def step(feats, coords, online, target, valid):
        warped = ops.sample_features(feats, coords)
        # the fused loss gives coords no gradient (and refuses one that requires it)
        return warped.square().mean() + ops.dense_correspondence_loss(online, target, coords.detach(), valid)

    feats = torch.randn(2, 32, 9, 10, generator=g).contiguous(memory_format=cl)
    online = torch.randn(2, 32, 6, 5, generator=g)
    target = torch.randn(2, 32, 9, 10, generator=g).contiguous(memory_format=cl)
    coords = torch.rand(2, 6, 5, 2, generator=g) * 10 - 0.5
    valid = torch.rand(2, 6, 5, generator=g) > 0.2
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        args = [t.detach().clone().requires_grad_(True) for t in (feats, coords, online, target)]
        value = fn(*args, valid)
        results.append((value, *torch.autograd.grad(value, args)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert a.stride() == b.stride()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_sample_features_band_path_does_not_depend_on_the_thread_count(fmt):
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 32, 40, 2100, generator=g).contiguous(memory_format=fmt)  # a 15-row ring
    coords = _smooth_coords(2, 40, 2100, 40, 2100, g, 1.5)
    gr = torch.randn(2, 32, 40, 2100, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            f = feats.detach().requires_grad_(True)
            c = coords.detach().requires_grad_(True)
            out = ops.sample_features(f, c)
            results.append((out, *torch.autograd.grad(out, (f, c), gr)))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sample_features_without_channels_has_zero_coordinate_gradient(dtype):
    # C = 0 runs no task in the CPU kernel: the coordinate gradient must still be written (zeros).
    for _ in range(3):
        f = torch.randn(2, 0, 16, 16, dtype=dtype, requires_grad=True)
        c = (torch.rand(2, 64, 64, 2) * 15).requires_grad_(True)
        out = ops.sample_features(f, c)
        assert out.shape == (2, 0, 64, 64)
        out.sum().backward()
        assert torch.equal(c.grad, torch.zeros_like(c))
        assert f.grad.shape == f.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("C", [1, 5, 16, 17])  # planar, quad, band, band + planar rest
@pytest.mark.parametrize("hw", [(0, 6), (5, 0), (0, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sample_features_on_an_empty_map_is_zero(dtype, C, hw, channels_last):
    """A map with no pixels (H or W = 0): every point is outside, so the output, the coordinate
    gradient and the dense loss's target samples are zero. The CPU dense kernels read the empty
    map's storage (a segmentation fault) for channel counts outside the band slices."""
    f = torch.randn(2, C, *hw).to(dtype)
    if channels_last:
        f = f.contiguous(memory_format=torch.channels_last)
    f.requires_grad_(True)
    c = (torch.rand(2, 3, 4, 2) * 5).to(torch.float64 if dtype == torch.float64 else torch.float32)
    c.requires_grad_(True)
    out = ops.sample_features(f, c)
    assert out.shape == (2, C, 3, 4) and torch.equal(out, torch.zeros_like(out))
    out.float().sum().backward()
    assert f.grad.shape == f.shape
    assert torch.equal(c.grad, torch.zeros_like(c))
    online = torch.randn(2, C, 3, 4).to(dtype)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    for loss in ("cosine", "l2_normalized"):
        value = ops.dense_correspondence_loss(online, f.detach(), c.detach(), valid, loss=loss)
        assert value.item() == 1.0  # a zero target: cosine similarity 0; |a - 0|^2 = 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.flow_correspondence(torch.randn(1, 3, 4, 4)), "flow_fw"),
        (lambda: ops.flow_correspondence(torch.randn(2, 4, 4)), "flow_fw"),
        (lambda: ops.flow_correspondence(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 5)), "flow_bw"),
        (lambda: ops.flow_correspondence(torch.randn(1, 2, 4, 4).long()), "flow_fw"),
        (lambda: ops.sample_features(torch.randn(2, 3, 4, 4), torch.randn(3, 4, 4, 2)), "coords"),
        (lambda: ops.sample_features(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 3)), "coords"),
        (lambda: ops.affine_correspondence(torch.randn(2, 3, 3), (4, 4), (4, 4)), "theta"),
        (lambda: ops.affine_correspondence(torch.randn(2, 2, 3), (0, 4), (4, 4)), "size_in"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, 2), torch.ones(1, 4, 4)), "target"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 5, 2), torch.ones(1, 4, 4)), "coords"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, 2), torch.ones(1, 4, 4), loss="l1"), "loss"),
        (lambda: ops.sample_features(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, 2, dtype=torch.long)), "coords"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, 2, dtype=torch.long), torch.ones(1, 4, 4)), "coords"),
        (lambda: ops.affine_correspondence(torch.randn(2, 2, 3), (5.7, 6), (4, 4)), "size_in"),
        (lambda: ops.crop_theta(torch.rand(3, 4), (8, 8), torch.tensor([True])), "flip"),
        (lambda: ops.crop_theta(torch.rand(3, 4), (8, 8), torch.tensor([1, 0, 1])), "flip"),
        (lambda: ops.crop_theta(torch.rand(3, 4), (8, 8), torch.ones(3, dtype=torch.bool, device="meta")), "flip is a meta tensor"),
        (lambda: ops.sample_features(torch.randn(2, 3, 4, 4).long(), torch.zeros(2, 4, 4, 2)), "features must be float32"),
        (lambda: torch.ops.pyssl.sample_features_dense_backward(torch.ones(1, 2, 3, 3, dtype=torch.long), torch.randn(1, 2, 4, 4), torch.rand(1, 3, 3, 2), True, True), "grad must have dtype"),
        (lambda: ops.sample_features(torch.randn(2, 3, 4, 4).double(), torch.zeros(2, 4, 4, 2, device="meta")), "coords must be on features's device"),
        (lambda: ops.dense_correspondence_loss(torch.ones(1, 3, 4, 4, dtype=torch.long), torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, 2), torch.ones(1, 4, 4)), "online must be float32"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.ones(1, 3, 4, 4, dtype=torch.int32), torch.zeros(1, 4, 4, 2), torch.ones(1, 4, 4)), "target must be float32"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, 2), torch.ones(1, 4, 4, device="meta")), "valid must be on online's device"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, 2), torch.ones(1, 4, 4, dtype=torch.long)), "valid must be bool"),
        (lambda: ops.flow_correspondence(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4, device="meta")), "flow_bw"),
        (lambda: ops.flow_correspondence(torch.randn(1, 2, 4, 4), alpha1=-0.01), "alpha1"),
        (lambda: ops.flow_correspondence(torch.randn(1, 2, 4, 4), alpha2=math.nan), "alpha2"),
        (lambda: ops.flow_correspondence(torch.randn(1, 2, 4, 4), alpha2=math.inf), "alpha2"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4),
                                               torch.zeros(1, 4, 4, 2, requires_grad=True), torch.ones(1, 4, 4)),
         "coords requires grad"),
        (lambda: ops.dense_correspondence_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4),
                                               torch.zeros(1, 4, 4, 2), torch.ones(1, 4, 4, requires_grad=True)),
         "valid requires grad"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


# --------------------------------------------------------------------------------------------
# Real data: Middlebury 2014 motorcycle (scikit-image), flow left -> right is u = -disparity
# --------------------------------------------------------------------------------------------


def _motorcycle():
    data = pytest.importorskip("skimage.data")
    left, right, disp = data.stereo_motorcycle()
    to_t = lambda im: torch.tensor(im, dtype=torch.float32).permute(2, 0, 1)[None] / 255  # noqa: E731
    return to_t(left), to_t(right), torch.tensor(disp, dtype=torch.float32)


def test_real_stereo_flow_warps_right_image_onto_left():
    left, right, disp = _motorcycle()
    H, W = disp.shape
    fw = torch.zeros(1, 2, H, W)
    fw[0, 0] = -disp  # inf disparity -> non-finite flow -> invalid
    coords, valid = ops.flow_correspondence(fw)
    warped = ops.sample_features(right, coords)
    err_warp = (warped - left).abs().mean(1)[0][valid[0]].mean().item()
    err_none = (right - left).abs().mean(1)[0][valid[0]].mean().item()
    print(f"motorcycle photometric error on {valid.float().mean():.1%} valid pixels: "
          f"warped {err_warp:.4f} vs no warp {err_none:.4f}")
    assert err_warp < 0.4 * err_none
    assert not valid[0][~torch.isfinite(disp)].any()


def test_real_stereo_pixels_without_a_match_are_flagged_by_the_backward_check():
    _, _, disp = _motorcycle()
    H, W = disp.shape
    finite = torch.isfinite(disp)
    # Backward flow right -> left by z-buffered splatting of the left pixels that have a match
    # (nearest disparity wins); right pixels nobody lands on get no flow (NaN).
    rows, cols = torch.nonzero(finite, as_tuple=True)
    d = disp[rows, cols]
    x = cols - d
    # each left pixel lands between two right pixels: splat to both so the map has no holes
    rows, d, target = rows.repeat(2), d.repeat(2), torch.cat([torch.floor(x), torch.ceil(x)]).long()
    inside = (target >= 0) & (target < W)
    rows, d, target = rows[inside], d[inside], target[inside]
    zbuf = torch.full((H * W,), -math.inf).scatter_reduce(0, rows * W + target, d, "amax")  # nearest wins
    bw = torch.zeros(1, 2, H, W)
    bw[0, 0] = torch.where(torch.isfinite(zbuf), zbuf, torch.full_like(zbuf, math.nan)).view(H, W)
    # Forward flow with the holes filled as a flow method would (nearest valid disparity to the
    # right on the same row): wrong for occluded pixels, which have no true match.
    filled = disp.clone()
    for c in range(W - 2, -1, -1):
        hole = ~torch.isfinite(filled[:, c])
        filled[hole, c] = filled[hole, c + 1]
    fw = torch.zeros(1, 2, H, W)
    fw[0, 0] = -torch.nan_to_num(filled, nan=0.0, posinf=0.0)
    coords, valid = ops.flow_correspondence(fw, bw)
    inside_t = (coords[0, ..., 0] >= 0) & (coords[0, ..., 0] <= W - 1)
    no_match = ~finite & inside_t
    match = finite & inside_t
    flagged = (~valid[0][no_match]).float().mean().item()
    kept = valid[0][match].float().mean().item()
    print(f"backward check: {flagged:.1%} of unmatched pixels flagged, {kept:.1%} of matched kept")
    assert no_match.sum() > 1000
    # Middlebury leaves some visible pixels without ground truth too, so not every one of them
    # is an occlusion the check can see
    assert flagged > 0.75 and kept > 0.9


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_flow_ops_match_cpu(dtype):
    g = torch.Generator().manual_seed(7)
    fw = (torch.randn(2, 2, 64, 96, generator=g) * 5).to(dtype)
    bw = (-fw.float() + torch.randn(2, 2, 64, 96, generator=g) * 0.3).to(dtype)
    a = ops.flow_correspondence(fw, bw)
    b = ops.flow_correspondence(fw.cuda(), bw.cuda())
    torch.testing.assert_close(b.coords.cpu(), a.coords)
    assert (b.valid.cpu() == a.valid).float().mean() > 0.999
    feats = torch.randn(2, 32, 64, 96, generator=g).to(dtype)
    for det in (False, True):
        torch.use_deterministic_algorithms(det, warn_only=True)
        try:
            fc = feats.cuda().requires_grad_(True)
            cc = a.coords.cuda().requires_grad_(True)
            out = ops.sample_features(fc, cc)
            out.float().sum().backward()
            fr = feats.clone().requires_grad_(True)
            cr = a.coords.clone().requires_grad_(True)
            ref = ops.sample_features(fr, cr)
            ref.float().sum().backward()
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(fc.grad.cpu().float(), fr.grad.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(cc.grad.cpu().float(), cr.grad.float(), rtol=tol, atol=tol * 10)
            online = torch.randn(2, 32, 64, 96, generator=g).to(dtype)
            oc = online.cuda().requires_grad_(True)
            tc = feats.cuda().requires_grad_(True)
            l1 = ops.dense_correspondence_loss(oc, tc, cc.detach(), b.valid)
            l1.backward()
            orr = online.clone().requires_grad_(True)
            tr = feats.clone().requires_grad_(True)
            l2 = ops.dense_correspondence_loss(orr, tr, a.coords, b.valid.cpu())
            l2.backward()
            torch.testing.assert_close(l1.cpu(), l2, rtol=1e-4, atol=1e-5)
            # gradients, with the invalid pixels' zero-weight pairs skipped on both devices
            for got, want in ((oc.grad, orr.grad), (tc.grad, tr.grad)):
                scale = float(want.abs().max())
                torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol,
                                           atol=tol * scale)
        finally:
            torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("D", [3, 16, 40, 77])
def test_cuda_sample_points_tiles_match_cpu(dtype, layout, D):
    """NCHW-like maps with 16 channels or more take the tiled CUDA forward (32 points x 32
    channels per block; csrc/kernels/sampling.cu): partial tiles in points (M = 1001) and
    channels, points outside the map, an image index, both modes, row strides other than
    W * column stride; and the atomic backward and the (likewise tiled) xy gradient on the same
    maps."""
    g = torch.Generator().manual_seed(D)
    N, H, W, M = 3, 13, 29, 1001
    f = torch.randn(N, D, H, W, generator=g).to(dtype)
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other row: the row stride is 2 W (sliced on each device)
        f = torch.randn(N, D, 2 * H, W, generator=g).to(dtype)
    on_device = (lambda t: t.cuda()[:, :, ::2]) if layout == "strided" else (lambda t: t.cuda())
    on_cpu = (lambda t: t[:, :, ::2]) if layout == "strided" else (lambda t: t)
    xy = torch.rand(M, 2, generator=g) * torch.tensor([W + 3.0, H + 3.0]) - 2
    idx = torch.randint(0, N, (M,), generator=g)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for mode in ("bilinear", "nearest"):
        for image_index in (idx, None):
            n_pts = M if image_index is not None else (M // N) * N
            fc = f.cuda().requires_grad_(True)
            fd = on_device(fc)
            assert layout != "strided" or fd.stride(2) == 2 * W
            xyc = xy[:n_pts].cuda().requires_grad_(True)
            out = ops.sample_points(fd, xyc, None if image_index is None else idx.cuda(), mode=mode)
            grad = torch.randn(out.shape, generator=g).to(dtype)
            out.backward(grad.cuda())
            fr = f.clone().requires_grad_(True)
            xyr = xy[:n_pts].clone().requires_grad_(True)
            ref = ops.sample_points(on_cpu(fr), xyr, image_index, mode=mode)
            ref.backward(grad)
            torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(fc.grad.cpu().float(), fr.grad.float(), rtol=tol,
                                       atol=tol * 4)
            # the xy gradient (tiled on NCHW-like maps with D >= 16): sums over D channels
            torch.testing.assert_close(xyc.grad.cpu(), xyr.grad, rtol=tol * 10,
                                       atol=tol * 10 * (float(xyr.grad.abs().max()) + 1))

