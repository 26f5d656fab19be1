"""DINOLoss / IBOTPatchLoss modules: centre update, temperature warm-up, Sinkhorn-Knopp, and
the cross-rank centre/Sinkhorn reductions in a real two-process gloo group."""

import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pyssl import ops
from pyssl.losses import DINOLoss, IBOTPatchLoss
from pyssl.ops import reference

from ..spawn import spawn


def _inputs(B=4, S=5, T=2, K=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S * B, K, generator=g, dtype=torch.float64),
            torch.randn(T * B, K, generator=g, dtype=torch.float64))


def test_dino_loss_module_matches_reference_and_updates_center():
    s, t = _inputs()
    loss_fn = DINOLoss(50, n_teacher_crops=2, center_momentum=0.9).double()
    loss = loss_fn(s, t)
    torch.testing.assert_close(loss, reference.dino_loss(s, t, torch.zeros(50, dtype=torch.float64))[0])
    torch.testing.assert_close(loss_fn.center, 0.1 * t.mean(0))
    # the second step uses the updated centre
    s2, t2 = _inputs(seed=1)
    center = loss_fn.center.clone()
    loss2 = loss_fn(s2, t2)
    torch.testing.assert_close(loss2, reference.dino_loss(s2, t2, center)[0])
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * t2.mean(0))
    # eval mode: no update
    loss_fn.eval()
    before = loss_fn.center.clone()
    loss_fn(s2, t2)
    assert torch.equal(before, loss_fn.center)


@pytest.mark.parametrize("module", ["dino", "ibot"])
def test_compiled_loss_module_training_steps_equal_eager(module):
    """torch.compile(fullgraph=True) of the loss module in training mode, over several steps:
    same losses, same student gradients, same centre (after flush) as eager. Regression test:
    with the EMA update applied in place inside the compiled call (after the fused op had read
    the centre), inductor produced wrong student gradients."""
    import torch._dynamo

    K, B = 48, 4
    g = torch.Generator().manual_seed(3)
    s0, t0 = torch.randn(6 * B, K, generator=g), torch.randn(2 * B, K, generator=g)
    masks = torch.zeros(2, 12, dtype=torch.bool)              # [N, L]: 2 images, 12 patches
    masks.view(-1)[torch.randperm(24, generator=g)[:10]] = True
    rows = int(masks.sum())

    def run(compiled):
        torch._dynamo.reset()
        fn = DINOLoss(K) if module == "dino" else IBOTPatchLoss(K)
        fn.center.copy_(torch.randn(K, generator=torch.Generator().manual_seed(5)))
        call = torch.compile(fn, fullgraph=True) if compiled else fn
        out = []
        for it in range(3):
            s = (s0[:rows] if module == "ibot" else s0).mul(it + 1).requires_grad_()
            t = (t0.repeat(2, 1)[:rows] if module == "ibot" else t0) * (1 + 0.5 * it)
            loss = call(s, t, masks, 0) if module == "ibot" else call(s, t, 0)
            loss.backward()
            out.append((loss.detach(), s.grad.clone()))
        fn.flush()
        return out, fn.center.clone()

    (eager, c_eager), (comp, c_comp) = run(False), run(True)
    for (le, ge), (lc, gc) in zip(eager, comp):
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c_comp, c_eager, rtol=1e-5, atol=1e-6)
    assert not torch.equal(c_eager, torch.randn(K, generator=torch.Generator().manual_seed(5)))


def test_teacher_temperature_warmup_follows_dino_linspace():
    loss_fn = DINOLoss(10, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_epochs=30)
    sched = np.concatenate([np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07])
    for epoch in (0, 1, 10, 29, 30, 99):
        assert loss_fn.teacher_temperature(epoch) == pytest.approx(sched[epoch])
    assert DINOLoss(10, warmup_epochs=0).teacher_temperature(0) == 0.04


