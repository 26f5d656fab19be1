"""Patch masking: pyssl's fused ops vs the algorithms the field uses, on the same inputs.

Baselines:
  * MAE random masking as in the MAE paper's code: argsort of the noise, argsort again for
    the restore ids, torch.gather with a repeated [N, K, D] index, mask by a gather.
  * MAE's decoder restore: concatenate repeated mask tokens, gather with a repeated index.
  * BEiT block masking: a per-sample Python/numpy loop (BEiT's MaskingGenerator algorithm).
  * On CUDA, a plain device copy of the same number of bytes (bandwidth ceiling).

Run:  pytest benchmarks/bench_masking.py --benchmark-json out.json && python -m benchmarks.report out.json
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pyssl import ops

from .common import PYSSL, peak_memory, run, saved_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mae_random_masking(x, noise, mask_ratio):
    """MAE's per-sample random masking in plain PyTorch (the published algorithm)."""
    n, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    kept = shuffle[:, :keep]
    visible = torch.gather(x, dim=1, index=kept.unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=restore)
    return visible, mask, restore


def mae_restore(visible, restore, token):
    """MAE's decoder input: visible tokens + repeated mask tokens, un-shuffled by a gather."""
    n, keep, dim = visible.shape
    fill = token.view(1, 1, dim).repeat(n, restore.shape[1] - keep, 1)
    full = torch.cat([visible, fill], dim=1)
    return torch.gather(full, dim=1, index=restore.unsqueeze(-1).repeat(1, 1, dim))


def beit_numpy_block_masks(batch, height, width, num_masking, min_patches=4, min_aspect=0.3,
                           rng=None):
    """BEiT's block-mask generator, one sample at a time in Python + numpy: scalars from
    Python's ``random`` (as BEiT; numpy's per-call scalar draws are ~1.3x slower), blocks by
    numpy slicing."""
    rng = rng or random.Random(0)
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    out = np.zeros((batch, height, width), dtype=bool)
    for b in range(batch):
        mask = out[b]
        count = 0
        while count < num_masking:
            budget = num_masking - count
            delta = 0
            for _ in range(10):
                area = min_patches + (budget - min_patches) * rng.random()
                aspect = math.exp(rng.uniform(lo, hi))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top = rng.randint(0, height - h)
                    left = rng.randint(0, width - w)
                    block = mask[top:top + h, left:left + w]
                    fresh = h * w - int(block.sum())
                    if 0 < fresh <= budget:
                        block[...] = True
                        delta += fresh
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
    return out


def _tokens(n, length, dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, dim, generator=g).to(dtype).to(device)
    noise = torch.rand(n, length, generator=g).to(device)
    return x, noise


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("dim", [768, 1024])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [PYSSL, "mae"])
def test_random_masking(benchmark, device, quick, dtype, dim, mode, impl):
    if quick and (dim != 768 or dtype != "fp32"):
        pytest.skip("--bench-quick")
    n, length, ratio = 256, 196, 0.75
    x, noise = _tokens(n, length, dim, DTYPES[dtype], device)
    x.requires_grad_(mode == "fwd+bwd")
    grad = torch.randn(n, int(length * (1 - ratio)), dim, device=device).to(x.dtype)

    if impl == PYSSL:
        def forward():
            return ops.random_masking(x, ratio, noise=noise).visible
    else:
        def forward():
            return mae_random_masking(x, noise, ratio)[0]

    if mode == "fwd":
        fn = forward
    else:
        def fn():
            x.grad = None
            forward().backward(grad)

    extra = {}
    if mode == "fwd+bwd":
        extra["saved_bytes"] = saved_bytes(forward, inputs=(x, noise))
        extra["peak_bytes"] = peak_memory(fn, device)
    run(benchmark, fn, device, impl=impl,
        group=f"random_masking {mode} N={n} L={length} D={dim} {dtype} [{device}]", **extra)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [PYSSL, "mae", "device_copy"])
def test_unshuffle_tokens(benchmark, device, quick, mode, impl):
    n, length, keep, dim = 256, 196, 49, 512  # MAE ViT-L decoder width
    if impl == "device_copy" and (torch.device(device).type != "cuda" or mode != "fwd"):
        pytest.skip("bandwidth ceiling: CUDA forward only")
    g = torch.Generator().manual_seed(1)
    visible = torch.randn(n, keep, dim, generator=g).to(device).requires_grad_(mode == "fwd+bwd")
    token = torch.randn(dim, generator=g).to(device).requires_grad_(mode == "fwd+bwd")
    restore = torch.argsort(torch.rand(n, length, generator=g), dim=1).to(device)
    grad = torch.randn(n, length, dim, device=device)
    if impl == PYSSL:
        def forward():
            return ops.unshuffle_tokens(visible, restore, token, validate=False)
    elif impl == "mae":
        def forward():
            return mae_restore(visible, restore, token)
    else:
        src = torch.empty(n, length, dim, device=device)
        dst = torch.empty_like(src)

        def forward():
            return dst.copy_(src)
    if mode == "fwd":
        fn = forward
    else:
        def fn():
            visible.grad = token.grad = None
            forward().backward(grad)
    extra = {}
    if mode == "fwd+bwd":
        extra["saved_bytes"] = saved_bytes(forward, inputs=(visible, token, restore))
    run(benchmark, fn, device, impl=impl,
        group=f"unshuffle_tokens {mode} N={n} L={length} K={keep} D={dim} fp32 [{device}]",
        bytes_moved=2 * n * length * dim * 4, **extra)


@pytest.mark.parametrize("impl", [PYSSL, "beit_numpy"])
def test_block_masking(benchmark, device, impl):
    batch, side, count = 256, 14, 75
    if impl == "beit_numpy":
        if torch.device(device).type != "cpu":
            pytest.skip("the numpy loop runs on the CPU")
        rng = random.Random(0)

        def fn():
            return beit_numpy_block_masks(batch, side, side, count, rng=rng)
    else:
        g = torch.Generator(device=device).manual_seed(0)  # seeds drawn where the masks live

        def fn():
            return ops.block_masking(batch, side, side, count, generator=g, device=device)
    run(benchmark, fn, device, impl=impl,
        group=f"block_masking N={batch} {side}x{side} n={count} [{device}]")
