"""Runs every pyssl CUDA kernel once on small inputs: the program compute-sanitizer
(memcheck, racecheck) inspects in benchmarks/gpu_check.sh. Exits non-zero on any error."""

from __future__ import annotations

import os

import torch

import pyssl
from pyssl import ops


def masking(dev):
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.randn(5, 37, 19, device=dev).to(dtype).requires_grad_(True)
        r = ops.random_masking(x, 0.6)
        tok = torch.randn(19, device=dev).to(dtype).requires_grad_(True)
        out = ops.unshuffle_tokens(r.visible, r.ids_restore, tok)
        out.float().sum().backward()
    # long rows take the device-sort path
    ops.random_masking(torch.randn(2, 9000, 4, device=dev), 0.75)
    ops.block_masking(64, 14, 14, 75, device=dev)


def errors(dev):
    # last: an error raised in C++ after a kernel ran (the validation of ids_restore)
    try:
        ops.unshuffle_tokens(torch.randn(2, 3, 4, device=dev), torch.tensor([[0, 1, 1, 2]] * 2, device=dev),
                             torch.zeros(4, device=dev))
        raise AssertionError("a repeated id was not rejected")
    except ValueError:
        pass


def dino_loss(dev):
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for T, S, K in ((2, 6, 4099), (1, 1, 7), (3, 5, 1000)):
            s = torch.randn(S * 3, K, device=dev).to(dtype).requires_grad_(True)
            t = torch.randn(T * 3, K, device=dev).to(dtype)
            loss, _ = ops.dino_loss(s, t, torch.zeros(K, device=dev), n_teacher_crops=T,
                                    skip_same_view=S > 1)
            loss.backward()
    ops.sinkhorn_knopp(torch.randn(16, 3000, device=dev) * 100, 0.04)
    m = torch.rand(4, 16, device=dev) < 0.5
    n = int(m.sum())
    ops.ibot_patch_loss(torch.randn(n, 50, device=dev), torch.randn(n, 50, device=dev),
                        torch.zeros(50, device=dev), ops.ibot_weights(m))
    # many patches: the teacher mean's other two paths (the merge kernel's blocks after the
    # images', the forward's after the groups'); grids too large for racecheck, which is slow on
    # them, so its run skips them (PYSSL_SMOKE_SMALL=1; the merge kernel's shared memory is
    # covered by the cases above)
    if os.environ.get("PYSSL_SMOKE_SMALL"):
        return
    # (M, K): several images per forward warp with fused per-group column sums (2100, 2048);
    # the teacher mean from 16 chunks of rows, past 8M per-group column sums (4100, 8200)
    for M, K in ((2100, 2048), (4100, 8200)):
        s = torch.randn(M, K, device=dev, requires_grad=True)
        ops.ibot_patch_loss(s, torch.randn(M, K, device=dev), torch.zeros(K, device=dev),
                            torch.rand(M, device=dev)).backward()


def projection(dev):
    C, P = 6, 5000
    M = torch.eye(4, device=dev).repeat(C, 1, 1)
    M[:, :3, :3] = torch.tensor([[0.0, -1, 0], [0, 0, -1], [1, 0, 0]], device=dev)
    K = torch.tensor([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]], device=dev).repeat(C, 1, 1)
    pts = torch.randn(P, 4, device=dev) * 10
    ops.project_points(pts, M, K, (480, 640))
    for cams in ("all", "first", "random"):
        pairs = ops.point_pixel_pairs(pts, M, K, (480, 640), cameras=cams)
    feats = torch.randn(C, 16, 48, 64, device=dev, requires_grad=True)
    rows = pairs.row.clamp(max=47)
    cols = pairs.col.clamp(max=63)
    for det in (False, True):
        torch.use_deterministic_algorithms(det, warn_only=True)
        ops.gather_pixel_features(feats, pairs.camera_index, rows, cols).sum().backward()
        ops.gather_pixel_features(feats, pairs.camera_index, rows.float() + 0.3, cols.float() - 0.2,
                                  mode="bilinear").sum().backward()
        ops.pixel_to_point_distillation_loss(torch.randn(len(rows), 16, device=dev, requires_grad=True),
                                             feats, pairs.camera_index, rows, cols).backward()
        v = torch.randn(P, 16, device=dev, requires_grad=True)
        ops.segment_mean(v, torch.randint(-1, 100, (P,), device=dev), 100)[0].sum().backward()
    torch.use_deterministic_algorithms(False)


def flow(dev):
    for dtype in (torch.float32, torch.bfloat16):
        fw = (torch.randn(2, 2, 40, 60, device=dev) * 3).to(dtype)
        bw = (-fw.float() + torch.randn(2, 2, 40, 60, device=dev) * 0.3).to(dtype)
        coords, valid = ops.flow_correspondence(fw, bw)
        # 16 channels: the tiled forward and xy gradient, 4-channel vector atomics, the
        # fixed-point deterministic scatter, channels-last copies in the dense loss; 3: the
        # per-point kernels
        for C in (16, 3):
            feats = torch.randn(2, C, 40, 60, device=dev).to(dtype).requires_grad_(True)
            online = torch.randn(2, C, 40, 60, device=dev).to(dtype).requires_grad_(True)
            c = coords.detach().requires_grad_(True)
            for det in (False, True):
                torch.use_deterministic_algorithms(det, warn_only=True)
                ops.sample_features(feats, c).float().sum().backward()
                ops.dense_correspondence_loss(online, feats, coords, valid).backward()
            torch.use_deterministic_algorithms(False)
    # float64: the deterministic sort + ordered sums (the fixed-point scatter is for float)
    f64 = torch.randn(2, 16, 40, 60, device=dev, dtype=torch.float64, requires_grad=True)
    c64 = coords.detach().double()
    torch.use_deterministic_algorithms(True, warn_only=True)
    ops.sample_features(f64, c64).sum().backward()
    ops.dense_correspondence_loss(f64.detach().clone().requires_grad_(True), f64, c64, valid).backward()
    torch.use_deterministic_algorithms(False)
    ops.affine_correspondence(torch.randn(3, 2, 3, device=dev), (40, 60), (20, 30))


FAMILIES = [masking, dino_loss, projection, flow, errors]


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    names = argv[0].split(",") if argv else [f.__name__ for f in FAMILIES]
    unknown = set(names) - {f.__name__ for f in FAMILIES}
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; known: {[f.__name__ for f in FAMILIES]}")
    assert torch.cuda.is_available(), "no CUDA device"
    assert pyssl.has_cuda_kernels(), "pyssl was built without CUDA kernels"
    for fam in [f for f in FAMILIES if f.__name__ in names]:
        fam(torch.device("cuda"))
        torch.cuda.synchronize()
        print(f"{fam.__name__}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
