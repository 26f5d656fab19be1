"""Fused DINO loss, iBOT patch loss and Sinkhorn-Knopp centering against the published
algorithms in plain PyTorch (pyssl.ops.reference), in float64."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyssl import ops
from pyssl.ops import reference

# K values around the kernel's 4096-wide chunks and its 16- and 32-wide lanes
K_VALUES = [1, 2, 15, 17, 31, 33, 63, 65, 257, 4095, 4096, 4097, 9001]


@st.composite
def dino_inputs(draw, dtype=torch.float64, max_k=None):
    B = draw(st.integers(1, 4))
    S = draw(st.integers(1, 6))
    T = draw(st.integers(1, min(S, 3)))
    skip = draw(st.booleans())
    if skip and T * S - T == 0:
        skip = False
    K = draw(st.one_of(st.sampled_from(K_VALUES), st.integers(1, 300)))
    if max_k:
        K = min(K, max_k)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(S * B, K, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(T * B, K, generator=g, dtype=torch.float64) * scale).to(dtype)
    if draw(st.booleans()):  # ties
        teacher = teacher.round()
        student = student.round()
    center = torch.randn(K, generator=g, dtype=torch.float64) * 0.1
    ts = draw(st.sampled_from([0.1, 0.2, 1.0]))
    tt = draw(st.sampled_from([0.01, 0.04, 0.07]))
    return dict(student=student, teacher=teacher, center=center, n_teacher_crops=T,
                student_temp=ts, teacher_temp=tt, skip_same_view=skip)


def _run(fn, a, student_dtype=None):
    student = a["student"].detach().clone().requires_grad_(True)
    kw = {k: v for k, v in a.items() if k not in ("student", "teacher", "center")}
    loss, mean = fn(student, a["teacher"], a["center"], **kw)
    (grad,) = torch.autograd.grad(loss, student)
    return loss, mean, grad


@given(a=dino_inputs())
def test_dino_loss_matches_pair_loop_float64(a):
    loss, mean, grad = _run(ops.dino_loss, a)
    rloss, rmean, rgrad = _run(reference.dino_loss, a)
    torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean, rmean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, rgrad, rtol=1e-9, atol=1e-12)


@given(a=dino_inputs(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_dino_loss_reduced_precision_within_tolerance(a, dtype):
    # inputs rounded to the dtype; the reference runs in float64 on the same rounded values
    a = dict(a, student=a["student"].to(dtype), teacher=a["teacher"].to(dtype))
    loss, mean, grad = _run(ops.dino_loss, a)
    ref = dict(a, student=a["student"].double(), teacher=a["teacher"].double())
    rloss, rmean, rgrad = _run(reference.dino_loss, ref)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # fp32 math on logits / temperature of up to ~1e3: relative error ~1e-6 of the logit scale
    # (the teacher's logits are centred before the temperature: teacher - center)
    scale = float(ref["student"].abs().max() / a["student_temp"]
                  + (ref["teacher"] - ref["center"]).abs().max() / a["teacher_temp"] + 1)
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-5, atol=1e-5)
    # |dL/ds| <= T / (B * n_terms * student_temp); fp32 logits/temperature carry an absolute
    # error ~ scale * eps into p and q, and the output dtype rounds the gradient.
    T = a["n_teacher_crops"]
    B = a["teacher"].shape[0] // T
    S = a["student"].shape[0] // B
    n_terms = T * S - (T if a["skip_same_view"] else 0)
    bound = T / (B * n_terms * a["student_temp"])
    out_eps = {torch.float32: 1e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad.double(), rgrad, rtol=out_eps * 2,
                               atol=bound * (out_eps + 4e-7 * scale))


@pytest.mark.parametrize("dtype,B,S,T,skip", [(torch.float32, 3, 4, 2, True),
                                               (torch.float64, 2, 5, 3, False),
                                               (torch.float64, 1, 3, 1, True)])
def test_dino_loss_large_k(dtype, B, S, T, skip):
    # K = 70000: not a multiple of any tile or chunk size (256, 1024, 4096, ...)
    g = torch.Generator().manual_seed(0)
    K = 70000
    a = dict(student=torch.randn(S * B, K, generator=g, dtype=torch.float64),
             teacher=torch.randn(T * B, K, generator=g, dtype=torch.float64),
             center=torch.randn(K, generator=g, dtype=torch.float64) * 0.1, n_teacher_crops=T,
             student_temp=0.1, teacher_temp=0.04, skip_same_view=skip)
    rloss, rmean, rgrad = _run(reference.dino_loss, a)
    loss, mean, grad = _run(ops.dino_loss, dict(a, student=a["student"].to(dtype), teacher=a["teacher"].to(dtype)))
    if dtype == torch.float64:
        torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, rgrad, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(mean, rmean, rtol=1e-12, atol=1e-12)
        return
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-6, atol=1e-6)


def test_float16_rows_are_read_and_written_in_place_on_the_cpu():
    """fp16 logits are read as they are (no float32 copy) and the gradient written in fp16: the
    same loss as float32 rows holding the same values, and the same gradient bits as the float32
    gradient rounded by torch, from tiny (subnormal fp16) to overflowing (inf) gradients; every
    finite fp16 value converts exactly (one-column rows of offset_logsumexp return them)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16).reshape(-1, 1)
    got = torch.ops.pyssl.offset_logsumexp(x, None, None, 1.0, 1)
    want = x.float().reshape(-1)
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(got[~finite].isnan(), torch.ops.pyssl.offset_logsumexp(x.float()[~finite], None, None, 1.0, 1).isnan())
    g = torch.Generator().manual_seed(0)
    B, S, T, K = 4, 6, 2, 3001
    s = (torch.randn(S * B, K, generator=g) * 3).half()
    t = (torch.randn(T * B, K, generator=g) * 3).half()
    c = torch.randn(K, generator=g) * 0.1
    counts = {"subnormal": 0, "inf": 0}
    for scale in (1e-6, 1.0, 1e6, 3e7):
        s16, s32 = s.clone().requires_grad_(True), s.float().requires_grad_(True)
        l16, m16 = ops.dino_loss(s16, t, c)
        l32, m32 = ops.dino_loss(s32, t.float(), c)
        assert torch.equal(l16, l32) and torch.equal(m16, m32)
        (g16,) = torch.autograd.grad(l16 * scale, s16)
        (g32,) = torch.autograd.grad(l32 * scale, s32)
        assert g16.dtype == torch.float16
        assert torch.equal(g16.view(torch.int16), g32.half().view(torch.int16))
        counts["subnormal"] += int(((g16.abs() < 2.0 ** -14) & (g16 != 0)).sum())
        counts["inf"] += int(g16.isinf().sum())
    assert counts["subnormal"] > 100 and counts["inf"] > 100  # both roundings were exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_stay_finite(dtype):
    g = torch.Generator().manual_seed(1)
    B, S, T, K = 2, 4, 2, 5000
    student = ((torch.rand(S * B, K, generator=g) * 2 - 1) * 1e4).to(dtype).requires_grad_(True)
    teacher = ((torch.rand(T * B, K, generator=g) * 2 - 1) * 1e4).to(dtype)
    center = torch.zeros(K)
    loss, mean = ops.dino_loss(student, teacher, center, teacher_temp=0.01, student_temp=0.1)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(mean).all() and torch.isfinite(grad).all()
    rloss, _ = reference.dino_loss(student.double(), teacher.double(), center.double(),
                                   teacher_temp=0.01, student_temp=0.1)
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-4, atol=0)


