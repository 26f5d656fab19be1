"""Optical-flow pixel correspondence for pixel-wise SSL from video (flow-equivariant features,
FlowE; Xiong et al., ICCV 2021), and the exact correspondence of affine views of one image, so
one dense loss serves both.

Pixel units throughout: pixel (row i, col j) is centred at x = j, y = i; flow channel 0 = u
(x), 1 = v (y). Bilinear sampling with zeros outside equals
``grid_sample(align_corners=True, padding_mode="zeros")`` after normalisation.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import reference
from ._dispatch import check_int, check_no_grad, check_tensor, fake_check, has_kernel, same_device_fake
from .sampling import sample_points

__all__ = [
    "FlowCorrespondence",
    "affine_correspondence",
    "crop_theta",
    "dense_correspondence_loss",
    "flow_correspondence",
    "sample_features",
]

_ops = torch.ops.pyssl


class FlowCorrespondence(NamedTuple):
    coords: torch.Tensor  # [B, H, W, 2] (x + u, y + v)
    valid: torch.Tensor  # [B, H, W] bool


def _number(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def flow_correspondence(flow_fw: torch.Tensor, flow_bw: torch.Tensor | None = None, *,
                        alpha1: float = 0.01, alpha2: float = 0.5) -> FlowCorrespondence:
    """Pairs every pixel of frame 1 with its match in frame 2.

    Args:
        flow_fw: ``[B, 2, H, W]`` forward flow (frame 1 -> 2), pixels; fp32, fp16, bf16, fp64.
        flow_bw: optional ``[B, 2, H, W]`` backward flow (frame 2 -> 1).
        alpha1, alpha2: forward-backward check constants (UnFlow's defaults).

    Returns:
        :class:`FlowCorrespondence` ``(coords [B, H, W, 2] = (x + u, y + v), valid [B, H, W])``;
        ``valid`` = finite flow, target inside the frame (``0 <= x' <= W-1``,
        ``0 <= y' <= H-1``) and, with ``flow_bw``, forward-backward consistent:
        ``|F + B~|^2 <= alpha1 (|F|^2 + |B~|^2) + alpha2`` with ``B~`` = ``flow_bw`` sampled
        bilinearly at ``coords`` (Sundaram et al., 2010). ``coords`` is float32 (float64 for a
        float64 flow) and differentiable w.r.t. ``flow_fw`` (through :func:`sample_features`;
        :func:`dense_correspondence_loss` takes coordinates without gradient: detach them there).
    """
    check_tensor(flow_fw, "flow_fw")
    if flow_bw is not None:
        check_tensor(flow_bw, "flow_bw")
    a1, a2 = _number(alpha1, "alpha1"), _number(alpha2, "alpha2")
    for name, value in (("alpha1", a1), ("alpha2", a2)):  # as the kernels check, on any device
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if has_kernel(flow_fw.device):
        return FlowCorrespondence(*_ops.flow_correspondence(flow_fw, flow_bw, a1, a2))
    return FlowCorrespondence(*reference.flow_correspondence(flow_fw, flow_bw, a1, a2))


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("pyssl::flow_correspondence")
@same_device_fake
def _flow_fake(flow_fw, flow_bw, alpha1, alpha2):
    fake_check(flow_fw.dim() == 4, lambda: f"flow_fw must be [B, 2, H, W], got shape {tuple(flow_fw.shape)}")
    fake_check(flow_fw.shape[1] == 2, lambda: f"flow_fw must have 2 channels (u, v), got shape "
                                              f"{tuple(flow_fw.shape)}")
    if flow_bw is not None:
        fake_check(flow_bw.shape == flow_fw.shape, lambda: f"flow_bw must have the shape of flow_fw "
                                                           f"{tuple(flow_fw.shape)}, got {tuple(flow_bw.shape)}")
    B, _, H, W = flow_fw.shape
    return (flow_fw.new_empty(B, H, W, 2, dtype=_acc(flow_fw)),
            flow_fw.new_empty(B, H, W, dtype=torch.bool))


def _flow_setup(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype


def _flow_backward(ctx, grad_coords, _grad_valid):
    return grad_coords.permute(0, 3, 1, 2).to(ctx.dtype), None, None, None


torch.library.register_autograd("pyssl::flow_correspondence", _flow_backward, setup_context=_flow_setup)


def _channels_last(features: torch.Tensor) -> bool:
    """Channels-last features (and not NCHW-contiguous as well): the CPU's dense sampling kernels
    return a channels-last feature gradient for them (csrc/ops/sampling.cpp: feature_gradient),
    and read them in place when every channel is in a 16-channel band slice."""
    return not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last)


def _dense_sampling(features: torch.Tensor, coords: torch.Tensor) -> bool:
    """Whether sample_features takes the CPU's dense kernels (sample_features_dense) rather than
    the pair kernels of sample_points. NCHW maps always do. Channels-last maps do too, read in
    place when every channel is in a 16-channel band and transposed to NCHW otherwise, except one
    case where the pair kernels are faster: a float32 map with more than 16 channels, not all in
    bands, when no gradient will be taken. The pair kernels read a channels-last pixel's channels
    contiguously and give the same bits; the transposition costs the dense forward its lead
    there (1.3-2.1x slower at 17-72 channels), while forward+backward is 1.8-3.4x faster on the
    dense kernels (24 and 72 channels, benchmarks/RESULTS.md)."""
    if features.is_contiguous():
        return True
    if not _channels_last(features):
        return False
    C = features.shape[1]
    wants_grad = torch.is_grad_enabled() and (features.requires_grad or coords.requires_grad)
    return C % 16 == 0 or C < 16 or features.dtype == torch.bfloat16 or wants_grad


def sample_features(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of ``features`` ``[B, C, H, W]`` at pixel coordinates ``coords``
    ``[B, Ho, Wo, 2]`` (x, y), zeros outside: ``[B, C, Ho, Wo]``, equal to
    ``grid_sample(features, normalised coords, align_corners=True, padding_mode="zeros")`` when
    H, W > 1 (grid_sample maps every coordinate of a size-1 axis onto its pixel; here pixel
    coordinates keep their meaning). Gradients to ``features`` and ``coords``; the scatter into
    ``features`` uses no float atomics when ``torch.are_deterministic_algorithms_enabled()``
    (and never on the CPU; on CUDA a fixed-point scatter with integer atomics, see
    :func:`pyssl.ops.sample_points`).

    On the CPU, float32 or bfloat16 features, NCHW or channels-last, with float32 ``coords``
    take dense kernels (see ``_dense_sampling`` for the one channels-last case that does not):
    the output is then NCHW-contiguous and the feature gradient has the features' layout.
    Otherwise the output is a channels-last view."""
    check_tensor(features, "features")
    check_tensor(coords, "coords")
    if features.dim() != 4:
        raise ValueError(f"features must be a 4-D tensor [B, C, H, W], got shape {tuple(features.shape)}")
    if coords.dim() != 4 or coords.shape[-1] != 2 or coords.shape[0] != features.shape[0]:
        raise ValueError(f"coords must have shape [B, Ho, Wo, 2] with B = {features.shape[0]}, "
                         f"got {tuple(coords.shape)}")
    _check_float(coords, "coords")
    _check_maps("features", features, others=(("coords", coords),))
    B, Ho, Wo, _ = coords.shape
    if (features.device.type == "cpu" and features.dtype in (torch.float32, torch.bfloat16)
            and coords.dtype == torch.float32
            and _dense_sampling(features, coords)):
        # CPU fast path, NCHW out: planar gathers for few channels, channels-last bands of source
        # rows for 16 channels and more (csrc/cpu/sample_band.cpp), which read channels-last
        # features in place when every channel is in a 16-channel band
        return _ops.sample_features_dense(features, coords)
    out = sample_points(features, coords.reshape(B * Ho * Wo, 2))
    return out.view(B, Ho, Wo, features.shape[1]).permute(0, 3, 1, 2)


@torch.library.register_fake("pyssl::sample_features_dense")
@same_device_fake
def _dense_fake(features, coords):
    return features.new_empty(features.shape[0], features.shape[1], coords.shape[1], coords.shape[2])


def _dense_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dense_backward(ctx, grad):
    features, coords = ctx.saved_tensors
    need_f, need_c = ctx.needs_input_grad
    gf, gc = _ops.sample_features_dense_backward(grad, features, coords, need_f, need_c)
    return (gf if need_f else None), (gc if need_c else None)


torch.library.register_autograd("pyssl::sample_features_dense", _dense_backward, setup_context=_dense_setup)


@torch.library.register_fake("pyssl::sample_features_dense_backward")
@same_device_fake
def _dense_backward_fake(grad, features, coords, features_grad, coords_grad):
    B, Ho, Wo, _ = coords.shape
    # the coordinate gradient lives in planes [B, 2, Ho, Wo] (the kernel's layout; a flow's
    # gradient is then contiguous) and is returned as its [B, Ho, Wo, 2] view
    # the feature gradient has the features' layout, NCHW or channels-last (any other strides:
    # NCHW); csrc/ops/sampling.cpp: feature_gradient
    fmt = torch.channels_last if _channels_last(features) else torch.contiguous_format
    return (features.new_empty(features.shape).contiguous(memory_format=fmt) if features_grad
            else features.new_empty(0),
            coords.new_empty(B, 2, Ho, Wo).permute(0, 2, 3, 1) if coords_grad else coords.new_empty(0))


def _dense_bw_setup(ctx, inputs, output):
    grad, features, coords, features_grad, coords_grad = inputs
    ctx.flags = (features_grad, coords_grad)
    ctx.save_for_backward(grad, features, coords)


def _dense_double_backward(ctx, gg_features, gg_coords):
    """Second derivatives through the generic (differentiable) path; rarely needed."""
    grad, features, coords = ctx.saved_tensors
    with torch.enable_grad():
        g = grad.detach().requires_grad_(True)
        f = features.detach().requires_grad_(True)
        c = coords.detach().requires_grad_(True)
        B, Ho, Wo, _ = c.shape
        out = reference.sample_points(f, None, c.reshape(-1, 2), 0).view(B, Ho, Wo, -1).permute(0, 3, 1, 2)
        gf, gc = torch.autograd.grad(out, (f, c), g, create_graph=True)
        total = 0
        if ctx.flags[0] and gg_features is not None and gg_features.numel():
            total = total + (gf * gg_features).sum()
        if ctx.flags[1] and gg_coords is not None and gg_coords.numel():
            total = total + (gc * gg_coords).sum()
        if not torch.is_tensor(total):
            return None, None, None, None, None
        dg, df, dc = torch.autograd.grad(total, (g, f, c), allow_unused=True)
    return dg, df, dc, None, None


torch.library.register_autograd("pyssl::sample_features_dense_backward", _dense_double_backward,
                                setup_context=_dense_bw_setup)


def affine_correspondence(theta: torch.Tensor, size_in, size_out) -> torch.Tensor:
    """Source-image pixel coordinates ``[B, Ho, Wo, 2]`` of every pixel of views made by the
    affine maps ``theta`` ``[B, 2, 3]`` — i.e. views ``grid_sample(image,
    affine_grid(theta, (B, C, Ho, Wo), align_corners=True), align_corners=True)`` of images of
    size ``size_in`` = (H, W): the exact correspondence of crops, flips and scales
    (:func:`crop_theta`), usable wherever a flow correspondence is. Differentiable w.r.t.
    ``theta``."""
    check_tensor(theta, "theta")
    hin, win = _size(size_in, "size_in")
    hout, wout = _size(size_out, "size_out")
    if has_kernel(theta.device):
        return _ops.affine_correspondence(theta, hin, win, hout, wout)
    return reference.affine_correspondence(theta, (hin, win), (hout, wout))


def _check_float(t, name):
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (pixel coordinates), got {t.dtype}")


_MAP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_maps(reference_name, reference, maps=(), others=()):
    """Feature maps (``maps``, with ``reference``) of a dtype the kernels take, and every tensor
    on ``reference``'s device, so that errors name the caller's arguments rather than the
    kernels' (features, xy, point_features, weights)."""
    for name, t in ((reference_name, reference), *maps):
        if t.dtype not in _MAP_DTYPES:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    for name, t in (*maps, *others):
        if t.device != reference.device:
            raise ValueError(f"{name} must be on {reference_name}'s device ({reference.device}), "
                             f"got {t.device}")


def _size(size, name):
    try:
        h, w = size
        h, w = check_int(h, name), check_int(w, name)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be (H, W) of ints, got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive (H, W), got {tuple(size)}")
    return h, w


@torch.library.register_fake("pyssl::affine_correspondence")
@same_device_fake
def _affine_fake(theta, height_in, width_in, height_out, width_out):
    return theta.new_empty(theta.shape[0], height_out, width_out, 2, dtype=_acc(theta))


def _affine_setup(ctx, inputs, output):
    theta, hin, win, hout, wout = inputs
    ctx.sizes = (hin, win, hout, wout)
    ctx.dtype = theta.dtype


def _affine_backward(ctx, grad):
    hin, win, hout, wout = ctx.sizes
    dev = grad.device
    xn = torch.linspace(-1, 1, wout, device=dev, dtype=grad.dtype) if wout > 1 else torch.zeros(1, device=dev, dtype=grad.dtype)
    yn = torch.linspace(-1, 1, hout, device=dev, dtype=grad.dtype) if hout > 1 else torch.zeros(1, device=dev, dtype=grad.dtype)
    base = torch.stack([xn[None, :].expand(hout, wout), yn[:, None].expand(hout, wout),
                        torch.ones(hout, wout, device=dev, dtype=grad.dtype)], -1)  # [Ho, Wo, 3]
    scale = torch.tensor([(win - 1) / 2, (hin - 1) / 2], device=dev, dtype=grad.dtype)
    gtheta = torch.einsum("bhwc,hwk->bck", grad * scale, base)
    return gtheta.to(ctx.dtype), None, None, None, None


torch.library.register_autograd("pyssl::affine_correspondence", _affine_backward,
                                setup_context=_affine_setup)


def crop_theta(boxes: torch.Tensor, size_in, flip: torch.Tensor | None = None) -> torch.Tensor:
    """``theta`` [B, 2, 3] of views that crop ``boxes`` [B, 4] = (x0, y0, x1, y1) (source pixel
    coordinates of the view's first and last pixel centres) and optionally flip horizontally
    (``flip`` [B] bool), for :func:`affine_correspondence` and ``F.affine_grid``."""
    check_tensor(boxes, "boxes")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [B, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    h, w = _size(size_in, "size_in")
    boxes = boxes.to(torch.float64 if boxes.dtype == torch.float64 else torch.float32)
    x0, y0, x1, y1 = boxes.unbind(1)
    ax, bx = (x1 - x0) / max(w - 1, 1), (x0 + x1) / max(w - 1, 1) - 1
    ay, by = (y1 - y0) / max(h - 1, 1), (y0 + y1) / max(h - 1, 1) - 1
    if flip is not None:
        check_tensor(flip, "flip")
        if flip.dtype != torch.bool or tuple(flip.shape) != (boxes.shape[0],):
            raise ValueError(f"flip must be a bool tensor of shape [B] = [{boxes.shape[0]}], got "
                             f"{flip.dtype} {tuple(flip.shape)}")
        if flip.device.type == "meta" and boxes.device.type != "meta":
            raise ValueError(f"flip is a meta tensor (it holds no values); pass it on boxes's device "
                             f"({boxes.device})")
        ax = torch.where(flip.to(boxes.device), -ax, ax)
    zero = torch.zeros_like(ax)
    return torch.stack([torch.stack([ax, zero, bx], -1), torch.stack([zero, ay, by], -1)], 1)


_LOSSES = {"cosine": 0, "l2_normalized": 1}


def dense_correspondence_loss(online: torch.Tensor, target: torch.Tensor, coords: torch.Tensor,
                              valid: torch.Tensor, *, loss: str = "cosine") -> torch.Tensor:
    """Mean over valid pixels of the loss between the online prediction at pixel p and the
    target features sampled (bilinearly) at ``coords(p)``.

    Args:
        online: ``[B, C, H, W]`` predictions on frame 1 / view 1 (any memory format).
        target: ``[B, C, Ht, Wt]`` target features of frame 2 / view 2.
        coords: ``[B, H, W, 2]`` matches in the target (:func:`flow_correspondence`,
            :func:`affine_correspondence`).
        valid: ``[B, H, W]`` bool (or float weights).
        loss: ``"cosine"`` (``1 - cos``) or ``"l2_normalized"`` (``|a - b|^2`` of unit vectors).
    Returns:
        A scalar (0 when no pixel is valid). Fused: the warped target map is never materialised,
        forward or backward; gradients to ``online`` and ``target``, none to ``coords`` or a
        float ``valid`` (one that requires grad is refused with a ValueError: detach it, or use
        :func:`sample_features` and a loss) (deterministic on the CPU; on
        CUDA without float atomics under ``torch.use_deterministic_algorithms``; there NCHW maps with
        16 channels or more are read through channels-last copies made for the call). On the
        CPU, float32 or bfloat16 maps (NCHW or channels-last, read in place and their gradients
        written in the same layout; other strides copied to NCHW) with float32 ``coords`` take
        dense kernels (source rows copied into channels-last bands, 16 channels at a time),
        whose results do not depend on the number of threads; other inputs (float64, float16)
        take the general pair kernels of :func:`pixel_to_point_distillation_loss`.
    """
    for name, t in (("online", online), ("target", target), ("coords", coords), ("valid", valid)):
        check_tensor(t, name)
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {tuple(_LOSSES)}, got {loss!r}")
    if online.dim() != 4 or target.dim() != 4:
        raise ValueError("online and target must be 4-D [B, C, H, W]")
    B, C, H, W = online.shape
    if target.shape[:2] != (B, C):
        raise ValueError(f"target must have B={B}, C={C}, got {tuple(target.shape)}")
    if tuple(coords.shape) != (B, H, W, 2):
        raise ValueError(f"coords must have shape [B, H, W, 2] = {(B, H, W, 2)}, got {tuple(coords.shape)}")
    if tuple(valid.shape) != (B, H, W):
        raise ValueError(f"valid must have shape [B, H, W] = {(B, H, W)}, got {tuple(valid.shape)}")
    _check_float(coords, "coords")
    _check_maps("online", online, maps=(("target", target),), others=(("coords", coords), ("valid", valid)))
    if not (valid.dtype == torch.bool or valid.is_floating_point()):
        raise TypeError(f"valid must be bool (or float weights), got {valid.dtype}")
    check_no_grad(coords, "coords", "use sample_features and a loss for gradients to the coordinates")
    check_no_grad(valid, "valid", "use sample_features and a loss for gradients to the weights")
    xy = coords.reshape(B * H * W, 2)
    weights = valid.reshape(B * H * W).to(xy.dtype)
    if has_kernel(online.device):
        return _ops.distill_loss(online, target, None, xy, weights, 0, _LOSSES[loss])[0]
    return reference.dense_correspondence_loss(online, target, coords, valid, loss)