def test_teacher_temperature_warmup_is_what_forward_uses():
    s, t = _inputs(K=30)
    loss_fn = DINOLoss(30, teacher_temp=0.07, warmup_teacher_temp=0.02, warmup_epochs=5).double().eval()
    zero = torch.zeros(30, dtype=torch.float64)
    for epoch, temp in ((0, 0.02), (2, 0.02 + 0.05 * 2 / 4), (4.0, 0.07), (9, 0.07)):
        want = reference.dino_loss(s, t, zero, teacher_temp=temp)[0]
        torch.testing.assert_close(loss_fn(s, t, epoch), want)
    assert not torch.allclose(reference.dino_loss(s, t, zero, teacher_temp=0.02)[0],
                              reference.dino_loss(s, t, zero, teacher_temp=0.07)[0])


class _PendingWork:
    """A stand-in for an asynchronous all-reduce's work handle (one rank: the sums stay)."""

    def __init__(self, log):
        self.log = log

    def wait(self):
        self.log.append("wait")
        return True


def test_centre_all_reduce_overlaps_the_backward(monkeypatch):
    """Under torch.distributed the EMA update's all-reduce is started asynchronously in forward
    and waited for only at the next forward (or flush / state_dict): the backward never waits
    for it, and the next step still uses the updated centre."""
    log = []

    def fake_all_reduce(tensor, group=None, async_op=False):
        log.append("all_reduce" if async_op else "all_reduce (blocking)")
        return _PendingWork(log)

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(DINOLoss, "_distributed", lambda self: True)
    s, t = _inputs()
    loss_fn = DINOLoss(50, center_momentum=0.9).double()
    s.requires_grad_(True)
    loss = loss_fn(s, t)
    assert log == ["all_reduce"]
    assert torch.equal(loss_fn.center, torch.zeros(50, dtype=torch.float64))  # not applied yet
    loss.backward()
    assert log == ["all_reduce"]  # the backward did not wait
    s2, t2 = _inputs(seed=1)
    loss2 = loss_fn(s2, t2)
    assert log == ["all_reduce", "wait", "all_reduce"]
    center = 0.1 * t.mean(0)
    torch.testing.assert_close(loss2, reference.dino_loss(s2, t2, center)[0])
    loss_fn.state_dict()
    assert log[-1] == "wait"
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * t2.mean(0))


def test_dino_loss_module_sinkhorn_uses_sk_targets():
    s, t = _inputs(K=40)
    loss_fn = DINOLoss(40, centering="sinkhorn_knopp", teacher_temp=0.05).double()
    loss = loss_fn(s, t)
    q = reference.sinkhorn_knopp(t, 0.05, 3)
    logp = torch.log_softmax(s / 0.1, -1)
    B = 4
    terms = [(-(q[i * B:(i + 1) * B] * logp[v * B:(v + 1) * B]).sum(-1)).mean()
             for i in range(2) for v in range(5) if v != i]
    torch.testing.assert_close(loss, sum(terms) / len(terms))
    assert torch.equal(loss_fn.center, torch.zeros(40, dtype=torch.float64))