def test_minus_inf_logits_are_masked_prototypes(device):
    """-inf is a logit of probability 0 (as in torch's softmax): a teacher row with masked
    prototypes gives the reference's finite loss and gradient; NaN and +inf give NaN."""
    g = torch.Generator().manual_seed(5)
    B, S, T, K = 3, 4, 2, 4200
    s = torch.randn(S * B, K, generator=g, dtype=torch.float64)
    t = torch.randn(T * B, K, generator=g, dtype=torch.float64)
    c = torch.randn(K, generator=g, dtype=torch.float64) * 0.1
    # masked prototypes in two teacher rows, one with a whole 4096-wide kernel chunk of them
    t[0, 7] = t[4, :4100] = -math.inf
    rs = s.clone().requires_grad_(True)
    rloss, rmean = reference.dino_loss(rs, t, c)
    (rgrad,) = torch.autograd.grad(rloss, rs)
    assert torch.isfinite(rloss)
    for dtype in (torch.float64, torch.float32):
        xs = s.to(device, dtype).requires_grad_(True)
        loss, mean = ops.dino_loss(xs, t.to(device, dtype), c.to(device, dtype))
        (grad,) = torch.autograd.grad(loss, xs)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(loss.cpu().double(), rloss, rtol=tol, atol=tol)
        torch.testing.assert_close(grad.cpu().double(), rgrad, rtol=tol, atol=tol)
        torch.testing.assert_close(mean.cpu().double(), rmean, rtol=tol, atol=tol)
    for bad in (math.nan, math.inf):
        tb, sb = t.clone(), s.clone()
        tb[1, 3] = sb[5, 3] = bad
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            to = dict(device=device, dtype=dtype)
            assert torch.isnan(ops.dino_loss(s.to(**to), tb.to(**to), c.to(**to)).loss)
            assert torch.isnan(ops.dino_loss(sb.to(**to), t.to(**to), c.to(**to)).loss)
    # A student chunk of -inf (crop 1 of image 2, paired with a teacher row without -inf):
    # log p = -inf where q > 0, an infinite loss, as in the reference. In float32 some q
    # underflow to 0 (teacher_temp 0.04), and 0 * log 0 is NaN, in the reference too.
    sb = s.clone()
    sb[5, :4100] = -math.inf
    assert reference.dino_loss(sb, t, c)[0] == math.inf
    assert ops.dino_loss(sb.to(device), t.to(device), c.to(device)).loss == math.inf
    ref32 = reference.dino_loss(sb.float(), t.float(), c.float())[0]
    loss32 = ops.dino_loss(sb.to(device, torch.float32), t.to(device, torch.float32),
                           c.to(device, torch.float32)).loss
    assert torch.isnan(ref32) and torch.isnan(loss32)
    # The same prototype masked in a student row and a teacher row: 0 * log 0, NaN in float64
    # and in the reference; float32 must agree (its fast exp once gave exp(-inf) ~ 1e-38, +inf).
    sb, tb = s.clone(), t.clone()
    sb[:, 11] = tb[:, 11] = -math.inf
    assert torch.isnan(reference.dino_loss(sb, tb, c)[0])
    for dtype in (torch.float64, torch.float32):
        assert torch.isnan(ops.dino_loss(sb.to(device, dtype), tb.to(device, dtype),
                                         c.to(device, dtype)).loss)
    # A column of -inf: its log-sum-exp is -inf in every dtype (Sinkhorn-Knopp's offsets).
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x[:, 2] = -math.inf
    for dtype in (torch.float64, torch.float32):
        col = torch.ops.pyssl.offset_logsumexp(x.to(device, dtype), None, None, 25.0, 0)
        assert col[2] == -math.inf and torch.isfinite(col[[0, 1, 3]]).all()
    # +inf anywhere in a column or row: NaN (as the loss)
    x[1, 0] = math.inf
    for dim in (0, 1):
        lse = torch.ops.pyssl.offset_logsumexp(x.to(device, torch.float32), None, None, 1.0, dim)
        assert torch.isnan(lse[0] if dim == 0 else lse[1])


