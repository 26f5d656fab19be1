"""Where the GPU time goes: per-kernel CUDA times (torch.profiler) of the configurations whose
goals are not yet met, pyssl beside its baseline, so that a GPU session's one run also says
which kernel to work on next (benchmarks/gpu_check.sh writes this to OUTDIR/profile.txt).

    python -m benchmarks.gpu_profile [--iters 5] [--top 10]

Each case runs 3 warm-up iterations, then `--iters` profiled ones; the table lists the kernels
(and copies / fills) with the most CUDA time, in milliseconds per iteration, and their share.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pyssl import ops

from .bench_dino_loss import dino_pair_loop
from .bench_flow import _inputs as flow_inputs
from .bench_flow import grid_sample_pipeline, pyssl_pipeline


def _flow_case(B, C, impl, device="cuda"):
    fw, bw, feats = flow_inputs(B, C, torch.float32, device)
    fw.requires_grad_(True)
    feats.requires_grad_(True)
    pipeline = grid_sample_pipeline if impl == "grid_sample" else pyssl_pipeline

    def step():
        fw.grad = feats.grad = None
        det = impl == "pyssl_deterministic"
        torch.use_deterministic_algorithms(det)
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.utils.deterministic.fill_uninitialized_memory = False
        saved = os.environ.get("PYSSL_NO_VECTOR_ATOMICS")
        if impl == "pyssl_scalar_atomics":  # the scatter without sm_90's vector atomics
            os.environ["PYSSL_NO_VECTOR_ATOMICS"] = "1"
        try:
            warped, valid = pipeline(fw, bw, feats)
            (warped.float().sum(1) * valid).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
            torch.utils.deterministic.fill_uninitialized_memory = fill
            if saved is None:
                os.environ.pop("PYSSL_NO_VECTOR_ATOMICS", None)
            else:
                os.environ["PYSSL_NO_VECTOR_ATOMICS"] = saved
    return step


def _dino_case(B, K, impl, device="cuda"):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(12 * B, K, generator=g).to(device).requires_grad_(True)
    t = torch.randn(2 * B, K, generator=g).to(device)
    c = torch.zeros(K, device=device)

    def step():
        s.grad = None
        if impl == "pyssl":
            loss = ops.dino_loss(s, t, c, n_teacher_crops=2)[0]
        else:
            loss = dino_pair_loop(s, t, c, 12)  # 12 student crops, 2 of them global
        loss.backward()
    return step


def _ibot_case(M, K, impl, device="cuda"):
    """iBOT's masked-patch loss on M patches (one crop each, weights): the DINO kernels with
    thousands of single-crop rows, whose teacher mean is summed in chunks of rows."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(M, K, generator=g).to(device).requires_grad_(True)
    t = torch.randn(M, K, generator=g).to(device)
    c = torch.zeros(K, device=device)
    w = torch.full((M,), 1.0 / M, device=device)

    def step():
        s.grad = None
        ops.ibot_patch_loss(s, t, c, w)[0].backward()
    return step


def _dense_loss_case(B, C, impl, device="cuda"):
    fw, bw, target = flow_inputs(B, C, torch.float32, device)
    online = torch.randn_like(target).requires_grad_(True)
    target.requires_grad_(True)
    coords, valid = ops.flow_correspondence(fw, bw)

    def step():
        online.grad = target.grad = None
        if impl == "pyssl":
            loss = ops.dense_correspondence_loss(online, target, coords, valid)
        else:
            warped = ops.sample_features(target, coords)
            cos = torch.nn.functional.cosine_similarity(online, warped, dim=1)
            loss = ((1 - cos) * valid).sum() / valid.sum().clamp_min(1)
        loss.backward()
    return step


