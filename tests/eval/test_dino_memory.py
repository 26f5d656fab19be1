"""pyssl.eval.dino_memory (the README's K = 65536 memory comparison): the plain baseline is
DINO v1's loss, the saved-bytes counter counts what autograd keeps, and a tiny measurement of
both variants runs and agrees."""

import pytest
import torch

from pyssl.eval.dino_memory import PlainDINOLoss, SavedBytes, measure
from pyssl.losses import DINOLoss


def _inputs(S=4, T=2, B=3, K=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S * B, K, generator=g, dtype=torch.float64),
            torch.randn(T * B, K, generator=g, dtype=torch.float64))


def test_plain_loss_equals_the_fused_module_over_two_steps():
    plain, fused = PlainDINOLoss(40).double(), DINOLoss(40).double()
    for seed in (0, 1):                                # the second step uses the updated centre
        s, t = _inputs(seed=seed)
        sp, sf = s.clone().requires_grad_(), s.clone().requires_grad_()
        lp, lf = plain(sp, t), fused(sf, t)
        lp.backward()
        lf.backward()
        torch.testing.assert_close(lp, lf)
        torch.testing.assert_close(sp.grad, sf.grad)
        torch.testing.assert_close(plain.center, fused.center)
    assert not torch.equal(plain.center, torch.zeros(40, dtype=torch.float64))


def test_saved_bytes_counts_what_each_loss_keeps_for_backward():
    S, T, B, K = 4, 2, 8, 1024
    s, t = _inputs(S, T, B, K)
    s, t = s.float().requires_grad_(), t.float()
    with SavedBytes() as fused:
        DINOLoss(K)(s, t)
    with SavedBytes() as plain:
        PlainDINOLoss(K)(s, t)
    row = B * K * 4
    pairs = T * S - T
    # fused: the two inputs (student, teacher) and the centre copy, plus per-row statistics
    assert s.nbytes + t.nbytes <= fused.bytes <= s.nbytes + t.nbytes + K * 4 + 64 * S * B
    # plain: a [B, K] log-softmax per pair and the teacher probabilities
    assert plain.bytes >= pairs * row + T * row
    with SavedBytes() as nothing:
        with torch.no_grad():
            DINOLoss(K)(s, t)
    assert nothing.bytes == 0


def test_tiny_measurement_of_both_variants_agrees():
    threads = torch.get_num_threads()
    try:
        f = measure("fused", out_dim=64, batch=4, n_local=2, steps=1, data="digits")
        p = measure("plain", out_dim=64, batch=4, n_local=2, steps=1, data="digits")
    finally:
        torch.set_num_threads(threads)
    assert f["crops"] == "2+2" and len(f["losses"]) == 2
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (f, p))
    assert f["losses"][0] == pytest.approx(p["losses"][0], rel=1e-5)
    assert 0 < f["loss_saved_mib"] < p["loss_saved_mib"]
    with pytest.raises(ValueError, match="variant"):
        measure("einsum", out_dim=64, batch=4, n_local=2, steps=1, data="digits")