def test_ibot_module():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 16, generator=g) < 0.4
    M = int(masks.sum())
    s = torch.randn(M, 30, generator=g, requires_grad=True)
    t = torch.randn(M, 30, generator=g)
    loss_fn = IBOTPatchLoss(30)
    loss = loss_fn(s, t, masks)
    ref, _ = reference.ibot_patch_loss(s, t, torch.zeros(30), ops.ibot_weights(masks))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert s.grad is not None
    torch.testing.assert_close(loss_fn.center, 0.1 * t.mean(0))


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(10, centering="median")
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(10, center_momentum=1.5)
    with pytest.raises(ValueError, match="teacher_temp"):
        DINOLoss(10, teacher_temp=float("inf"))
    with pytest.raises(ValueError, match="student_temp"):
        IBOTPatchLoss(10, student_temp=0.0)
    s, t = _inputs(K=12)
    with pytest.raises(ValueError, match="student_output.*out_dim=10"):
        DINOLoss(10)(s, t)
    with pytest.raises(ValueError, match="teacher_output.*out_dim=12"):
        DINOLoss(12)(s, t[:, :10])
    with pytest.raises(ValueError, match="student_patches.*out_dim=10"):
        IBOTPatchLoss(10)(s, s, torch.ones(1, s.shape[0], dtype=torch.bool))
    # found by a bad-input fuzz: these were truncated, accepted or failed with another name
    with pytest.raises(TypeError, match="n_teacher_crops must be an int"):
        DINOLoss(10, n_teacher_crops=2.5)
    with pytest.raises(TypeError, match="n_teacher_crops must be an int, got bool"):
        DINOLoss(10, n_teacher_crops=True)
    with pytest.raises(TypeError, match="warmup_epochs must be an int"):
        DINOLoss(10, warmup_epochs=2.7)
    with pytest.raises(TypeError, match="teacher_temp must be a number"):
        DINOLoss(10, teacher_temp="a")
    with pytest.raises(ValueError, match="out_dim must be a positive int"):
        DINOLoss(True)
    with pytest.raises(ValueError, match="sinkhorn_iterations must be >= 1"):
        DINOLoss(10, centering="sinkhorn_knopp", sinkhorn_iterations=0)
    assert DINOLoss(10, n_teacher_crops=np.int64(2)).n_teacher_crops == 2
    patches = torch.randn(3, 16)
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        IBOTPatchLoss(16)(patches, patches, torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0]]))
    with pytest.raises(ValueError, match="masks marks 2 patches, but student_patches has 3 rows"):
        IBOTPatchLoss(16)(patches, patches, torch.tensor([[False, True], [True, False]]))
    with pytest.raises(ValueError, match="masks marks 10 patches, but student_patches has 0 rows"):
        IBOTPatchLoss(16)(patches[:0], patches[:0], torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        ops.ibot_weights(torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="teacher must be float32"):
        ops.sinkhorn_knopp_center(torch.ones(3, 4, dtype=torch.long), 0.04)
    with pytest.raises(TypeError, match="n_iterations must be an int, got bool"):
        ops.sinkhorn_knopp_center(torch.ones(3, 4), 0.04, True)


# --------------------------------------------------------------------------------------------
# Two processes (gloo): the cross-rank reductions equal one process over the whole batch.
# --------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, s_full, t_full, B):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        Bl = B // world

        def local(x, crops):  # crop-major rows of this rank's images
            return torch.cat([x[c * B + rank * Bl:c * B + (rank + 1) * Bl] for c in range(crops)])

        s, t = local(s_full, 5), local(t_full, 2)
        loss_fn = DINOLoss(s.shape[1], center_momentum=0.9)
        loss = loss_fn(s, t)
        center = loss_fn.state_dict()["center"]  # flushes the asynchronous all-reduce
        sk = ops.sinkhorn_knopp(t, 0.04)
        torch.save({"loss": loss, "center": center, "sk": sk}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_center_and_sinkhorn_equal_single_process():
    B, K = 6, 300
    g = torch.Generator().manual_seed(7)
    s_full = torch.randn(5 * B, K, generator=g)
    t_full = torch.randn(2 * B, K, generator=g) * 3
    with tempfile.TemporaryDirectory() as out:
        spawn(_worker, (2, _free_port(), out, s_full, t_full, B))
        results = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(2)]
    single = DINOLoss(K, center_momentum=0.9)
    single_loss = single(s_full, t_full)
    for r in results:
        torch.testing.assert_close(r["center"], single.center, rtol=1e-6, atol=1e-7)
    # each rank's loss is over its own images; their mean is the single-process loss
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, single_loss,
                               rtol=1e-5, atol=1e-6)
    sk_full = ops.sinkhorn_knopp(t_full, 0.04)
    Bl = B // 2
    for rank, r in enumerate(results):
        rows = torch.cat([torch.arange(c * B + rank * Bl, c * B + (rank + 1) * Bl) for c in range(2)])
        torch.testing.assert_close(r["sk"], sk_full[rows], rtol=1e-4, atol=1e-6)


