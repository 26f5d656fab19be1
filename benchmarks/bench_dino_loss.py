"""Fused DINO loss vs the plain-PyTorch versions the field uses, on the same inputs.

Baselines:
  (a) "dino_pair_loop": DINO v1's DINOLoss (facebookresearch/dino): teacher softmax, then a loop
      over (teacher crop, student crop) pairs of sum(-q * log_softmax(s)), batch mean.
  (b) "stacked_einsum": a stacked version (as in lightly's DINOLoss): softmax/log_softmax over
      all crops at once, one einsum for all pairs, the same-view diagonal zeroed.
Configurations from the issue: B in {32, 64}, 2 global + 10 local crops, K in {8192, 65536},
fp32 and bf16; forward and forward+backward; memory saved for backward (saved-tensor hooks),
peak memory (CUDA: the allocator's; CPU: the resident set's, benchmarks/common.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyssl import ops

from .common import PYSSL, peak_memory, run, saved_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
N_GLOBAL, N_LOCAL = 2, 10


def dino_pair_loop(student, teacher, center, n_crops, student_temp=0.1, teacher_temp=0.04):
    s = (student / student_temp).chunk(n_crops)
    q = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, n_terms = 0, 0
    for iq, qi in enumerate(q):
        for v in range(n_crops):
            if v == iq:
                continue
            loss = torch.sum(-qi * F.log_softmax(s[v], dim=-1), dim=-1)
            total += loss.mean()
            n_terms += 1
    return total / n_terms


def stacked_einsum(student, teacher, center, n_crops, student_temp=0.1, teacher_temp=0.04):
    batch = teacher.shape[0] // 2
    q = F.softmax((teacher - center) / teacher_temp, dim=-1).view(2, batch, -1)
    logp = F.log_softmax(student / student_temp, dim=-1).view(n_crops, batch, -1)
    loss = -torch.einsum("tbk,sbk->ts", q, logp)
    mask = torch.ones_like(loss, dtype=torch.bool)
    mask[torch.arange(2), torch.arange(2)] = False
    return loss[mask].sum() / (mask.sum() * batch)


def fused(student, teacher, center, n_crops):
    return ops.dino_loss(student, teacher, center, n_teacher_crops=2).loss


IMPLS = {PYSSL: fused, "dino_pair_loop": dino_pair_loop, "stacked_einsum": stacked_einsum}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("K", [8192, 65536])
@pytest.mark.parametrize("B", [32, 64])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_dino_loss(benchmark, device, quick, dtype, K, B, mode, impl):
    if quick and (K != 8192 or B != 32 or dtype != "fp32"):
        pytest.skip("--bench-quick")
    crops = N_GLOBAL + N_LOCAL
    g = torch.Generator().manual_seed(0)
    student = torch.randn(crops * B, K, generator=g).to(DTYPES[dtype]).to(device)
    teacher = torch.randn(N_GLOBAL * B, K, generator=g).to(DTYPES[dtype]).to(device)
    center = torch.zeros(K, device=device, dtype=DTYPES[dtype])  # the baselines need one dtype
    student.requires_grad_(mode == "fwd+bwd")
    fn_loss = IMPLS[impl]

    def forward():
        return fn_loss(student, teacher, center, crops)

    if mode == "fwd":
        fn = forward
    else:
        def fn():
            student.grad = None
            forward().backward()
    extra = {}
    if mode == "fwd+bwd":
        extra["saved_bytes"] = saved_bytes(forward, inputs=(student, teacher, center))
        extra["peak_bytes"] = peak_memory(fn, device)
    run(benchmark, fn, device, impl=impl,
        group=f"dino_loss {mode} B={B} crops=2+10 K={K} {dtype} [{device}]", **extra)
