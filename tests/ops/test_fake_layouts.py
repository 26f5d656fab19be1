"""Fake (meta) kernels must predict the real kernels' outputs to the stride: torch.compile
plans its backward from the fake outputs and fails (or reads memory wrongly) otherwise. Inputs
in every layout a user may pass: contiguous, channels-last, permuted, transposed."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pyssl  # noqa: F401  (registers the ops)
from pyssl import ops

P = torch.ops.pyssl


def _assert_fake_matches_real(op, args):
    """Shapes, dtypes and strides (of dimensions longer than 1: as torch.compile's
    assert_size_stride, a size-1 dimension's stride is free)."""
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert len(real) == len(fake)
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r.shape, r.dtype, r.device.type) == (f.shape, f.dtype, f.device.type), i
        if r.numel() > 1:
            strides = [(a, b) for n, a, b in zip(r.shape, r.stride(), f.stride()) if n > 1]
            assert all(a == b for a, b in strides), (i, r.stride(), f.stride())


def _features():
    return {
        "nchw": torch.randn(3, 5, 7, 9),
        "channels_last": torch.randn(3, 5, 7, 9).contiguous(memory_format=torch.channels_last),
        "hw_transposed": torch.randn(3, 5, 9, 7).transpose(2, 3),
        "nc_permuted": torch.randn(5, 3, 7, 9).permute(1, 0, 2, 3),
        # size-1 dimensions
        "one_channel": torch.randn(3, 1, 7, 9),
        "one_pixel": torch.randn(3, 5, 1, 1),
    }


@pytest.mark.parametrize("layout", list(_features()))
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("xy_transposed", [False, True])
def test_point_sampling_fakes_predict_layouts(layout, mode, xy_transposed):
    f = _features()[layout]
    idx = torch.tensor([0, 1, 2, 1])
    xy = (torch.rand(2, 4) * 6).t() if xy_transposed else torch.rand(4, 2) * 6
    _assert_fake_matches_real(P.sample_points, [f, idx, xy, mode])
    D = f.shape[1]
    _assert_fake_matches_real(P.sample_points_backward,
                              [torch.randn(4, D), f, idx, xy, mode, True, True, False])
    for pf in (torch.randn(4, D), torch.randn(D, 4).t()):
        _, stats = P.distill_loss(pf, f, idx, xy, None, mode, 0)
        _assert_fake_matches_real(P.distill_loss, [pf, f, idx, xy, None, mode, 0])
        _assert_fake_matches_real(P.distill_loss_backward, [torch.ones(()), pf, f, idx, xy, None,
                                                            stats, mode, 0, True, True, False])