def _ibot_worker(rank, world, port, out_dir, t_full, masks, ranges):
    import datetime

    # A rank left out of a collective makes the others wait: the timeout turns that into a
    # failure instead of a hang.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        lo, hi = ranges[rank]  # this rank's images
        m = masks[lo:hi]
        before = int(masks[:lo].sum())
        t = t_full[before:before + int(m.sum())]  # its patch rows, in masks[masks] order
        s = t.clone().mul(0.5).requires_grad_(True)
        out = {"rows": t.shape[0], "sk_center": ops.sinkhorn_knopp_center(t, 0.05)}
        for centering in ("center", "sinkhorn_knopp"):
            fn = IBOTPatchLoss(t_full.shape[1], teacher_temp=0.05, centering=centering)
            loss = fn(s, t, m)
            loss.backward()
            out[centering] = {"loss": loss.detach(), "center": fn.state_dict()["center"]}
        dist.barrier()
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_ibot_with_uneven_and_empty_ranks():
    """Rank 1 holds one image without a masked patch, rank 0 the rest: neither rank may hang,
    the Sinkhorn-Knopp centre counts the samples of all ranks (not rows x world size), and the
    EMA centre equals one process's over all patches."""
    K = 40
    g = torch.Generator().manual_seed(11)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[:3].view(-1)[torch.randperm(27, generator=g)[:13]] = True
    t_full = torch.randn(int(masks.sum()), K, generator=g, dtype=torch.float64) * 4
    with tempfile.TemporaryDirectory() as out:
        spawn(_ibot_worker, (2, _free_port(), out, t_full, masks, [(0, 3), (3, 4)]))
        results = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(2)]
    assert [r["rows"] for r in results] == [13, 0]
    want_sk = ops.sinkhorn_knopp_center(t_full, 0.05)
    single = IBOTPatchLoss(K, teacher_temp=0.05).double()
    single(t_full * 0.5, t_full, masks[:3])
    for r in results:
        torch.testing.assert_close(r["sk_center"], want_sk, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(r["center"]["center"], single.center.to(r["center"]["center"].dtype),
                                   rtol=1e-6, atol=1e-7)
        assert torch.isfinite(r["sinkhorn_knopp"]["loss"])
    assert results[1]["center"]["loss"] == 0 and results[1]["sinkhorn_knopp"]["loss"] == 0


def _ibot_two_step_worker(rank, world, port, out_dir, t_full, masks_steps, ranges):
    import datetime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        fn = IBOTPatchLoss(t_full[0].shape[1], teacher_temp=0.05)
        for t_all, masks in zip(t_full, masks_steps):
            lo, hi = ranges[rank]
            m = masks[lo:hi]
            before = int(masks[:lo].sum())
            t = t_all[before:before + int(m.sum())]
            fn(t * 0.5, t, m)
        torch.save(fn.state_dict()["center"], os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_ibot_keeps_the_pending_update_when_a_rank_goes_empty():
    """Step 1: both ranks hold masked patches; step 2: rank 1 holds none. Rank 1 must apply
    step 1's in-flight centre update before joining step 2's, as the other rank does."""
    K = 24
    g = torch.Generator().manual_seed(12)
    m1 = torch.zeros(4, 9, dtype=torch.bool)
    m1.view(-1)[torch.randperm(36, generator=g)[:14]] = True
    m2 = m1.clone()
    m2[3] = False
    m2[0, :3] = True
    t1 = torch.randn(int(m1.sum()), K, generator=g, dtype=torch.float64) * 3
    t2 = torch.randn(int(m2.sum()), K, generator=g, dtype=torch.float64) * 3
    with tempfile.TemporaryDirectory() as out:
        spawn(_ibot_two_step_worker, (2, _free_port(), out, [t1, t2], [m1, m2], [(0, 3), (3, 4)]))
        centers = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(2)]
    single = IBOTPatchLoss(K, teacher_temp=0.05).double()
    single(t1 * 0.5, t1, m1)
    single(t2 * 0.5, t2, m2)
    for c in centers:
        torch.testing.assert_close(c.double(), single.center, rtol=1e-6, atol=1e-7)
