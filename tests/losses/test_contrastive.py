"""Contrastive losses and KoLeo against plain references, and gradients under DDP: two gloo
processes on the two halves of a global batch give the gradients of one process on the whole
batch (and a gather without gradients does not — the test can tell)."""

import math
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pyssl.losses import ClipLoss, InfoNCELoss, KoLeoLoss, NTXentLoss, info_nce, koleo_loss, nt_xent

from ..spawn import spawn


def _pair(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64))


def _ref_info_nce(q, k, t, ids=None):
    """Row by row: -log softmax of row i's positive(s)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        s = torch.stack([q[i] @ k[j] / t for j in range(k.shape[0])])
        lse = torch.logsumexp(s, 0)
        if ids is None:
            total = total + (lse - s[i])
        else:
            pos = [j for j in range(k.shape[0]) if ids[j] == ids[i]]
            total = total + sum(lse - s[j] for j in pos) / len(pos)
    return total / q.shape[0]


def test_info_nce_asymmetric_and_symmetric_match_reference():
    q, k = _pair()
    torch.testing.assert_close(info_nce(q, k, 0.2), _ref_info_nce(q, k, 0.2))
    sym = info_nce(q, k, 0.2, symmetric=True)
    torch.testing.assert_close(sym, 0.5 * (_ref_info_nce(q, k, 0.2) + _ref_info_nce(k, q, 0.2)))
    assert not torch.allclose(sym, info_nce(q, k, 0.2))          # the two directions differ
    torch.testing.assert_close(InfoNCELoss(0.2, symmetric=True)(q, k), sym)
    # unnormalised: raw dot products
    raw = F.cross_entropy((q @ k.T) / 0.5, torch.arange(6))
    torch.testing.assert_close(info_nce(q, k, 0.5, normalize=False), raw)


def test_info_nce_duplicate_ids_share_the_target():
    q, k = _pair(n=6)
    ids = torch.tensor([3, 1, 3, 2, 1, 9])
    torch.testing.assert_close(info_nce(q, k, 0.1, positive_ids=ids),
                               _ref_info_nce(q, k, 0.1, ids.tolist()))
    torch.testing.assert_close(info_nce(q, k, 0.1, positive_ids=torch.arange(6)),
                               info_nce(q, k, 0.1))                # unique ids = one-hot


def _ref_nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        others = [b for b in range(2 * n) if b != a]
        denom = torch.logsumexp(torch.stack([z[a] @ z[b] / t for b in others]), 0)
        total = total + denom - z[a] @ z[pos] / t
    return total / (2 * n)


def test_nt_xent_matches_reference():
    z1, z2 = _pair(n=5, d=7, seed=1)
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), _ref_nt_xent(z1, z2, 0.5))
    torch.testing.assert_close(NTXentLoss(0.1)(z1, z2), _ref_nt_xent(z1, z2, 0.1))
    # identical views of well-separated images: near-zero loss at a low temperature
    e = torch.eye(4, dtype=torch.float64)
    assert nt_xent(e, e, 0.01) < 1e-6


def test_clip_loss_learnable_temperature():
    img, txt = _pair(n=4)
    loss_fn = ClipLoss(init_temperature=0.07).double()
    assert loss_fn.logit_scale().item() == pytest.approx(1 / 0.07)
    loss = loss_fn(img, txt)
    ref = 0.5 * (_ref_info_nce(img, txt, 0.07) + _ref_info_nce(txt, img, 0.07))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.log_scale.grad != 0
    with torch.no_grad():
        loss_fn.log_scale.fill_(10.0)                          # clamped at the maximum
    assert loss_fn.logit_scale().item() == pytest.approx(100.0)
    fixed = ClipLoss(0.1, learnable=False)
    assert not fixed.log_scale.requires_grad


def test_contrastive_bad_inputs():
    q, k = _pair()
    with pytest.raises(ValueError, match="same shape"):
        info_nce(q, k[:3])
    with pytest.raises(ValueError, match="2-D"):
        nt_xent(q[None], k[None])
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, k, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(-1)
    with pytest.raises(ValueError, match="max_scale"):
        ClipLoss(0.07, max_scale=2.0)
    # found by a bad-input fuzz: each of these used to return a value (or fail inside torch)
    with pytest.raises(ValueError, match="key must be on the same device|same device"):
        info_nce(q, k.to("meta"))                 # CPU @ meta returned uninitialised memory
    with pytest.raises(TypeError, match="key must be a floating-point tensor"):
        info_nce(q, k.long())
    with pytest.raises(ValueError, match="at least one row"):
        nt_xent(q[:0], k[:0])                     # NaN before
    for bad in (math.inf, math.nan, -0.5):
        with pytest.raises(ValueError, match="temperature must be positive and finite"):
            info_nce(q, k, bad)
        with pytest.raises(ValueError, match="init_temperature must be positive and finite"):
            ClipLoss(bad)
    with pytest.raises(TypeError, match="temperature must be a number"):
        InfoNCELoss(True)
    with pytest.raises(ValueError, match="logit_scale must be a tensor holding one value"):
        info_nce(q, k, None, logit_scale=torch.ones(q.shape[0]))   # broadcast per column before
    with pytest.raises(ValueError, match=r"positive_ids must be an integer tensor of shape \[n\]"):
        info_nce(q, k, positive_ids=torch.arange(q.shape[0] + 1))
    with pytest.raises(ValueError, match=r"positive_ids must be an integer tensor"):
        info_nce(q, k, positive_ids=torch.zeros(q.shape[0]))
    assert torch.isfinite(info_nce(q, k, np.float32(0.2)))      # numpy scalars are numbers


# --------------------------------------------------------------------------------------------
# KoLeo
# --------------------------------------------------------------------------------------------


def _ref_koleo(x, eps=1e-8):
    x = F.normalize(x, dim=1)
    n = x.shape[0]
    d = torch.cdist(x, x) + torch.diag(torch.full((n,), math.inf, dtype=x.dtype))
    return -torch.log(d.min(1).values + eps).mean()


def test_koleo_matches_brute_force_value_and_gradient():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    a, b = koleo_loss(x), _ref_koleo(y)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(KoLeoLoss()(x.detach()), b.detach())
    # spreading the points lowers it: two clusters vs an orthonormal set
    clustered = torch.cat([torch.eye(4)[:1].repeat(4, 1), torch.eye(4)[1:2].repeat(4, 1)])
    clustered = clustered + 1e-3 * torch.randn(8, 4, generator=g)
    spread = torch.cat([torch.eye(4), -torch.eye(4)])
    assert koleo_loss(spread) < koleo_loss(clustered)
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 3))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        koleo_loss(torch.randn(4, 3), eps=-1.0)   # NaN before
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        KoLeoLoss(eps=math.inf)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        koleo_loss(torch.ones(4, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# DDP: world size 2 == world size 1 on the same global batch
# --------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.a = torch.nn.Linear(5, 4).double()
        self.b = torch.nn.Linear(5, 4).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.clip = ClipLoss(0.1).double()

    def forward(self, x, y, kind, ids=None, naive=False):
        za, zb = self.a(x), self.b(y)
        if naive:                       # the classic bug: negatives gathered without gradients
            return _naive_info_nce(za, zb)
        if kind == "nt_xent":
            return nt_xent(za, zb, 0.3)
        if kind == "info_nce":
            return info_nce(za, zb, 0.2)
        if kind == "symmetric_ids":
            return info_nce(za, zb, 0.2, symmetric=True, positive_ids=ids)
        return self.clip(za, zb)


def _naive_info_nce(q, k):
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(parts, k.detach())
    parts[rank] = k                      # only the local keys keep their graph
    keys = F.normalize(torch.cat(parts), dim=1)
    logits = F.normalize(q, dim=1) @ keys.T / 0.2
    n = q.shape[0]
    return F.cross_entropy(logits, torch.arange(rank * n, rank * n + n))


KINDS = ["nt_xent", "info_nce", "symmetric_ids", "clip"]


def _grads(model, x, y, kind, ids, naive=False):
    model.zero_grad()
    model(x, y, kind, ids, naive).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank, world, port, out_dir, x, y, ids):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        n = x.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        model = torch.nn.parallel.DistributedDataParallel(_Towers(), find_unused_parameters=True)
        res = {}
        for kind in KINDS + ["naive"]:
            model.zero_grad()
            loss = model(x[sl], y[sl], kind, ids[sl], naive=kind == "naive")
            loss.backward()                         # DDP averages the gradients over ranks
            res[kind] = {k: p.grad.clone() for k, p in model.module.named_parameters()
                         if p.grad is not None}
        torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gradients_at_world_size_two_equal_world_size_one():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5])
    with tempfile.TemporaryDirectory() as out:
        spawn(_ddp_worker, (2, _free_port(), out, x, y, ids))
        res = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(2)]
    single = _Towers()
    for kind in KINDS:
        ref = _grads(single, x, y, kind, ids)
        for r in range(2):
            assert set(res[r][kind]) == set(ref), kind
            for name, gref in ref.items():
                torch.testing.assert_close(res[r][kind][name], gref, rtol=1e-10, atol=1e-12,
                                           msg=f"{kind}: {name} on rank {r}")
    # the naive gather (no gradient through the other ranks' keys) gives other gradients
    ref = _grads(single, x, y, "info_nce", ids)
    diff = max((res[0]["naive"][n] - ref[n]).abs().max().item() for n in ("b.weight",))
    assert diff > 1e-3


def _uneven_worker(rank, world, port, out_dir):
    import datetime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        n = 3 if rank == 0 else 5  # unequal local batches
        x = torch.randn(n, 4)
        errors = []
        for fn in (info_nce, nt_xent):
            try:
                fn(x, x + 0.1)
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        torch.save(errors, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_unequal_batches_across_ranks_raise_on_every_rank():
    # all_gather needs equal rows: one rank read garbage and the other aborted the process
    with tempfile.TemporaryDirectory() as out:
        spawn(_uneven_worker, (2, _free_port(), out))
        res = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(2)]
    for errors in res:
        assert len(errors) == 2 and all(e is not None and "[3, 5]" in e for e in errors), errors