@pytest.mark.parametrize("layout", list(_features()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_loss_fakes_predict_layouts(layout, dtype):
    """distill_loss with a dense online map (dense_correspondence_loss): float32 / bfloat16
    features in both layouts take the CPU's dense-loss kernels, float64 ones the generic pair
    path; the online map in every layout."""
    pf = _features()[layout].to(dtype)
    if layout == "nchw":  # 20 channels (a band slice and a planar rest), a sliced map
        pf = torch.randn(3, 22, 7, 9).to(dtype)[:, 1:21]
    N, D, Ho, Wo = pf.shape
    xy = torch.rand(N * Ho * Wo, 2) * 6
    w = torch.rand(N * Ho * Wo)
    for f in (torch.randn(N, D, 6, 8).to(dtype),
              torch.randn(N, D, 6, 8).to(dtype).contiguous(memory_format=torch.channels_last),
              torch.randn(N, D, 6, 8, dtype=torch.float64)):
        assert P.dense_loss_kernels(pf, f, None, xy, 0) == (f.dtype != torch.float64)
        _, stats = P.distill_loss(pf, f, None, xy, w, 0, 0)
        _assert_fake_matches_real(P.distill_loss, [pf, f, None, xy, w, 0, 0])
        _assert_fake_matches_real(P.distill_loss_backward, [torch.ones(()), pf, f, None, xy, w,
                                                            stats, 0, 0, True, True, False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "hw_transposed", "nc_permuted"])
@pytest.mark.parametrize("channels", [3, 5, 32, 40])
def test_dense_sampling_fakes_predict_layouts(layout, channels, dtype):
    f = _features()[layout]
    f = f.repeat(1, channels, 1, 1)[:, :channels] if layout == "nchw" else \
        torch.cat([f] * 8, 1)[:, :channels]
    f = f.to(dtype)  # (keeps the layout)
    if layout == "channels_last":  # channels-last contiguous (read in place with 16k channels)
        f = f.contiguous(memory_format=torch.channels_last)
        assert not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last)
    for coords in (torch.rand(3, 4, 6, 2) * 6, (torch.rand(3, 2, 4, 6) * 6).permute(0, 2, 3, 1)):
        out = P.sample_features_dense(f, coords)
        _assert_fake_matches_real(P.sample_features_dense, [f, coords])
        for flags in ((True, True), (True, False), (False, True)):  # (True, False): no copy
            _assert_fake_matches_real(P.sample_features_dense_backward,
                                      [torch.randn_like(out), f, coords, *flags])
        gf = P.sample_features_dense_backward(torch.randn_like(out), f, coords, True, False)[0]
        cl = layout == "channels_last"  # the gradient in the features' layout (others: NCHW)
        assert gf.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def test_dino_fakes_predict_layouts():
    t, c = torch.randn(4, 10), torch.zeros(10)
    for s in (torch.randn(8, 10), torch.randn(10, 8).t()):
        _, _, sl, tl = P.dino_loss(s, t, c, None, 2, 0.1, 0.04, True)
        _assert_fake_matches_real(P.dino_loss, [s, t, c, None, 2, 0.1, 0.04, True])
        _assert_fake_matches_real(P.dino_loss_backward,
                                  [torch.ones(()), s, t, c, None, sl, tl, 2, 0.1, 0.04, True])


@pytest.mark.parametrize("layout", ["hw_transposed", "nc_permuted", "channels_last"])
def test_compiled_backward_with_unusual_feature_layouts(layout):
    feats = _features()[layout]
    cam = torch.tensor([0, 1, 2, 1, 0])
    row = torch.tensor([0.5, 1.0, 6.0, 3.25, 2.0])
    col = torch.tensor([0.0, 8.0, 4.5, 2.0, 7.75])
    pf = torch.randn(5, 5)

    def loss(f):
        g = ops.gather_pixel_features(f, cam, row, col, mode="bilinear").sum()
        d = ops.pixel_to_point_distillation_loss(pf, f, cam, row, col, mode="bilinear")
        return g + d

    want_f = feats.clone().requires_grad_(True)
    loss(want_f).backward()
    got_f = feats.clone().requires_grad_(True)
    torch.compile(loss, fullgraph=True)(got_f).backward()
    torch.testing.assert_close(got_f.grad, want_f.grad)


def _meta(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("call, error, match", [
    (lambda: P.random_masking(_meta(2, 8, 4), _meta(2, 8), 100), ValueError, r"len_keep must be in \[0, L=8\]"),
    (lambda: P.random_masking(_meta(2, 8, 4), _meta(2, 7), 3), ValueError, "noise must have shape"),
    (lambda: ops.unshuffle_tokens(_meta(2, 4, 3), _meta(2, 6), _meta(3)), TypeError, "ids_restore must be int64"),
    (lambda: ops.unshuffle_tokens(_meta(2, 4, 3), _meta(2, 2, dtype=torch.long), _meta(3)), ValueError,
     r"ids_restore.shape\[1\] \(L=2\) must be >= the number of visible tokens K=4"),
    (lambda: ops.unshuffle_tokens(_meta(2, 4, 3), _meta(2, 6, dtype=torch.long), _meta(5)), ValueError,
     "mask_token.shape"),
    (lambda: ops.dino_loss(_meta(8, 16), _meta(4, 7), _meta(16)), ValueError, r"teacher.shape\[1\] \(K=7\)"),
    (lambda: ops.dino_loss(_meta(8, 16), _meta(0, 16), _meta(16)), ValueError, "teacher has 0 rows"),
    (lambda: ops.dino_loss(_meta(9, 16), _meta(4, 16), _meta(16)), ValueError, "student has 9 rows"),
    (lambda: ops.dino_loss(_meta(4, 16), _meta(6, 16), _meta(16), n_teacher_crops=3), ValueError,
     r"n_teacher_crops \(3\) must be <= the number of student crops \(2\)"),
    (lambda: ops.dino_loss(_meta(8, 16), _meta(4, 16), _meta(15)), ValueError, r"center must have shape \[K\]"),
    (lambda: ops.flow_correspondence(_meta(2, 5, 6)), ValueError, r"flow_fw must be \[B, 2, H, W\]"),
    (lambda: ops.flow_correspondence(_meta(2, 3, 5, 6)), ValueError, "flow_fw must have 2 channels"),
    (lambda: ops.flow_correspondence(_meta(2, 2, 5, 6), _meta(2, 2, 5, 7)), ValueError, "flow_bw must have the shape"),
    (lambda: ops.segment_mean(_meta(4, 2), _meta(4, dtype=torch.long), -3), ValueError, "num_segments must be >= 0"),
    (lambda: P.segment_mean(_meta(4, 2), _meta(3, dtype=torch.long), 2, False), ValueError, r"segment_ids must be \[N\]"),
    (lambda: ops.project_points(_meta(5, 2), _meta(1, 4, 4), _meta(1, 3, 3), (4, 4)), ValueError, r"points must be \[P, 3\+\]"),
    (lambda: ops.project_points(_meta(5, 3), _meta(1, 4, 4), _meta(3, 3, 3), (4, 4)), ValueError,
     "intrinsics must be"),
])
def test_fake_kernels_refuse_what_the_kernels_refuse(call, error, match):
    """The fake kernels repeat the C++ kernels' shape checks: on meta tensors (and while
    torch.compile traces) bad shapes raise the kernels' errors instead of returning a shape."""
    with pytest.raises(error, match=match):
        call()


def test_fake_kernels_accept_good_meta_inputs():
    assert ops.dino_loss(_meta(24, 16), _meta(4, 16), _meta(16))[0].shape == ()
    assert ops.unshuffle_tokens(_meta(2, 4, 3), _meta(2, 6, dtype=torch.long), _meta(3)).shape == (2, 6, 3)
    assert ops.project_points(_meta(5, 3), _meta(3, 4, 4), _meta(3, 3, 3), (4, 4)).pixels.shape == (3, 5, 2)
    assert ops.flow_correspondence(_meta(2, 2, 5, 6), _meta(2, 2, 5, 6))[1].shape == (2, 5, 6)
    assert P.random_masking(_meta(2, 8, 4), _meta(2, 8), 3)[0].shape == (2, 3, 4)
    assert ops.segment_mean(_meta(4, 2), _meta(4, dtype=torch.long), 3)[0].shape == (3, 2)
