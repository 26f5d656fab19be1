"""Flow correspondence + feature warping vs the grid_sample pipeline public unsupervised-flow
and dense-SSL code uses (UnFlow / ARFlow style), on the same inputs.

  * warp: pixel correspondence with the forward-backward occlusion check, then sampling of the
    target features at the matches — pyssl (flow_correspondence + sample_features) vs
    grid_sample of the backward flow, the elementwise check, grid_sample of the features.
    B in {2, 8}, 256x512, C in {3, 64, 256}, fp32 and bf16, forward and forward+backward
    (gradients to the features and the forward flow). On CUDA also pyssl's deterministic mode.
  * dense loss: dense_correspondence_loss (fused, no warped map) vs sample_features + masked
    cosine loss vs grid_sample + masked cosine loss.
  * the warp and the dense loss on channels-last maps (forward+backward, C=64 for the loss).
The CPU run here keeps B=2 and C <= 64 unless --bench-full (the full grid is minutes per
point on 2 cores).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from pyssl import ops
from pyssl.ops import reference
from pyssl.ops.reference import flow as reference_flow

from .common import PYSSL, peak_memory, run, saved_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
H, W = 256, 512


def grid_sample_pipeline(flow_fw, flow_bw, feats, alpha1=0.01, alpha2=0.5):
    B, _, h, w = flow_fw.shape
    base = reference_flow.pixel_grid(B, h, w, flow_fw.device, flow_fw.dtype)
    coords = base + flow_fw.permute(0, 2, 3, 1)
    grid = reference_flow.normalise(coords, h, w)
    with torch.no_grad():  # a boolean mask: no graph (UnFlow stops its gradient too)
        bw = F.grid_sample(flow_bw, grid, align_corners=True, padding_mode="zeros")
        lhs = ((flow_fw + bw) ** 2).sum(1)
        rhs = alpha1 * ((flow_fw ** 2).sum(1) + (bw ** 2).sum(1)) + alpha2
        x, y = coords[..., 0], coords[..., 1]
        valid = (lhs <= rhs) & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    if feats.dtype == torch.bfloat16 and feats.device.type == "cpu":
        # torch 2.14.1's CPU grid_sample segfaults on bf16 input + bf16 grid for this flow field,
        # forward (checked again 2026-11-27) and backward (benchmarks/RESULTS.md): sample in
        # fp32 as a user would have to
        warped = F.grid_sample(feats.float(), grid, align_corners=True, padding_mode="zeros").to(feats.dtype)
    else:
        warped = F.grid_sample(feats, grid.to(feats.dtype), align_corners=True, padding_mode="zeros")
    return warped, valid


def pyssl_pipeline(flow_fw, flow_bw, feats):
    coords, valid = ops.flow_correspondence(flow_fw, flow_bw)
    return ops.sample_features(feats, coords), valid


def _inputs(B, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a smooth flow field (a zoom + shear) with noise, and a consistent backward flow
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    u = 12 * xs + 4 * ys + torch.randn(B, H, W, generator=g)
    v = -6 * ys + torch.randn(B, H, W, generator=g)
    fw = torch.stack([u, v], 1)
    bw = -fw + 0.5 * torch.randn(B, 2, H, W, generator=g)
    feats = torch.randn(B, C, H, W, generator=g).to(dtype)
    return fw.to(device), bw.to(device), feats.to(device)


def _skip_large(device, B, C, full):
    if torch.device(device).type == "cpu" and (B > 2 or C > 64) and not full:
        pytest.skip("CPU run keeps B=2, C<=64 (--bench-full: all)")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("C", [3, 64, 256])
@pytest.mark.parametrize("B", [2, 8])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [PYSSL, "pyssl_deterministic", "grid_sample"])
def test_warp(benchmark, device, quick, full, dtype, C, B, mode, impl):
    _skip_large(device, B, C, full)
    if quick and (C != 64 or dtype != "fp32"):
        pytest.skip("--bench-quick")
    if impl == "pyssl_deterministic" and torch.device(device).type != "cuda":
        pytest.skip("the CPU path is always deterministic")
    fw, bw, feats = _inputs(B, C, DTYPES[dtype], device)
    fw.requires_grad_(mode == "fwd+bwd")
    feats.requires_grad_(mode == "fwd+bwd")
    pipeline = grid_sample_pipeline if impl == "grid_sample" else pyssl_pipeline

    def forward():
        return pipeline(fw, bw, feats)

    if mode == "fwd":
        fn = forward
    else:
        def fn():
            fw.grad = feats.grad = None
            warped, valid = forward()
            (warped.float().sum(1) * valid).sum().backward()
    det = impl == "pyssl_deterministic"

    def timed():
        if not det:
            return fn()
        # Deterministic mode alone would also fill every torch.empty with NaN, a cost of the
        # setting, not of pyssl's deterministic kernels: measured without it.
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            return fn()
        finally:
            torch.use_deterministic_algorithms(False)
            torch.utils.deterministic.fill_uninitialized_memory = fill
    extra = {}
    if mode == "fwd+bwd":
        extra["saved_bytes"] = saved_bytes(lambda: forward()[0], inputs=(fw, bw, feats))
        extra["peak_bytes"] = peak_memory(timed, device)
    run(benchmark, timed, device, impl=impl,
        group=f"flow warp {mode} B={B} C={C} {H}x{W} {dtype} [{device}]", **extra)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("C", [3, 24, 64])
@pytest.mark.parametrize("impl", [PYSSL, "grid_sample"])
def test_warp_channels_last(benchmark, device, quick, dtype, C, impl):
    """The warp of test_warp, forward+backward, B=2, on channels-last features (the layout of a
    channels-last network's feature maps): 3 and 24 channels are not all in 16-channel bands."""
    B = 2
    if quick and (C != 64 or dtype != "fp32"):
        pytest.skip("--bench-quick")
    fw, bw, feats = _inputs(B, C, DTYPES[dtype], device)
    feats = feats.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    fw.requires_grad_(True)
    pipeline = grid_sample_pipeline if impl == "grid_sample" else pyssl_pipeline

    def fn():
        fw.grad = feats.grad = None
        warped, valid = pipeline(fw, bw, feats)
        (warped.float().sum(1) * valid).sum().backward()
    run(benchmark, fn, device, impl=impl,
        group=f"flow warp fwd+bwd channels-last B={B} C={C} {H}x{W} {dtype} [{device}]",
        peak_bytes=peak_memory(fn, device))


def _cosine(online, warped, valid):
    per = 1 - (F.normalize(online, dim=1) * F.normalize(warped.to(online.dtype), dim=1)).sum(1)
    w = valid.to(per.dtype)
    return (per * w).sum() / w.sum().clamp(min=1)


def _grid_sample_then_loss(online, target, coords, valid):
    if target.dtype == torch.bfloat16 and target.device.type == "cpu":
        # torch's CPU grid_sample segfaults on bf16 here (grid_sample_pipeline): in float32
        warped = reference.sample_features(target.float(), coords).to(target.dtype)
    else:
        warped = reference.sample_features(target, coords)
    return _cosine(online, warped, valid)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("C", [64, 256])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", [PYSSL, "pyssl_sample_then_loss", "grid_sample_then_loss"])
def test_dense_loss(benchmark, device, quick, full, dtype, C, layout, impl):
    """channels_last: online and target maps channels-last, C=64 only."""
    B = 2
    _skip_large(device, B, C, full)
    if quick and (C != 64 or dtype != "fp32" or layout != "nchw"):
        pytest.skip("--bench-quick")
    if layout == "channels_last" and C != 64:
        pytest.skip("channels-last maps: C=64 only")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    fw, bw, target = _inputs(B, C, DTYPES[dtype], device)
    coords, valid = ops.flow_correspondence(fw, bw)
    online = torch.randn(B, C, H, W, device=device).to(DTYPES[dtype]).contiguous(memory_format=fmt)
    online.requires_grad_(True)
    target = target.contiguous(memory_format=fmt).requires_grad_(True)
    if impl == PYSSL:
        def forward():
            return ops.dense_correspondence_loss(online, target, coords, valid)
    elif impl == "pyssl_sample_then_loss":
        def forward():
            return _cosine(online, ops.sample_features(target, coords), valid)
    else:
        def forward():
            return _grid_sample_then_loss(online, target, coords, valid)

    def fn():
        online.grad = target.grad = None
        forward().backward()
    run(benchmark, fn, device, impl=impl,
        group=f"dense correspondence loss fwd+bwd{' channels-last' if layout != 'nchw' else ''} "
              f"B={B} C={C} {H}x{W} {dtype} [{device}]",
        saved_bytes=saved_bytes(forward, inputs=(online, target, coords, valid)),
        peak_bytes=peak_memory(fn, device))
