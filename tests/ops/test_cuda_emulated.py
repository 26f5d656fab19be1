"""pyssl's CUDA code paths, run on the CPU by the CUDA emulator (tests/cuda_emu), against the
CPU ops.

`torch.ops.pyssl_emu.<op>` on CPU tensors is the CUDA implementation of `torch.ops.pyssl.<op>`:
the glue of csrc/ops/<family>_cuda.cpp (checks, workspaces, sorts, launch configurations) and
the kernels of csrc/kernels/<family>.cu, each CUDA thread a fiber, with real __syncthreads and
warp-shuffle rendezvous. So the CUDA code's indexing and reductions are checked here, on every
CI run, not only in the rare sessions with a GPU; tests/ops/test_<family>.py's `cuda` tests
repeat the comparisons on a real device (with its __expf and FMA contraction, which the
emulator does not model; see cuda_emu.h).

The emulated library is built on first use (about a minute on 2 cores) into
~/.cache/pyssl/cuda_emu_<key> (PYSSL_EMU_BUILD overrides); it needs the CUDA toolkit's
headers, which CI has (it builds the CUDA kernels with nvcc).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyssl  # noqa: F401  (registers torch.ops.pyssl)
from pyssl.ops.projection import _image_size_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cuda_emu"))
import build as emu_build  # noqa: E402

from .test_dino_loss import special_logit_inputs  # noqa: E402
from .test_projection import random_points, random_rig  # noqa: E402

CPU = torch.ops.pyssl

pytestmark = pytest.mark.skipif(emu_build.cuda_include() is None,
                                reason="the CUDA emulator needs the CUDA toolkit's headers")


@pytest.fixture(scope="module")
def emu():
    return emu_build.load()


def _close(got, want, tol, scale=1.0):
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, equal_nan=True)


# --------------------------------------------------------------------------------------------
# The emulator's own rewrite
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("PYSSL_EMU_ASAN", "") not in ("", "0"),
                    reason="this run is the AddressSanitizer run")
def test_emulated_cuda_code_under_address_sanitizer():
    """Every test of this file again, in a process with AddressSanitizer: the emulated CUDA code
    built with -fsanitize=address (heap and globals), so a kernel that reads or writes past a
    tensor's end, or past its shared memory, fails here as compute-sanitizer's memcheck would
    fail it on a GPU. (First run: about 1.5 minutes to build; then about 35 s.)"""
    asan = emu_build.asan_runtime()
    if asan is None:
        pytest.skip("g++ has no AddressSanitizer runtime")
    stdcxx = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True,
                            text=True).stdout.strip()
    env = dict(os.environ, PYSSL_EMU_ASAN="1", ASAN_OPTIONS="detect_leaks=0",
               # libstdc++ too: ASan's __cxa_throw interceptor needs it loaded at start-up
               LD_PRELOAD=f"{asan} {stdcxx}")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x",
                           "-p", "no:cacheprovider", "-k", "not address_sanitizer"],
                          env=env, capture_output=True, text=True, timeout=1200,
                          cwd=Path(__file__).resolve().parents[2])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "AddressSanitizer" not in out, out[-6000:]
    assert " passed" in out


def test_rewrite_turns_launches_and_shared_memory_into_calls():
    src = ("extern __shared__ __align__(16) unsigned char smem[];\n"
           "k<T, 2><<<grid, kThreads, 0, stream>>>(a, b);\n"
           "s<F, acc_t<F>, Add><<<g, 256>>>(x, Add{2.0});\n"
           "noargs<<<dim3(1, 2),\n 32>>>();\n"
           "  __shared__ double a[8], b[2][kN + 1];\n")
    out = emu_build.rewrite_kernels(src)
    assert ("__shared__ double a[8], b[2][kN + 1]; ::emu::shared_fill(a, sizeof(a));"
            " ::emu::shared_fill(b, sizeof(b));") in out
    assert "::emu::launch(::emu::Cfg(grid, kThreads, 0, stream), k<T, 2>, a, b);" in out
    assert "::emu::launch(::emu::Cfg(dim3(1, 2), 32), noargs);" in out
    assert "::emu::launch(::emu::Cfg(g, 256), s<F, acc_t<F>, Add>, x, Add{2.0});" in out
    assert "unsigned char* smem = reinterpret_cast<unsigned char*>(::emu::dynamic_smem());" in out
    assert "<<<" not in out and out.startswith('#include "cuda_emu.h"')


# --------------------------------------------------------------------------------------------
# DINO loss (csrc/kernels/dino_loss.cu)
# --------------------------------------------------------------------------------------------


def _dino_both(emu, s, t, c, w, T, skip, grad=1.3):
    args = (T, 0.1, 0.04, skip)
    got = emu.dino_loss(s, t, c, w, *args)
    want = CPU.dino_loss(s, t, c, w, *args)
    g = torch.tensor(grad)
    ggot = emu.dino_loss_backward(g, s, t, c, w, got[2], got[3], *args)
    gwant = CPU.dino_loss_backward(g, s, t, c, w, want[2], want[3], *args)
    return got, want, ggot, gwant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("K", [1, 17, 255, 256, 257, 4096, 4097])
@pytest.mark.parametrize("crops", [(2, 12, True), (1, 1, False), (2, 2, False), (3, 5, True)])
def test_dino_loss_matches_cpu(emu, dtype, K, crops):
    """Forward statistics per warp chunk of 256 prototypes (partial chunks at K = 17, 255, 257,
    4097), the merge, the teacher mean and the backward (with 4-element vector loads where
    K % 4 == 0: K = 256, 4096); bitwise repeatable."""
    T, S, skip = crops
    B = 5
    g = torch.Generator().manual_seed(K * 10 + T)
    s = (torch.randn(S * B, K, generator=g) * 3).to(dtype)
    t = (torch.randn(T * B, K, generator=g) * 3).to(dtype)
    c = torch.randn(K, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 0.1
    got, want, ggot, gwant = _dino_both(emu, s, t, c, None, T, skip)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(got, want):
        _close(a, b, tol)
    gtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    _close(ggot, gwant, gtol, float(gwant.abs().max()) + 1e-6)
    again = emu.dino_loss(s, t, c, None, T, 0.1, 0.04, skip)
    assert all(torch.equal(a, b) for a, b in zip(again, got))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("misaligned", ["student", "teacher", "none"])
def test_dino_loss_vector_and_strided_paths(emu, dtype, misaligned):
    """K % 4 == 0: aligned rows take the vector loads and stores (the emulator checks every
    vector address's alignment), rows starting one element off their storage take the strided
    layout; both match the CPU."""
    T, S, B, K = 2, 4, 3, 1024
    g = torch.Generator().manual_seed(5)

    def rows(n, off):
        return torch.randn(n * K + off, generator=g).to(dtype)[off:].view(n, K)
    s = rows(S * B, int(misaligned == "student"))
    t = rows(T * B, int(misaligned == "teacher"))
    assert (s.data_ptr() % 16 != 0) == (misaligned == "student")
    c = torch.randn(K, generator=g) * 0.1
    got, want, ggot, gwant = _dino_both(emu, s, t, c, None, T, True)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(got, want):
        _close(a, b, 2e-5)
    _close(ggot, gwant, tol, float(gwant.abs().max()))


@pytest.mark.parametrize("M, K", [(600, 8192), (200, 1000), (70, 3)])
def test_dino_loss_teacher_mean_paths_ibot_rows(emu, M, K):
    """iBOT-like rows (one crop each, weights). M=600, K=8192: enough warps for several images
    per warp (B * K / 256 >= 16384), the forward keeps per-group column sums of the teacher;
    M=200 and 70: one image per warp, the teacher mean sums 16 chunks of rows, then the chunks."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(M, K, generator=g) * 2
    t = torch.randn(M, K, generator=g) * 2
    c = torch.randn(K, generator=g) * 0.1
    w = torch.rand(M, generator=g)
    got, want, ggot, gwant = _dino_both(emu, s, t, c, w, 1, False)
    for a, b in zip(got, want):
        _close(a, b, 2e-5)
    _close(ggot, gwant, 1e-5, float(gwant.abs().max()))


@pytest.mark.parametrize("B, S, T, K", [(5, 12, 2, 300), (70, 1, 1, 3), (200, 1, 1, 1000),
                                        (600, 1, 1, 1000), (600, 1, 1, 8192)])
def test_dino_loss_with_nan_filled_workspace(emu, B, S, T, K):
    """In torch's deterministic mode every torch.empty is filled with NaN: the forward's
    workspace, whose count of finished merge blocks the forward kernel must zero, and every
    output, so a value no kernel writes shows. The teacher mean's three paths: the rows
    themselves (B=5), chunks of rows (B=70: 16 chunks, the last two empty; B=200: 16 of 13
    rows; B=600, K=1000: 19 of at most 32 rows), per-group column sums (B=600, K=8192)."""
    g = torch.Generator().manual_seed(B + K)
    s = torch.randn(S * B, K, generator=g) * 2
    t = torch.randn(T * B, K, generator=g) * 2
    c = torch.randn(K, generator=g) * 0.1
    w = torch.rand(B, generator=g) if S == 1 else None
    args = (T, 0.1, 0.04, S > 1)
    want = CPU.dino_loss(s, t, c, w, *args)
    torch.use_deterministic_algorithms(True)
    try:
        got = emu.dino_loss(s, t, c, w, *args)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(got, want):
        assert not a.isnan().any()
        _close(a, b, 2e-5)


@pytest.mark.parametrize("special", ["neg_inf", "pos_inf", "nan"])
def test_dino_loss_special_logits(emu, special):
    T = 2
    s, t, c = special_logit_inputs(special, S=4, B=3, K=3000, T=T)
    got = emu.dino_loss(s, t, c, None, T, 0.1, 0.04, True)
    want = CPU.dino_loss(s, t, c, None, T, 0.1, 0.04, True)
    assert bool(got[0].isnan()) == (special != "neg_inf")
    for a, b in zip(got, want):
        _close(a, b, 2e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 6), S=st.integers(1, 5), T=st.integers(1, 4), K=st.integers(1, 1500),
       skip=st.booleans(), scale=st.sampled_from([1.0, 30.0]), seed=st.integers(0, 2**31 - 1))
