"""The CPU kernels' instruction-set builds (csrc/cpu/simd.h: baseline, AVX2+FMA and, where it
pays, AVX-512) against each other. The lane-array kernel bodies and the hand-written AVX2 sampling
kernels promise the same bits as their baseline builds, with one exception (below). The run-time
dispatch picks the widest build the CPU has, so without this test only that one would ever run
here. PYSSL_CPU_ISA caps the dispatch in a child process."""

import json
import os
import subprocess
import sys

import pytest

import pyssl
from pyssl._native import CPU_ISAS

# Runs in a child process (the cap is read once per process) and prints a digest of every output.
CHILD = r"""
import hashlib, json, math
import torch, pyssl
from pyssl import ops

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)

def digest(*ts):
    m = hashlib.sha256()
    for t in ts:
        t = t.detach().contiguous().reshape(-1)
        m.update((t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().tobytes())
    return m.hexdigest()

out = {}
# Row lengths and chunks: tails of the 32-wide lanes and of the 4096-wide chunks; T = 1, 2, 3
# (the two-row fused pass, the one-row case and the extra dot pass); a NaN-free row of -inf.
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for T, S, K, skip in ((2, 6, 4099, True), (1, 3, 77, False), (3, 5, 8200, True), (2, 4, 31, False)):
        s = torch.randn(S * 3, K, generator=g).mul(3).to(dtype).requires_grad_(True)
        t = torch.randn(T * 3, K, generator=g).mul(3).to(dtype)
        t[0, : K // 2] = -math.inf
        c = (torch.randn(K, generator=g) * 0.1).to(dtype)
        loss, mean = ops.dino_loss(s, t, c, n_teacher_crops=T, skip_same_view=skip)
        loss.backward()
        out[f"dino_loss {dtype} T={T} K={K}"] = digest(loss, mean, s.grad)
x = torch.randn(40, 5000, generator=g) * 4
out["offset_logsumexp"] = digest(*(torch.ops.pyssl.offset_logsumexp(x, None, None, 25.0, d)
                                   for d in (0, 1)))
pts = torch.randn(2500, 4, generator=g) * 15
T_cam = torch.eye(4).repeat(3, 1, 1)
T_cam[:, :3, 3] = torch.randn(3, 3, generator=g)
K_cam = torch.tensor([[300.0, 0, 320], [0, 300.0, 240], [0, 0, 1]]).repeat(3, 1, 1)
for rounding in ("none", "floor", "round"):
    p = ops.project_points(pts, T_cam, K_cam, (480, 640), rounding=rounding)
    out[f"project_points {rounding}"] = digest(*(v for v in p if isinstance(v, torch.Tensor)))
# Dense sampling: pixel-interleaved kernels (3, 4 channels), 16-channel band kernels plus planar
# rest (20), both layouts, fp32 and bf16, forward and backward; the flow check; scattered pairs.
for C in (3, 4, 20):
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            f = torch.randn(2, C, 24, 40, generator=g).to(dtype)
            if cl:
                f = f.contiguous(memory_format=torch.channels_last)
            f.requires_grad_(True)
            coords = torch.rand(2, 24, 40, 2, generator=g) * torch.tensor([43.0, 27.0]) - 1.5
            coords.requires_grad_(True)
            o = ops.sample_features(f, coords)
            o.float().square().sum().backward()
            if C >= 16:
                # 16+ channels, either layout (channels-last maps with a rest are copied to
                # NCHW): the AVX2 build runs 16-channel slices through the channels-last band
                # kernels, which sum the coordinate gradient (and the rest channels' feature
                # gradient) in another order than the planar kernels: the same values to
                # rounding, not the same bits (README, "The op API").
                out[f"sample_features C={C} {dtype} cl={cl} forward"] = digest(o)
            else:
                out[f"sample_features C={C} {dtype} cl={cl}"] = digest(o, f.grad, coords.grad)
# The fused dense loss with fewer than 16 channels: planar kernels in every build (16+ channels
# take the band kernels in the AVX2 build, which sum channels in slices: equal to rounding).
# Online maps NCHW and channels-last (read in place through a point stride).
for dtype in (torch.float32, torch.bfloat16):
    for fmt in (torch.contiguous_format, torch.channels_last):
        on = torch.randn(2, 5, 24, 40, generator=g).to(dtype).contiguous(memory_format=fmt)
        on.requires_grad_(True)
        tg = torch.randn(2, 5, 26, 38, generator=g).to(dtype).requires_grad_(True)
        coords = torch.rand(2, 24, 40, 2, generator=g) * torch.tensor([41.0, 29.0]) - 1.5
        loss = ops.dense_correspondence_loss(on, tg, coords, torch.rand(2, 24, 40, generator=g) > 0.2)
        loss.backward()
        out[f"dense_correspondence_loss C=5 {dtype} {fmt}"] = digest(loss, on.grad, tg.grad)
# Channels-last features with 32 channels: the AVX2 build reads them in place (band kernels), the
# baseline build an NCHW copy; the same forward bits, and a channels-last gradient in both.
for dtype in (torch.float32, torch.bfloat16):
    f = torch.randn(2, 32, 24, 40, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    f.requires_grad_(True)
    coords = torch.rand(2, 24, 40, 2, generator=g) * torch.tensor([43.0, 27.0]) - 1.5
    o = ops.sample_features(f, coords)
    o.float().square().sum().backward()
    out[f"sample_features C=32 {dtype} channels-last forward"] = digest(o)
    out[f"sample_features C=32 {dtype} channels-last gradient layout"] = str(
        (o.is_contiguous(), f.grad.is_contiguous(memory_format=torch.channels_last)))
fw, bw = torch.randn(2, 2, 24, 40, generator=g) * 3, torch.randn(2, 2, 24, 40, generator=g) * 3
r = ops.flow_correspondence(fw, bw)
out["flow_correspondence"] = digest(r.coords, r.valid.to(torch.uint8))
feats = torch.randn(6, 40, 20, 30, generator=g).requires_grad_(True)
pf = torch.randn(2000, 40, generator=g).requires_grad_(True)
idx = [torch.randint(0, n, (2000,), generator=g) for n in (6, 20, 30)]
loss = ops.pixel_to_point_distillation_loss(pf, feats, *idx)
loss.backward()
out["pixel_to_point_distillation_loss"] = digest(loss, pf.grad, feats.grad)
print(json.dumps({"isa": pyssl.build_info()["cpu_isa"], "digests": out}))
"""