def test_nan_logits_give_nan_not_a_crash():
    s = torch.randn(4, 10)
    s[2, 3] = math.nan  # crop 1 (crop 0 is the teacher's own view and is skipped)
    loss, _ = ops.dino_loss(s, torch.randn(2, 10), torch.zeros(10), n_teacher_crops=1)
    assert torch.isnan(loss)


def test_gradcheck_small():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64, generator=g)
    c = torch.randn(7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda s: ops.dino_loss(s, t, c, n_teacher_crops=2).loss, (s,))
    w = torch.rand(6, dtype=torch.float64, generator=g)
    tp = torch.randn(6, 7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda s: ops.ibot_patch_loss(s, tp, c, w).loss, (s,))


def test_opcheck():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 9, generator=g, requires_grad=True)
    t = torch.randn(4, 9, generator=g)
    c = torch.randn(9, generator=g)
    w = torch.rand(2, generator=g)
    torch.library.opcheck(torch.ops.pyssl.dino_loss.default, (s, t, c, None, 2, 0.1, 0.04, True))
    torch.library.opcheck(torch.ops.pyssl.dino_loss.default, (s.double(), t.double(), c.double(), w.double(), 2, 0.1, 0.04, False))
    torch.library.opcheck(torch.ops.pyssl.dino_loss.default, (s.bfloat16(), t.bfloat16(), c, None, 2, 0.1, 0.04, True))
    _, _, slse, tlse = torch.ops.pyssl.dino_loss(s, t, c, None, 2, 0.1, 0.04, True)
    torch.library.opcheck(torch.ops.pyssl.dino_loss_backward.default,
                          (torch.tensor(1.0), s.detach(), t, c, None, slse, tlse, 2, 0.1, 0.04, True))
    torch.library.opcheck(torch.ops.pyssl.offset_logsumexp.default, (t, None, c, 25.0, 0))
    torch.library.opcheck(torch.ops.pyssl.offset_logsumexp.default, (t, torch.randn(4), None, 25.0, 1))


