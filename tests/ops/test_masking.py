"""Patch-masking ops against the plain-PyTorch reference (pyssl.ops.reference)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from pyssl import ops
from pyssl.ops import reference

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def noise_and_tokens(draw, max_n=5, max_l=40, max_d=9):
    """Random [N, L, D] tokens and [N, L] noise with many ties and special values."""
    n = draw(st.integers(0, max_n))
    L = draw(st.integers(1, max_l))
    d = draw(st.integers(0, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["uniform", "ties", "special"]))
    if kind == "uniform":
        noise = torch.rand(n, L, generator=g, dtype=torch.float64)
    elif kind == "ties":
        noise = torch.randint(0, 3, (n, L), generator=g).double()
    else:
        pool = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-300],
                            dtype=torch.float64)
        noise = pool[torch.randint(0, len(pool), (n, L), generator=g)]
    x = torch.randn(n, L, d, generator=g, dtype=torch.float64)
    ratio = draw(st.sampled_from([0.0, 0.1, 0.5, 0.75, 0.9, 0.99]))
    return x, noise, ratio


@given(data=noise_and_tokens(), x_dtype=st.sampled_from(DTYPES),
       noise_dtype=st.sampled_from(DTYPES))
def test_random_masking_matches_mae_reference(data, x_dtype, noise_dtype):
    x, noise, ratio = data
    x = x.to(x_dtype)
    noise = noise.to(noise_dtype)
    got = ops.random_masking(x, ratio, noise=noise)
    want = reference.random_masking(x, ratio, noise)
    for name, g, w in zip(got._fields, got, want):
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert torch.equal(g, w), name


@given(data=noise_and_tokens(max_d=6))
def test_random_masking_backward_matches_reference(data):
    x, noise, ratio = data
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    v1 = ops.random_masking(x1, ratio, noise=noise).visible
    v2 = reference.random_masking(x2, ratio, noise)[0]
    grad = torch.randn_like(v1)
    v1.backward(grad)
    v2.backward(grad)
    assert torch.equal(x1.grad, x2.grad)


@given(data=noise_and_tokens(), dtype=st.sampled_from(DTYPES), validate=st.booleans())
def test_unshuffle_matches_reference_forward_and_backward(data, dtype, validate):
    x, noise, ratio = data
    x = x.to(dtype)
    res = reference.random_masking(x, ratio, noise)
    visible = res[0].detach().clone().requires_grad_(True)
    visible_ref = visible.detach().clone().requires_grad_(True)
    token = torch.randn(x.shape[2], dtype=torch.float64).to(dtype).requires_grad_(True)
    token_ref = token.detach().clone().requires_grad_(True)
    out = ops.unshuffle_tokens(visible, res[3], token, validate=validate)
    want = reference.unshuffle_tokens(visible_ref, res[3], token_ref)
    assert torch.equal(out, want)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    out.backward(grad)
    want.backward(grad)
    assert torch.equal(visible.grad, visible_ref.grad)
    if dtype == torch.float64:
        torch.testing.assert_close(token.grad, token_ref.grad, rtol=1e-12, atol=1e-12)
    else:
        # fp32 accumulation in a fixed order vs torch's own reduction order.
        torch.testing.assert_close(token.grad.double(), token_ref.grad.double(),
                                   rtol=2e-2, atol=2e-2 * math.sqrt(max(1, x.shape[0] * x.shape[1])))


def _masked_pair(n=3, L=10, d=4, ratio=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, d, dtype=torch.float64, generator=g)
    noise = torch.rand(n, L, dtype=torch.float64, generator=g)
    return x, noise, ratio


def test_gradcheck_random_masking_and_unshuffle():
    x, noise, ratio = _masked_pair()
    x.requires_grad_(True)
    token = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x, token):
        r = ops.random_masking(x, ratio, noise=noise)
        return ops.unshuffle_tokens(r.visible * 2, r.ids_restore, token)

    assert torch.autograd.gradcheck(fn, (x, token))
    assert torch.autograd.gradgradcheck(fn, (x, token))


def test_opcheck_all_masking_ops():
    x, noise, ratio = _masked_pair()
    x.requires_grad_(True)
    ids_restore = reference.random_masking(x, ratio, noise)[3]
    visible = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    token = torch.randn(4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 10, 4, dtype=torch.float64, requires_grad=True)
    seeds = torch.tensor([1, 2, -3], dtype=torch.int64)
    cases = [
        (torch.ops.pyssl.random_masking.default, (x, noise, 4)),
        (torch.ops.pyssl.random_masking.default, (x.float(), noise.half(), 0)),
        (torch.ops.pyssl.unshuffle_tokens.default, (visible, ids_restore, token, True)),
        (torch.ops.pyssl.unshuffle_tokens.default, (visible.bfloat16(), ids_restore, token.bfloat16(), False)),
        (torch.ops.pyssl.unshuffle_tokens_backward.default, (grad, ids_restore, 4, True)),
        (torch.ops.pyssl.unshuffle_tokens_backward.default, (grad, ids_restore, 4, False)),
        (torch.ops.pyssl.block_masking.default, (seeds, 5, 6, 9, 4, 9, 0.3, 1 / 0.3, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


class _TinyMAE(torch.nn.Module):
    def __init__(self, d=8, L=12):
        super().__init__()
        self.enc = torch.nn.Linear(d, d)
        self.dec = torch.nn.Linear(d, d)
        self.token = torch.nn.Parameter(torch.randn(d))

    def forward(self, x, noise):
        r = ops.random_masking(x, 0.75, noise=noise)
        latent = self.enc(r.visible)
        full = ops.unshuffle_tokens(latent, r.ids_restore, self.token, validate=False)
        pred = self.dec(full)
        loss = ((pred - x) ** 2).mean(-1)
        return (loss * r.mask).sum() / r.mask.sum()


def test_compile_fullgraph_mae_step():
    torch.manual_seed(0)
    model = _TinyMAE()
    x = torch.randn(4, 12, 8)
    noise = torch.rand(4, 12)
    eager = model(x, noise)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, noise)
    out.backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_compile_block_masking():
    fn = torch.compile(lambda seeds: torch.ops.pyssl.block_masking(seeds, 14, 14, 75, 4, 75, 0.3,
                                                                   1 / 0.3, True),
                       fullgraph=True)
    seeds = torch.arange(5, dtype=torch.int64)
    assert torch.equal(fn(seeds), reference.block_masking(seeds, 14, 14, 75))


# --------------------------------------------------------------------------------------------
# Randomness, determinism, empty inputs
# --------------------------------------------------------------------------------------------


def test_random_masking_generator_and_thread_count_determinism():
    x = torch.randn(64, 49, 16)
    results = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            g = torch.Generator().manual_seed(123)
            results.append(ops.random_masking(x, 0.75, generator=g))
        finally:
            torch.set_num_threads(prev)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # and it is the MAE algorithm on the generator's uniform noise
    g = torch.Generator().manual_seed(123)
    noise = torch.rand(64, 49, generator=g)
    for a, b in zip(results[0], reference.random_masking(x, 0.75, noise)):
        assert torch.equal(a, b)


def test_mask_token_gradient_is_bitwise_repeatable():
    g = torch.Generator().manual_seed(0)
    visible = torch.randn(32, 30, 64, generator=g)
    ids = reference.random_masking(torch.zeros(32, 120, 1), 0.75, torch.rand(32, 120, generator=g))[3]
    grads = []
    for threads in (1, 2, 1):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            token = torch.zeros(64, requires_grad=True)
            out = ops.unshuffle_tokens(visible, ids, token)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
            grads.append(token.grad)
        finally:
            torch.set_num_threads(prev)
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])


def test_empty_batch_and_edges():
    x = torch.randn(0, 7, 3)
    r = ops.random_masking(x, 0.5)
    assert r.visible.shape == (0, 3, 3) and r.mask.shape == (0, 7)
    assert r.ids_keep.shape == (0, 3) and r.ids_restore.shape == (0, 7)
    assert ops.unshuffle_tokens(r.visible, r.ids_restore, torch.zeros(3)).shape == (0, 7, 3)
    # K = 0 kept tokens
    r = ops.random_masking(torch.randn(2, 1, 3), 0.5)
    assert r.visible.shape == (2, 0, 3) and r.mask.all()
    # D = 0
    r = ops.random_masking(torch.randn(2, 5, 0, requires_grad=True), 0.4)
    assert r.visible.shape == (2, 3, 0)
    assert ops.block_masking(0, 14, 14, 75).shape == (0, 14, 14)
    assert not ops.block_masking(3, 4, 4, 0).any()
    assert ops.block_masking(3, 4, 4, 16).all()


# --------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.random_masking(torch.randn(4, 5), 0.5), "x must be a 3-D"),
        (lambda: ops.random_masking(torch.randn(2, 4, 5), 1.0), "mask_ratio"),
        (lambda: ops.random_masking(torch.randn(2, 4, 5), -0.1), "mask_ratio"),
        (lambda: ops.random_masking(torch.randn(2, 4, 5), "a"), "mask_ratio"),
        (lambda: ops.random_masking(torch.randn(2, 4, 5), 0.5, noise=torch.rand(2, 5)), "noise"),
        (lambda: ops.random_masking([1, 2], 0.5), "x must be a torch.Tensor"),
        (lambda: torch.ops.pyssl.random_masking(torch.randn(2, 4, 5), torch.rand(2, 4), 9), "len_keep"),
        (lambda: torch.ops.pyssl.random_masking(torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long), 2), "noise"),
        (lambda: ops.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 5]] * 2), torch.zeros(4)), "ids_restore"),
        (lambda: ops.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor([[0, 1, 1, 2]] * 2), torch.zeros(4)), "ids_restore"),
        (lambda: ops.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor([[0, 1, -1, 2]] * 2), torch.zeros(4)), "ids_restore"),
        (lambda: ops.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor([[0, 1, 3, 2]] * 2), torch.zeros(5)), "mask_token"),
        (lambda: ops.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor([[0, 1, 3, 2]] * 2).int(), torch.zeros(4)), "ids_restore"),
        (lambda: ops.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor([[0, 1, 3, 2]] * 3), torch.zeros(4)), "ids_restore"),
        (lambda: ops.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor([[0, 1]] * 2), torch.zeros(4)), "ids_restore"),
        (lambda: ops.unshuffle_tokens(torch.randn(2, 3, 4), torch.tensor([[0, 1, 3, 2]] * 2), torch.zeros(4).double()), "mask_token"),
        (lambda: ops.unshuffle_tokens(torch.randn(3, 4), torch.tensor([[0, 1, 3, 2]] * 2), torch.zeros(4)), "visible"),
        (lambda: ops.block_masking(2, 4, 4, 17), "num_masking_patches"),
        (lambda: ops.block_masking(-1, 4, 4, 3), "batch_size"),
        (lambda: ops.block_masking(2, 4, 4, 3, min_aspect=0), "min_aspect"),
        (lambda: ops.block_masking(2, 4, 4, 3, min_aspect=2, max_aspect=1), "max_aspect"),
        (lambda: ops.block_masking(2, 4.5, 4, 3), "height"),
        (lambda: ops.block_masking(2, 4, 4, 3, max_num_patches=0), "max_num_patches"),
        (lambda: ops.block_masking(8, 14, 14, 75, min_num_patches=16, max_num_patches=8), r"max_num_patches \(8\) must be >= min_num_patches \(16\)"),
        (lambda: ops.block_masking(2, 4, 4, 3, min_aspect=2.0), "max_aspect"),
        (lambda: ops.block_masking(2, 4, 4, 3, min_aspect="0.3"), "min_aspect"),
        (lambda: ops.block_masking(2, 4, 4, 3, max_aspect="3"), "max_aspect"),
        (lambda: ops.block_masking(2, 2**33, 2**31, 3), "height\\*width"),
        (lambda: torch.ops.pyssl.block_masking(torch.zeros(2, dtype=torch.long), 2**33, 2**31, 3, 4, 3, 0.3, 3.0, True), "height\\*width"),
        (lambda: ops.block_masking(2, 4, 4, 3, generator=5), "generator"),
        (lambda: ops.random_masking(torch.randn(2, 4, 5), 0.5, generator=5), "generator"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


def test_cross_device_inputs_are_rejected():
    # The meta device stands in for "another device".
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="noise"):
        ops.random_masking(x, 0.5, noise=torch.rand(2, 4, device="meta"))
    # A meta tensor among CPU tensors reaches the fake kernel, which must refuse rather than
    # return uninitialised memory.
    ids = torch.stack([torch.randperm(5) for _ in range(2)])
    with pytest.raises(RuntimeError, match="ids_restore"):
        ops.unshuffle_tokens(x, ids.to("meta"), torch.zeros(3))
    with pytest.raises(RuntimeError, match="mask_token"):
        ops.unshuffle_tokens(x, ids, torch.zeros(3, device="meta"))


@pytest.mark.cuda
def test_cuda_cross_device_inputs_are_rejected():
    x = torch.randn(2, 4, 3, device="cuda")
    with pytest.raises(RuntimeError, match="noise"):
        ops.random_masking(x, 0.5, noise=torch.rand(2, 4))
    with pytest.raises(RuntimeError, match="ids_restore"):
        ops.unshuffle_tokens(x, torch.arange(5).repeat(2, 1), torch.zeros(3, device="cuda"))


# --------------------------------------------------------------------------------------------
# Block masking
# --------------------------------------------------------------------------------------------


@given(
    seed=st.integers(-(2**63), 2**63 - 1),
    n=st.integers(1, 4),
    h=st.integers(1, 16),
    w=st.integers(1, 16),
    frac=st.floats(0, 1),
    min_patches=st.integers(0, 20),
    max_extra=st.one_of(st.none(), st.integers(0, 100)),
    min_aspect=st.floats(0.1, 1.0),
    exact=st.booleans(),
)
def test_block_masking_kernel_equals_python_reference(seed, n, h, w, frac, min_patches,
                                                      max_extra, min_aspect, exact):
    num = int(round(frac * h * w))
    max_patches = None if max_extra is None else max(1, min_patches + max_extra)
    g1 = torch.Generator().manual_seed(seed % 2**63)
    got = ops.block_masking(n, h, w, num, min_num_patches=min_patches,
                            max_num_patches=max_patches, min_aspect=min_aspect, exact=exact,
                            generator=g1)
    g2 = torch.Generator().manual_seed(seed % 2**63)
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=g2)
    want = reference.block_masking(seeds, h, w, num, min_patches, max_patches, min_aspect,
                                   None, exact)
    assert torch.equal(got, want)
    counts = got.flatten(1).sum(1)
    if exact:
        assert (counts == num).all()
    else:
        assert (counts <= num).all()


def test_block_masking_extreme_aspect_ratios_terminate():
    # Sides of ~1e20 patches once overflowed int64 in the kernel and looped ~2**63 times; run
    # in a subprocess so that a regression fails instead of hanging the suite.
    code = (
        "import torch\n"
        "from pyssl import ops\n"
        "from pyssl.ops import reference\n"
        "for lo, hi in ((0.3, 1e40), (1e-300, None), (1e38, 1e39)):\n"
        "    g = torch.Generator().manual_seed(3)\n"
        "    got = ops.block_masking(4, 14, 14, 75, min_aspect=lo, max_aspect=hi, generator=g)\n"
        "    seeds = torch.randint(-(2**63), 2**63 - 1, (4,), generator=torch.Generator().manual_seed(3))\n"
        "    want = reference.block_masking(seeds, 14, 14, 75, 4, None, lo, hi, True)\n"
        "    assert torch.equal(got, want) and (got.flatten(1).sum(1) == 75).all()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_block_masking_exact_counts_and_thread_independence():
    masks = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            masks.append(ops.block_masking(256, 14, 14, 75, generator=torch.Generator().manual_seed(7)))
        finally:
            torch.set_num_threads(prev)
    assert torch.equal(masks[0], masks[1])
    assert (masks[0].flatten(1).sum(1) == 75).all()
    # different samples differ
    assert len({tuple(m.flatten().tolist()) for m in masks[0]}) > 250


def _components_and_neighbours(masks: torch.Tensor):
    comps, neigh = [], []
    for m in masks.numpy():
        comps.append(ndimage.label(m)[1])  # 4-connectivity
        neigh.append(int((m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum()))
    return np.mean(comps), np.mean(neigh)


def test_block_masks_are_far_more_clustered_than_iid_masks():
    g = torch.Generator().manual_seed(0)
    block = ops.block_masking(512, 14, 14, 75, generator=g)
    noise = torch.rand(512, 196, generator=g)
    iid = torch.zeros(512, 196, dtype=torch.bool)
    iid.scatter_(1, noise.argsort(1)[:, :75], True)
    iid = iid.view(512, 14, 14)
    assert (iid.flatten(1).sum(1) == 75).all()
    bc, bn = _components_and_neighbours(block)
    ic, inn = _components_and_neighbours(iid)
    # Measured here: ~2.3 components and ~122 masked neighbour pairs per block mask vs ~25.6
    # and ~53 for iid masks of the same count.
    assert bc < 0.5 * ic, (bc, ic)
    assert bn > 1.5 * inn, (bn, inn)


# --------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels (run on the GPU machine)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 7, 196, 1000, 9000])
def test_cuda_random_masking_and_unshuffle_match_cpu(dtype, L):
    g = torch.Generator().manual_seed(L)
    N, D = 9, 35
    x = torch.randn(N, L, D, generator=g).to(dtype)
    noise = torch.randint(0, 50, (N, L), generator=g).to(dtype)  # ties
    noise[0, : min(L, 3)] = math.nan
    if L >= 6:  # NaNs of either sign sort last by index; -0.0 ties with +0.0
        noise[1, :6] = torch.tensor([0.0, -0.0, -math.nan, 0.0, -0.0, math.nan]).to(dtype)
    cpu = ops.random_masking(x, 0.75, noise=noise)
    xc = x.cuda().requires_grad_(True)
    gpu = ops.random_masking(xc, 0.75, noise=noise.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    token = torch.randn(D, generator=g).to(dtype).cuda().requires_grad_(True)
    out = ops.unshuffle_tokens(gpu.visible, gpu.ids_restore, token)
    want = reference.unshuffle_tokens(gpu.visible.detach().cpu(), cpu.ids_restore, token.detach().cpu())
    assert torch.equal(out.cpu(), want)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad.cuda())
    xr = x.clone().requires_grad_(True)
    tr = token.detach().cpu().requires_grad_(True)
    r = ops.random_masking(xr, 0.75, noise=noise)
    ops.unshuffle_tokens(r.visible, r.ids_restore, tr).backward(grad)
    assert torch.equal(xc.grad.cpu(), xr.grad)
    torch.testing.assert_close(token.grad.cpu().double(), tr.grad.double(), rtol=1e-2, atol=1e-2)
    # repeatable
    token2 = token.detach().clone().requires_grad_(True)
    ops.unshuffle_tokens(gpu.visible.detach(), gpu.ids_restore, token2).backward(grad.cuda())
    assert torch.equal(token2.grad, token.grad)


@pytest.mark.cuda
def test_cuda_unshuffle_validation_and_block_masking():
    with pytest.raises(ValueError, match="ids_restore"):
        ops.unshuffle_tokens(torch.randn(2, 3, 4, device="cuda"),
                             torch.tensor([[0, 1, 1, 2]] * 2, device="cuda"),
                             torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="ids_restore"):
        ops.unshuffle_tokens(torch.randn(2, 3, 4, device="cuda"),
                             torch.tensor([[0, 1, 9, 2]] * 2, device="cuda"),
                             torch.zeros(4, device="cuda"))
    seeds = torch.randint(-(2**63), 2**63 - 1, (256,), dtype=torch.int64)
    cpu = torch.ops.pyssl.block_masking(seeds, 14, 14, 75, 4, 75, 0.3, 1 / 0.3, True)
    gpu = torch.ops.pyssl.block_masking(seeds.cuda(), 14, 14, 75, 4, 75, 0.3, 1 / 0.3, True)
    assert (gpu.flatten(1).sum(1) == 75).all()
    # Same streams; exp() on the device may differ from glibc in the last bit, which can flip
    # a rounding in rare cases.
    same = (gpu.cpu() == cpu).flatten(1).all(1).float().mean().item()
    assert same > 0.98, same


@pytest.mark.cuda
def test_cuda_opcheck_and_gradcheck():
    x, noise, ratio = _masked_pair()
    x = x.cuda().requires_grad_(True)
    noise = noise.cuda()
    token = torch.randn(4, dtype=torch.float64, device="cuda", requires_grad=True)
    ids_restore = reference.random_masking(x, ratio, noise)[3]
    torch.library.opcheck(torch.ops.pyssl.random_masking.default, (x, noise, 4))
    torch.library.opcheck(torch.ops.pyssl.unshuffle_tokens.default,
                          (torch.randn(3, 4, 4, dtype=torch.float64, device="cuda", requires_grad=True),
                           ids_restore, token, True))
    torch.library.opcheck(torch.ops.pyssl.block_masking.default,
                          (torch.tensor([1, 2], device="cuda"), 5, 6, 9, 4, 9, 0.3, 1 / 0.3, True))

    def fn(x, token):
        r = ops.random_masking(x, ratio, noise=noise)
        return ops.unshuffle_tokens(r.visible, r.ids_restore, token)

    assert torch.autograd.gradcheck(fn, (x, token))


def test_unshuffle_without_validation_keeps_forward_and_token_gradient_consistent():
    # validate=False trusts ids_restore; out-of-range ids (here -1 and L) then read mask_token,
    # and the mask-token gradient must sum exactly the positions that read it.
    vis = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, -1, 3, 2, 1, 9], [5, 4, 3, 2, 1, 0]])
    out = ops.unshuffle_tokens(vis, ids, tok, validate=False)
    reads_token = (ids < 0) | (ids >= 3)
    torch.testing.assert_close(out[reads_token], tok.expand(int(reads_token.sum()), 4))
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(tok.grad, g[reads_token].sum(0))