def _run(isa):
    env = {**os.environ, "PYSSL_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_cpu_build_gives_the_same_bits():
    runs = {}
    for isa in CPU_ISAS:
        res = _run(isa)
        runs.setdefault(res["isa"], res["digests"])  # a cap above the CPU runs a narrower build
    assert "baseline" in runs
    if len(runs) == 1:
        pytest.skip("this CPU has no AVX2+FMA: only the baseline build can run")
    names = sorted(runs)
    first = runs[names[0]]
    for name in names[1:]:
        differ = [k for k in first if runs[name][k] != first[k]]
        assert not differ, f"{name} and {names[0]} builds differ on {differ}"


def test_a_bad_isa_cap_is_refused_with_its_name():
    env = {**os.environ, "PYSSL_CPU_ISA": "sse9"}
    r = subprocess.run([sys.executable, "-c", "import pyssl"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0
    assert "PYSSL_CPU_ISA='sse9'" in r.stderr and "baseline, avx2, avx512" in r.stderr


def test_build_info_names_the_cpu_build_in_use():
    assert pyssl.build_info()["cpu_isa"] in CPU_ISAS


def test_the_cap_is_read_once_when_the_extension_loads():
    """Setting PYSSL_CPU_ISA after import changes nothing (the C++ side latched it at load)."""
    env = {k: v for k, v in os.environ.items() if k != "PYSSL_CPU_ISA"}

    def child(code):
        r = subprocess.run([sys.executable, "-c", "import os, pyssl\n" + code], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip()

    widest = child("print(pyssl.build_info()['cpu_isa'])")
    if widest == "baseline":
        pytest.skip("this CPU has no AVX2+FMA: a later cap could not show")
    late = child("os.environ['PYSSL_CPU_ISA'] = 'baseline'\n"
                 "pyssl.build_info.cache_clear()\n"
                 "print(pyssl.build_info()['cpu_isa'])")
    assert late == widest