def test_dino_loss_random_shapes(emu, B, S, T, K, skip, scale, seed):
    T = min(T, S)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(S * B, K, generator=g, dtype=torch.float64) * scale
    t = torch.randn(T * B, K, generator=g, dtype=torch.float64) * scale
    c = torch.randn(K, generator=g, dtype=torch.float64)
    if skip and S == T == 1:
        skip = False  # no pair left
    got, want, ggot, gwant = _dino_both(emu, s, t, c, None, T, skip)
    for a, b in zip(got, want):
        _close(a, b, 1e-9)
    _close(ggot, gwant, 1e-9, float(gwant.abs().max()))


@pytest.mark.parametrize("dim", [0, 1])
def test_offset_logsumexp(emu, dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(37, 1100, generator=g) * 5
    ro, co = torch.randn(37, generator=g), torch.randn(1100, generator=g)
    for r, c in ((ro, co), (None, None), (ro, None)):
        _close(emu.offset_logsumexp(x, r, c, 7.0, dim), CPU.offset_logsumexp(x, r, c, 7.0, dim), 1e-5)


def test_one_block_per_row_launches_refuse_grids_past_cuda_limit(emu):
    """The kernels that run a block per row (offset_logsumexp over dim=1, random_masking's
    short-row ranks, the DINO forward's block per image) refuse a grid past CUDA's 2^31 - 1
    blocks with an error naming the argument, instead of a launch whose block count wraps.
    The inputs are expanded views: nothing that large is allocated."""
    rows = 2**31
    x = torch.zeros(1, 1).expand(rows, 1)
    with pytest.raises(ValueError, match=r"x: .*2\^31 - 1 rows with dim=1, got 2147483648"):
        emu.offset_logsumexp(x, None, None, 1.0, 1)
    with pytest.raises(ValueError, match=r"x: .*2\^31 - 1 samples, got N=2147483648"):
        emu.random_masking(torch.zeros(1, 1, 1).expand(rows, 1, 1), torch.zeros(1, 1).expand(rows, 1), 1)
    B = 2**30 + 1
    logits = torch.zeros(1, 1).expand(2 * B, 1)
    with pytest.raises(ValueError, match=r"at most 2\^30 rows per crop .*got 1073741825"):
        emu.dino_loss(logits, logits, torch.zeros(1), None, 2, 0.1, 0.04, True)


# --------------------------------------------------------------------------------------------
# Masking (csrc/kernels/masking.cu)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("L", [1, 7, 196, 1000, 9000])
def test_random_masking_and_unshuffle(emu, dtype, L):
    """Ranks in shared memory (short rows) or a sort (long rows), ties and NaNs, the gather,
    the unshuffle and its backward: the same bits as the CPU."""
    g = torch.Generator().manual_seed(L)
    N, D = 3, 35
    x = torch.randn(N, L, D, generator=g).to(dtype)
    noise = torch.randint(0, 50, (N, L), generator=g).to(dtype)
    noise[0, : min(L, 3)] = math.nan
    keep = int(L * 0.25)
    got = emu.random_masking(x, noise, keep)
    want = CPU.random_masking(x, noise, keep)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    token = torch.randn(D, generator=g).to(dtype)
    out = emu.unshuffle_tokens(got[0], got[3], token, True)
    assert torch.equal(out, CPU.unshuffle_tokens(want[0], want[3], token, True))
    grad = torch.randn(out.shape, generator=g).to(dtype)
    gv, gt = emu.unshuffle_tokens_backward(grad, got[3], keep, True)
    rv, rt = CPU.unshuffle_tokens_backward(grad, want[3], keep, True)
    assert torch.equal(gv, rv)
    _close(gt, rt, 1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_unshuffle_validation_and_block_masking(emu):
    for ids in ([[0, 1, 1, 2]] * 2, [[0, 1, 9, 2]] * 2):
        with pytest.raises(ValueError, match="ids_restore"):
            emu.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor(ids), torch.zeros(4), True)
    seeds = torch.randint(-(2**62), 2**62, (64,), generator=torch.Generator().manual_seed(1))
    got = emu.block_masking(seeds, 14, 14, 75, 4, 75, 0.3, 1 / 0.3, True)
    assert torch.equal(got, CPU.block_masking(seeds, 14, 14, 75, 4, 75, 0.3, 1 / 0.3, True))


# --------------------------------------------------------------------------------------------
# Projection (csrc/kernels/projection.cu)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_and_pairs(emu, dtype):
    M, K = random_rig(6, 61, dtype)
    pts = random_points(3000, 62, dtype)
    size = _image_size_tensor((900, 1600), M, False)
    for rounding in (0, 1, 2):
        got = emu.project_points(pts, M, K, size, None, 1.0, 0.0, rounding)
        want = CPU.project_points(pts, M, K, size, None, 1.0, 0.0, rounding)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    rnd = torch.rand(3000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for cameras, r in ((0, None), (1, None), (2, rnd)):
        got = emu.point_pixel_pairs(pts, M, K, size, None, 1.0, 0.0, 1, cameras, r)
        want = CPU.point_pixel_pairs(pts, M, K, size, None, 1.0, 0.0, 1, cameras, r)
        assert got[0].numel() > 0
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
def test_segment_mean(emu, deterministic):
    g = torch.Generator().manual_seed(5)
    vals = torch.randn(5000, 19, generator=g)
    ids = torch.randint(-1, 300, (5000,), generator=g)
    m, c = emu.segment_mean(vals, ids, 300, deterministic)
    rm, rc = CPU.segment_mean(vals, ids, 300, True)
    assert torch.equal(c, rc)
    _close(m, rm, 1e-5)
    grad = torch.randn(300, 19, generator=g)
    _close(emu.segment_mean_backward(grad, ids, c), CPU.segment_mean_backward(grad, ids, rc), 1e-6)


# --------------------------------------------------------------------------------------------
# Flow and sampling (csrc/kernels/flow.cu, sampling.cu)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_flow_and_affine_correspondence(emu, dtype):
    g = torch.Generator().manual_seed(7)
    fw = (torch.randn(2, 2, 24, 40, generator=g) * 5).to(dtype)
    bw = (-fw + torch.randn(2, 2, 24, 40, generator=g).to(dtype) * 0.3)
    fw[0, 0, 3, 4] = math.nan
    for b in (bw, None):
        got, want = emu.flow_correspondence(fw, b, 0.01, 0.5), CPU.flow_correspondence(fw, b, 0.01, 0.5)
        torch.testing.assert_close(got[0], want[0], equal_nan=True)
        assert torch.equal(got[1], want[1])
    theta = torch.randn(3, 2, 3, generator=g, dtype=dtype)
    torch.testing.assert_close(emu.affine_correspondence(theta, 30, 50, 17, 23),
                               CPU.affine_correspondence(theta, 30, 50, 17, 23))
    with pytest.raises(ValueError, match="alpha1"):
        emu.flow_correspondence(fw, bw, -0.01, 0.5)


def _maps(layout, N, D, H, W, dtype, g):
    if layout == "strided":  # every other row: the row stride is 2 W
        return torch.randn(N, D, 2 * H, W, generator=g).to(dtype)[:, :, ::2]
    f = torch.randn(N, D, H, W, generator=g).to(dtype)
    return f.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else f


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("D", [3, 16, 40, 77])
def test_sample_points_and_backward(emu, dtype, layout, D):
    """The tiled forward (NCHW-like maps, D >= 16: 32 points x 32 channels per block, partial
    tiles), the per-point forward, both modes, with and without an image index; the atomic
    and the deterministic (fixed-point for these float gradients) feature gradients and the xy
    gradient."""
    g = torch.Generator().manual_seed(D)
    N, H, W, M = 3, 13, 29, 301
    f = _maps(layout, N, D, H, W, dtype, g)
    xy = torch.rand(M, 2, generator=g) * torch.tensor([W + 3.0, H + 3.0]) - 2
    idx = torch.randint(0, N, (M,), generator=g)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for mode in (0, 1):
        for image_index, n in ((idx, M), (None, (M // N) * N)):
            out = emu.sample_points(f, image_index, xy[:n], mode)
            want = CPU.sample_points(f, image_index, xy[:n], mode)
            _close(out, want, tol)
            grad = torch.randn(out.shape, generator=g).to(dtype)
            rf, rxy = CPU.sample_points_backward(grad, f, image_index, xy[:n], mode, True, True, True)
            for det in (False, True):
                gf, gxy = emu.sample_points_backward(grad, f, image_index, xy[:n], mode, True, True, det)
                _close(gf, rf, tol, 4)
                _close(gxy, rxy, tol * 10, float(rxy.abs().max()) + 1)
                if det:
                    again = emu.sample_points_backward(grad, f, image_index, xy[:n], mode, True, False, det)[0]
                    assert torch.equal(again, gf)


def test_scalar_scatter_when_vector_atomics_are_off(emu, monkeypatch):
    """PYSSL_NO_VECTOR_ATOMICS=1 (gpu_profile's A/B of sm_90's vector atomics): D % 4 == 0 on
    the emulated cc 9.0 device then takes the scalar scatter, with the same gradient."""
    g = torch.Generator().manual_seed(5)
    N, D, H, W, M = 2, 16, 9, 13, 200
    f = torch.randn(N, D, H, W, generator=g)
    xy = torch.rand(M, 2, generator=g) * torch.tensor([W + 2.0, H + 2.0]) - 1
    grad = torch.randn(M, D, generator=g)
    want = CPU.sample_points_backward(grad, f, None, xy, 0, True, False, True)[0]
    count = torch.ops.pyssl_emu.vector_atomics
    before = count()
    vector = emu.sample_points_backward(grad, f, None, xy, 0, True, False, False)[0]
    assert count() > before  # the vector path ran
    monkeypatch.setenv("PYSSL_NO_VECTOR_ATOMICS", "1")
    before = count()
    scalar = emu.sample_points_backward(grad, f, None, xy, 0, True, False, False)[0]
    assert count() == before  # the scalar one
    for got in (vector, scalar):
        _close(got, want, 1e-5, 4)


def _strided_grad(kind, M, D, dtype, g):
    """grad [M, D] in strides other than contiguous: expanded over the channels (strides (1, 0):
    the gradient of a loss on the channel sum, as sample_features's backward receives it),
    transposed (a [D, M] tensor's view), every other column of a [M, 2 D] tensor, or one value
    expanded to [M, D] (strides (0, 0): the gradient of out.sum())."""
    if kind == "expanded":
        return torch.randn(M, 1, generator=g).to(dtype).expand(M, D)
    if kind == "one_value":
        return torch.randn(1, 1, generator=g).to(dtype).expand(M, D)
    if kind == "transposed":
        return torch.randn(D, M, generator=g).to(dtype).t()
    return torch.randn(M, 2 * D, generator=g).to(dtype)[:, ::2]


@pytest.mark.parametrize("kind", ["expanded", "transposed", "every_other_column", "one_value"])
@pytest.mark.parametrize("D", [3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sample_points_backward_reads_gradient_strides(emu, kind, D, dtype):
    """The backward kernels read grad in its own strides (SampleArgs tM, tD) rather than a
    contiguous copy: every path (the scalar and the 4-channel vector atomic scatter, the
    fixed-point and the sorted deterministic scatter, the per-point and the tiled xy gradient)
    gives what it gives for the contiguous copy, bit for bit where the path is deterministic."""
    g = torch.Generator().manual_seed(D)
    N, H, W, M = 2, 11, 17, 258
    f = torch.randn(N, D, H, W, generator=g).to(dtype)
    xy = (torch.rand(M, 2, generator=g) * torch.tensor([W + 2.0, H + 2.0]) - 1).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    grad = _strided_grad(kind, M, D, dtype, g)
    assert not grad.is_contiguous()
    dense = grad.contiguous()
    want_f, want_xy = CPU.sample_points_backward(dense, f, None, xy, 0, True, True, True)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    for det in (False, True):
        gf, gxy = emu.sample_points_backward(grad, f, None, xy, 0, True, True, det)
        _close(gf, want_f, tol, 4)
        _close(gxy, want_xy, tol * 10, float(want_xy.abs().max()) + 1)
        if det:  # fixed point (float32, bf16) or sorted sums (float64): exact, any order
            rf, rxy = emu.sample_points_backward(dense, f, None, xy, 0, True, True, det)
            assert torch.equal(gf, rf)
            assert torch.equal(gxy, rxy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("loss", [0, 1])
@pytest.mark.parametrize("D", [5, 40])
def test_distillation_loss(emu, mode, loss, D, dtype):
    """The fused gather + loss (projection's pixel_to_point_distillation_loss, flow's
    dense_correspondence_loss): forward, coefficients, both gradients, atomic and
    deterministic (float32: the fixed-point scatter, whose per-pair bound must ignore the huge
    coefficients of pairs outside the image; float64: the sort + ordered sums)."""
    g = torch.Generator().manual_seed(D + 10 * mode + 100 * loss)
    N, H, W, M = 4, 11, 17, 500
    feats = torch.randn(N, D, H, W, generator=g, dtype=dtype)
    pf = torch.randn(M, D, generator=g, dtype=dtype)
    idx = torch.randint(0, N, (M,), generator=g)
    xy = (torch.rand(M, 2, generator=g) * torch.tensor([W + 2.0, H + 2.0]) - 1).to(dtype)
    for w in (None, (torch.rand(M, generator=g) > 0.3).to(dtype)):
        got, stats = emu.distill_loss(pf, feats, idx, xy, w, mode, loss)
        want, rstats = CPU.distill_loss(pf, feats, idx, xy, w, mode, loss)
        _close(got, want, 1e-5)
        gl = torch.tensor(0.7)
        rp, rf = CPU.distill_loss_backward(gl, pf, feats, idx, xy, w, rstats, mode, loss, True, True, True)
        for det in (False, True):
            gp, gf = emu.distill_loss_backward(gl, pf, feats, idx, xy, w, stats, mode, loss, True, True, det)
            _close(gp, rp, 1e-4, float(rp.abs().max()))
            _close(gf, rf, 1e-4, float(rf.abs().max()))


@pytest.mark.parametrize("case", ["nan", "no_weight", "dense", "tiny_point", "nan_at_zero_weight_tap"])
def test_distillation_deterministic_feature_gradient(emu, case):
    """The distillation loss's deterministic feature gradient, in torch's deterministic mode
    (empty tensors NaN-filled: every element must be written): the fixed-point scatter gives the
    same, repeatable gradient as the CPU; all-zero weights give zeros (a zero bound); a NaN point
    feature makes the bound NaN and takes the sort + ordered sums, NaN landing where the CPU puts
    it; an NCHW map with 24 channels (read channels-last) gets its gradient in NCHW. The only
    weighted pair sampling zero features with a point feature of 1e-24 (its norm underflows to
    0 while its coefficient is ~1e24: the product bound is 0, the terms are not), and a NaN
    pair whose only in-image tap has weight 0 (x = -1), must take the sort path too."""
    g = torch.Generator().manual_seed(3)
    N, D, H, W, M = 3, 24 if case == "dense" else 6, 9, 13, 300
    feats = torch.randn(N, D, H, W, generator=g)
    pf = torch.randn(M, D, generator=g)
    idx = torch.randint(0, N, (M,), generator=g)
    xy = torch.rand(M, 2, generator=g) * torch.tensor([W + 2.0, H + 2.0]) - 1
    w = (torch.rand(M, generator=g) > 0.3).float() * (0.0 if case == "no_weight" else 1.0)
    if case == "nan":
        w[5] = 1.0
        pf[5, 2] = math.nan
    if case == "nan_at_zero_weight_tap":
        w[5] = 1.0
        xy[5] = torch.tensor([-1.0, 3.5])
        pf[5] = math.nan
    if case == "tiny_point":
        w.zero_()
        w[5] = 1.0
        xy[5] = torch.tensor([4.5, 3.5])
        feats[idx[5], :, 3:5, 4:6] = 0.0
        pf[5] = 1e-24
    got, stats = emu.distill_loss(pf, feats, idx, xy, w, 0, 0)
    want, rstats = CPU.distill_loss(pf, feats, idx, xy, w, 0, 0)
    gl = torch.tensor(0.7)
    rf = CPU.distill_loss_backward(gl, pf, feats, idx, xy, w, rstats, 0, 0, False, True, True)[1]
    torch.use_deterministic_algorithms(True)
    try:
        gf = emu.distill_loss_backward(gl, pf, feats, idx, xy, w, stats, 0, 0, False, True, True)[1]
        again = emu.distill_loss_backward(gl, pf, feats, idx, xy, w, stats, 0, 0, False, True, True)[1]
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(again, gf, rtol=0, atol=0, equal_nan=True)
    assert gf.stride() == rf.stride() == feats.stride()
    if case == "no_weight":
        assert torch.equal(gf, torch.zeros_like(gf))
    if case in ("nan", "nan_at_zero_weight_tap"):
        assert torch.equal(gf.isnan(), rf.isnan()) and gf.isnan().any()
    _close(gf, rf, 1e-5, float(rf.nan_to_num().abs().max()))


@pytest.mark.parametrize("case", ["float64", "nan", "zero", "huge", "tiny", "nearest", "no_points"])
def test_deterministic_feature_gradient_paths(emu, case):
    """The deterministic feature gradient: float accumulators take the fixed-point scatter
    (integer atomics; its unit scales with max|grad|, so 1e30 and 1e-30 gradients keep float32
    accuracy), float64 and non-finite gradients the sort + ordered sums (NaN lands where the CPU
    puts it); a zero gradient, or no points, gives zeros. Run with torch's deterministic mode on,
    which fills uninitialised tensors with NaN: the accumulator starts uninitialised there, so a
    path that forgot to write or zero an element shows."""
    g = torch.Generator().manual_seed(11)
    dtype = torch.float64 if case == "float64" else torch.float32
    N, D, H, W, M = 2, 20, 9, 14, 0 if case == "no_points" else 400
    f = torch.randn(N, D, H, W, generator=g, dtype=dtype)
    xy = (torch.rand(M, 2, generator=g, dtype=dtype) * torch.tensor([W + 1.0, H + 1.0], dtype=dtype) - 1)
    grad = torch.randn(M, D, generator=g, dtype=dtype)
    if case == "nan":
        grad[7, 3] = math.nan
    scale = {"huge": 1e30, "tiny": 1e-30, "zero": 0.0}.get(case, 1.0)
    grad = grad * scale
    mode = 1 if case == "nearest" else 0
    want = CPU.sample_points_backward(grad, f, None, xy, mode, True, False, True)[0]
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        got = emu.sample_points_backward(grad, f, None, xy, mode, True, False, True)[0]
        again = emu.sample_points_backward(grad, f, None, xy, mode, True, False, True)[0]
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(again, got, rtol=0, atol=0, equal_nan=True)  # repeatable
    if case in ("zero", "no_points"):
        assert torch.equal(got, torch.zeros_like(got))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.nan_to_num().abs().max()),
                               equal_nan=True)
    if case == "nan":
        assert got.isnan().sum() == want.isnan().sum() > 0


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("C", [8, 24])
def test_dense_loss_on_maps(emu, layout, C):
    """flow's dense_correspondence_loss: both maps [B, C, H, W]; NCHW maps with C >= 16 are
    read through channels-last copies, and the online gradient comes back in the online map's
    own layout (as the fake kernel says)."""
    g = torch.Generator().manual_seed(C)
    B, H, W = 2, 10, 13
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    online = torch.randn(B, C, H, W, generator=g).contiguous(memory_format=fmt)
    target = torch.randn(B, C, H, W, generator=g).contiguous(memory_format=fmt)
    xy = (torch.rand(B * H * W, 2, generator=g) * torch.tensor([W + 1.0, H + 1.0]) - 1)
    w = (torch.rand(B * H * W, generator=g) > 0.2).float()
    got, stats = emu.distill_loss(online, target, None, xy, w, 0, 0)
    want, rstats = CPU.distill_loss(online, target, None, xy, w, 0, 0)
    _close(got, want, 1e-5)
    gl = torch.tensor(1.0)
    rp, rf = CPU.distill_loss_backward(gl, online, target, None, xy, w, rstats, 0, 0, True, True, True)
    for det in (False, True):
        gp, gf = emu.distill_loss_backward(gl, online, target, None, xy, w, stats, 0, 0, True, True, det)
        assert gp.stride() == online.stride()
        _close(gp, rp, 1e-4, float(rp.abs().max()))
        _close(gf, rf, 1e-4, float(rf.abs().max()))