CASES = [
    ("flow warp fwd+bwd B=8 C=64 256x512 fp32", _flow_case, (8, 64),
     ["pyssl", "pyssl_scalar_atomics", "pyssl_deterministic", "grid_sample"]),
    ("flow warp fwd+bwd B=2 C=256 256x512 fp32", _flow_case, (2, 256), ["pyssl", "grid_sample"]),
    ("dino_loss fwd+bwd B=32 crops=2+10 K=65536 fp32", _dino_case, (32, 65536), ["pyssl", "dino_pair_loop"]),
    ("dino_loss fwd+bwd B=32 crops=2+10 K=8192 fp32", _dino_case, (32, 8192), ["pyssl"]),
    ("ibot_patch_loss fwd+bwd M=6000 K=8192 fp32", _ibot_case, (6000, 8192), ["pyssl"]),
    ("dense loss fwd+bwd B=2 C=256 256x512 fp32", _dense_loss_case, (2, 256), ["pyssl", "pyssl_sample_then_loss"]),
]


def _short(name: str, width: int = 78) -> str:
    name = name.replace("pyssl::cuda::(anonymous namespace)::", "").replace("void ", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def dino_floor_bytes(B: int, K: int, elem: int = 4, S: int = 12, T: int = 2) -> int:
    """Issue 3's bandwidth floor of a DINO loss forward+backward: the forward reads the student
    and teacher logits once, the backward reads both and writes the student gradient."""
    return ((S + T) * 2 + S) * B * K * elem


def copy_bandwidth(device: str = "cuda", mb: int = 1024) -> float:
    """Bytes per second (read + write) of a device-to-device copy of `mb` MiB: the rate the
    floors are measured against."""
    a = torch.empty(mb * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    _sync(device)
    return 2 * a.numel() * 4 * 10 / (time.perf_counter() - t0)


def floor_line(nbytes: int, bandwidth: float, stats: dict) -> str:
    floor = nbytes / bandwidth * 1e3
    return (f"  floor {nbytes / 1e6:.0f} MB at {bandwidth / 1e12:.2f} TB/s = {floor:.3f} ms: "
            f"kernels {stats['total'] / floor:.2f}x, wall {stats['wall'] / floor:.2f}x the floor")


def profile_case(step, iters: int, top: int, device: str = "cuda",
                 stats: dict | None = None) -> list[str]:
    """Times of the kernels (CUDA) or of the leaf ops (CPU, for a check without a GPU); `stats`,
    if given, gets the wall and summed kernel times (ms per iteration)."""
    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(iters):
            step()
        _sync(device)
    wall = (time.perf_counter() - t0) / iters * 1e3
    rows = []
    for e in prof.key_averages():
        if device == "cuda":
            t = getattr(e, "device_time_total", None)
            if t is None:
                t = getattr(e, "cuda_time_total", 0)
        else:
            t = e.self_cpu_time_total
        if t > 0 and e.count > 0:
            rows.append((t / iters / 1e3, max(1, e.count // iters), e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    if stats is not None:
        stats.update(wall=wall, total=total)
    out = [f"  wall {wall:.3f} ms/iter (profiled), {device} total {total:.3f} ms/iter"]
    for ms, calls, key in rows[:top]:
        out.append(f"  {ms:8.3f} ms {100 * ms / max(total, 1e-12):5.1f}%  x{calls:<3d} {_short(key)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"# per-kernel CUDA time, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bandwidth = copy_bandwidth()
    print(f"# device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    for title, make, params, impls in CASES:
        for impl in impls:
            print(f"\n{title} [{impl}]", flush=True)
            stats = {}
            try:
                lines = profile_case(make(*params, impl), args.iters, args.top, stats=stats)
                if make is _dino_case and impl == "pyssl":
                    lines.append(floor_line(dino_floor_bytes(*params), bandwidth, stats))
                if make is _ibot_case:  # one student and one teacher row per patch
                    lines.append(floor_line(dino_floor_bytes(*params, S=1, T=1), bandwidth, stats))
            except Exception as exc:  # one failing case keeps the others' tables
                lines = [f"  FAILED: {type(exc).__name__}: {exc}"]
            print("\n".join(lines), flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