def test_compile_fullgraph_dino_step():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 300)
    x = torch.randn(12, 8)
    teacher = torch.randn(4, 300)
    center = torch.zeros(300)

    def step(x):
        return ops.dino_loss(head(x), teacher, center, n_teacher_crops=2).loss

    eager = step(x)
    eager.backward()
    g_eager = head.weight.grad.clone()
    head.zero_grad()
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(head.weight.grad, g_eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_repeatable_across_thread_counts(dtype):
    # 20 images: a full block of 16 and a partial one; K = 9000: three chunks, the last partial
    g = torch.Generator().manual_seed(4)
    s = torch.randn(12 * 20, 9000, generator=g).to(dtype)
    t = torch.randn(2 * 20, 9000, generator=g).to(dtype)
    c = torch.randn(9000, generator=g)
    results = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            ss = s.clone().requires_grad_(True)
            loss, mean = ops.dino_loss(ss, t, c)
            loss.backward()
            results.append((loss, mean, ss.grad))
    finally:
        torch.set_num_threads(prev)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 6), torch.zeros(5)), "K"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(3, 5), torch.zeros(5)), "n_teacher_crops"),
        (lambda: ops.dino_loss(torch.randn(7, 5), torch.randn(4, 5), torch.zeros(5)), "student"),
        (lambda: ops.dino_loss(torch.randn(2, 5), torch.randn(4, 5), torch.zeros(5)), "n_teacher_crops"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5), student_temp=0), "student_temp"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5), teacher_temp=-1), "teacher_temp"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 5), torch.zeros(4)), "center"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5), n_teacher_crops=0), "n_teacher_crops"),
        (lambda: ops.dino_loss(torch.randn(2, 5), torch.randn(2, 5), torch.zeros(5), n_teacher_crops=1), "skip_same_view"),
        (lambda: ops.dino_loss(torch.randn(6, 5).long(), torch.randn(4, 5), torch.zeros(5)), "student"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(0, 5), torch.zeros(5)), "teacher"),
        (lambda: ops.dino_loss(torch.randn(30), torch.randn(4, 5), torch.zeros(5)), "student"),
        (lambda: ops.ibot_patch_loss(torch.randn(3, 5), torch.randn(4, 5), torch.zeros(5), torch.ones(3)), "teacher_patches"),
        (lambda: ops.ibot_patch_loss(torch.randn(3, 5), torch.randn(3, 4), torch.zeros(5), torch.ones(3)), "teacher_patches"),
        (lambda: ops.ibot_patch_loss(torch.randn(0, 5), torch.randn(0, 5), torch.zeros(5), torch.ones(0)), "student_patches"),
        (lambda: ops.ibot_patch_loss(torch.randn(15), torch.randn(3, 5), torch.zeros(5), torch.ones(3)), "student_patches"),
        (lambda: ops.ibot_patch_loss(torch.randn(3, 5), torch.randn(3, 5), torch.zeros(4), torch.ones(3)), "center"),
        (lambda: ops.ibot_patch_loss(torch.randn(3, 5), torch.randn(3, 5), None, torch.ones(3)), "center"),
        (lambda: ops.ibot_patch_loss(torch.randn(3, 5), torch.randn(3, 5), torch.zeros(5, device="meta"), torch.ones(3)), "center"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5), n_teacher_crops=2.5), "n_teacher_crops"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5), skip_same_view="no"), "skip_same_view"),
        # One input on the meta device among CPU inputs reaches the fake kernel: it must refuse.
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5, device="meta")), "center"),
        (lambda: ops.dino_loss(torch.randn(6, 5), torch.randn(4, 5, device="meta"), torch.zeros(5)), "teacher"),
        (lambda: ops.sinkhorn_knopp_center(torch.randn(3, 0), 0.1), "teacher"),
        (lambda: ops.sinkhorn_knopp_center(torch.randn(0, 5), 0.1), "teacher"),
        (lambda: ops.ibot_patch_loss(torch.randn(3, 5), torch.randn(3, 5), torch.zeros(5), torch.ones(4)), "weights"),
        (lambda: ops.sinkhorn_knopp_center(torch.randn(3, 5), 0.0), "teacher_temp"),
        (lambda: ops.sinkhorn_knopp_center(torch.randn(3, 5), 0.1, 0), "n_iterations"),
        # the internal ops validate their auxiliary inputs too (torch.ops callers skip Python)
        (lambda: torch.ops.pyssl.dino_loss_backward(torch.tensor(1.0), torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5), None,
                                                    torch.zeros(6, dtype=torch.long), torch.zeros(4), 2, 0.1, 0.04, True), "student_lse must have dtype"),
        (lambda: torch.ops.pyssl.dino_loss_backward(torch.tensor(1.0 + 1j), torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5), None,
                                                    torch.zeros(6), torch.zeros(4), 2, 0.1, 0.04, True), "grad_loss must have dtype"),
        (lambda: torch.ops.pyssl.dino_loss_backward(torch.tensor(1.0), torch.randn(6, 5), torch.randn(4, 5), torch.zeros(5), None,
                                                    torch.zeros(6), torch.zeros(5), 2, 0.1, 0.04, True), "expected 6 and 4 values, got 6 and 5"),
        (lambda: torch.ops.pyssl.offset_logsumexp(torch.randn(3, 4), None, torch.zeros(4, dtype=torch.complex64), 1.0, 1), "col_offset must have dtype"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


# --------------------------------------------------------------------------------------------
# iBOT
# --------------------------------------------------------------------------------------------


@given(M=st.integers(1, 40), K=st.one_of(st.sampled_from(K_VALUES), st.integers(1, 200)),
       seed=st.integers(0, 2**31 - 1), tt=st.sampled_from([0.04, 0.07]))
def test_ibot_patch_loss_matches_reference(M, K, seed, tt):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(M, K, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(M, K, generator=g, dtype=torch.float64)
    c = torch.randn(K, generator=g, dtype=torch.float64) * 0.1
    w = torch.rand(M, generator=g, dtype=torch.float64)
    loss, mean = ops.ibot_patch_loss(s, t, c, w, teacher_temp=tt)
    rloss, rmean = reference.ibot_patch_loss(s, t, c, w, teacher_temp=tt)
    torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean, rmean)
    (g1,) = torch.autograd.grad(loss, s)
    (g2,) = torch.autograd.grad(rloss, s)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_ibot_weights_normalise_per_image():
    masks = torch.tensor([[True, True, False, False], [False, True, False, False], [False] * 4])
    w = ops.ibot_weights(masks)
    torch.testing.assert_close(w, torch.tensor([1 / 6, 1 / 6, 1 / 3]))


# --------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------


@given(R=st.integers(1, 20), K=st.one_of(st.sampled_from([1, 3, 4097]), st.integers(1, 100)),
       seed=st.integers(0, 2**31 - 1), iters=st.integers(1, 4), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_sinkhorn_knopp_matches_dinov2_where_it_does_not_overflow(R, K, seed, iters, dtype):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(R, K, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    got = ops.sinkhorn_knopp(t, 0.1, iters)
    want = reference.sinkhorn_knopp(t, 0.1, iters)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # and the fused loss with the Sinkhorn centre trains on exactly these targets
    s = torch.randn(R, K, generator=g, dtype=torch.float64)
    center = ops.sinkhorn_knopp_center(t.double(), 0.1, iters)
    loss = ops.dino_loss(s, t.double(), center, n_teacher_crops=1, teacher_temp=0.1,
                         skip_same_view=False).loss
    ref = (-(want * torch.log_softmax(s / 0.1, -1)).sum(-1)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)


def test_sinkhorn_knopp_log_domain_never_overflows():
    g = torch.Generator().manual_seed(5)
    t = (torch.rand(64, 1000, generator=g) * 2 - 1) * 1e3
    q = ops.sinkhorn_knopp(t, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(64), rtol=1e-5, atol=1e-5)
    assert torch.isnan(reference.sinkhorn_knopp(t, 0.04)).any()  # the published version overflows


@given(R=st.integers(1, 9), K=st.one_of(st.sampled_from([1, 4095, 4097]), st.integers(1, 50)),
       dim=st.sampled_from([0, 1]), row=st.booleans(), col=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_offset_logsumexp_matches_reference(R, K, dim, row, col, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g, dtype=torch.float64) * 5
    ro = torch.randn(R, generator=g, dtype=torch.float64) if row else None
    co = torch.randn(K, generator=g, dtype=torch.float64) if col else None
    got = torch.ops.pyssl.offset_logsumexp(x, ro, co, 7.0, dim)
    torch.testing.assert_close(got, reference.offset_logsumexp(x, ro, co, 7.0, dim), rtol=1e-12, atol=1e-12)
    got32 = torch.ops.pyssl.offset_logsumexp(x.float(), ro, co, 7.0, dim)
    torch.testing.assert_close(got32.double(), reference.offset_logsumexp(x.float(), ro, co, 7.0, dim), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("K", [1, 17, 4097, 65536])
@pytest.mark.parametrize("crops", [(2, 12, True), (1, 1, False), (2, 2, False)])
def test_cuda_matches_cpu(dtype, K, crops):
    T, S, skip = crops
    B = 5
    g = torch.Generator().manual_seed(K)
    s = torch.randn(S * B, K, generator=g).to(dtype)
    t = torch.randn(T * B, K, generator=g).to(dtype)
    c = torch.randn(K, generator=g) * 0.1
    sc = s.cuda().requires_grad_(True)
    loss, mean = ops.dino_loss(sc, t.cuda(), c.cuda(), n_teacher_crops=T, skip_same_view=skip)
    loss.backward()
    sr = s.clone().requires_grad_(True)
    rl, rm = ops.dino_loss(sr, t, c, n_teacher_crops=T, skip_same_view=skip)
    rl.backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss.cpu(), rl, rtol=tol, atol=tol)
    torch.testing.assert_close(mean.cpu(), rm, rtol=tol, atol=tol)
    gtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    # + 1e-6: at K = 1 the exact gradient is 0 (p = q = 1), the GPU's exp leaves ~1e-8
    torch.testing.assert_close(sc.grad.cpu().double(), sr.grad.double(), rtol=gtol,
                               atol=gtol * float(sr.grad.abs().max()) + 1e-6)
    # bitwise repeatable on the device
    sc2 = s.cuda().requires_grad_(True)
    loss2, _ = ops.dino_loss(sc2, t.cuda(), c.cuda(), n_teacher_crops=T, skip_same_view=skip)
    loss2.backward()
    assert torch.equal(loss2, loss) and torch.equal(sc2.grad, sc.grad)


def special_logit_inputs(special, S, B, K, T=2):
    """Student, teacher and centre with the last 10 logits of teacher row 1 at -inf and, for
    "pos_inf" / "nan", 100 logits of student row 4 at +inf / NaN (K > 1100)."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(S * B, K, generator=g)
    t = torch.randn(T * B, K, generator=g)
    t[1, K - 10:] = -math.inf
    if special != "neg_inf":
        s[4, 1000:1100] = math.inf if special == "pos_inf" else math.nan
    return s, t, torch.zeros(K)


@pytest.mark.cuda
@pytest.mark.parametrize("special", ["neg_inf", "pos_inf", "nan"])
def test_cuda_special_logits_match_cpu(special):
    """-inf teacher logits add nothing; +inf or NaN student logits make the loss NaN, on the
    device as on the CPU (the merge of per-chunk statistics carries them across 40 chunks)."""
    T = 2
    s, t, c = special_logit_inputs(special, S=6, B=3, K=40000, T=T)
    loss, mean = ops.dino_loss(s.cuda(), t.cuda(), c.cuda(), n_teacher_crops=T, skip_same_view=True)
    rl, rm = ops.dino_loss(s, t, c, n_teacher_crops=T, skip_same_view=True)
    assert bool(loss.isnan()) == (special != "neg_inf")
    torch.testing.assert_close(loss.cpu(), rl, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(mean.cpu(), rm, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [64, 2100])
def test_cuda_ibot_many_patches_matches_cpu(M):
    """iBOT pairs thousands of masked patches (rows) with K up to 65536: past 8M per-group column
    sums the teacher mean comes from its own column kernel, not from a [M / 4, K] workspace."""
    g = torch.Generator().manual_seed(M)
    K = 16384
    s = torch.randn(M, K, generator=g)
    t = torch.randn(M, K, generator=g) * 3
    c = torch.randn(K, generator=g) * 0.1
    w = torch.rand(M, generator=g)
    sc = s.cuda().requires_grad_(True)
    loss, mean = ops.ibot_patch_loss(sc, t.cuda(), c.cuda(), w.cuda())
    (grad,) = torch.autograd.grad(loss, sc)
    sr = s.clone().requires_grad_(True)
    rloss, rmean = ops.ibot_patch_loss(sr, t, c, w)
    (rgrad,) = torch.autograd.grad(rloss, sr)
    torch.testing.assert_close(loss.cpu(), rloss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(mean.cpu(), rmean, rtol=1e-5, atol=1e-5)
    # teacher logits reach ~300 (one float32 step 3e-5): the CPU's own float32 error is ~1e-5
    torch.testing.assert_close(grad.cpu(), rgrad, rtol=1e-5, atol=3e-5 * float(rgrad.abs().max()))
    tc, cc, wc = t.cuda(), c.cuda(), w.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    again, mean2 = ops.ibot_patch_loss(sc.detach(), tc, cc, wc)
    assert torch.equal(again, loss) and torch.equal(mean2, mean)  # bitwise repeatable
    # Workspace: per-(row, chunk) statistics (~2.7 MB at M = 2100), never the 34 MB of
    # [M / 4, K] partial column sums.
    assert torch.cuda.max_memory_allocated() - before < 2**23


@pytest.mark.cuda
def test_cuda_sinkhorn_opcheck_gradcheck():
    t = torch.randn(64, 5000, device="cuda") * 300
    q = ops.sinkhorn_knopp(t, 0.04)
    # Logits reach |t| / 0.04 ~ 3e4, where one float32 ulp (~2e-3) of an offset moves q by that
    # much relatively: both devices are held to the float64 result within ~10 such ulps (the
    # CPU is seen at 0.3-0.5%), not to each other's last bits (their exp and summation order
    # differ).
    q64 = ops.sinkhorn_knopp(t.cpu().double(), 0.04)
    assert not torch.isnan(q).any()
    torch.testing.assert_close(q.cpu().double(), q64, rtol=2e-2, atol=1e-7)
    torch.testing.assert_close(ops.sinkhorn_knopp(t.cpu(), 0.04).double(), q64, rtol=2e-2, atol=1e-7)
    s = torch.randn(6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    tt = torch.randn(4, 7, dtype=torch.float64, device="cuda")
    c = torch.randn(7, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda s: ops.dino_loss(s, tt, c).loss, (s,))
    torch.library.opcheck(torch.ops.pyssl.dino_loss.default, (s, tt, c, None, 2, 0.1, 0.04, True))
    torch.library.opcheck(torch.ops.pyssl.offset_logsumexp.default, (tt, None, c, 25.0, 0))


def test_double_backward_matches_reference():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, generator=g)
    c = torch.randn(5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradgradcheck(lambda s: ops.dino_loss(s, t, c).loss, (s,))
    v = torch.randn(6, 5, dtype=torch.float64, generator=g)
    (gs,) = torch.autograd.grad(ops.dino_loss(s, t, c).loss, s, create_graph=True)
    (hv,) = torch.autograd.grad((gs * v).sum(), s)
    (gr,) = torch.autograd.grad(reference.dino_loss(s, t, c)[0], s, create_graph=True)
    (hr,) = torch.autograd.grad((gr * v).sum(), s)
    torch.testing.assert_close(hv, hr)
