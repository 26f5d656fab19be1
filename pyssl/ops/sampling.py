"""Point sampling of image features: the shared core of ``gather_pixel_features`` (LiDAR to
camera) and ``sample_features`` (optical flow). Pixel (row i, col j) is centred at x = j, y = i.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_tensor, has_kernel, same_device_fake, suggest_memory_format
from .reference.sampling import BILINEAR, NEAREST

__all__ = ["sample_points", "BILINEAR", "NEAREST"]

_ops = torch.ops.pyssl
_MODES = {"bilinear": BILINEAR, "nearest": NEAREST}


def mode_code(mode: str) -> int:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return _MODES[mode]


def sample_points(features: torch.Tensor, xy: torch.Tensor, image_index: torch.Tensor | None = None,
                  *, mode: str = "bilinear") -> torch.Tensor:
    """Samples ``features`` [N, D, H, W] (any memory format; channels-last is fastest) at
    points ``xy`` [M, 2] = (x = column, y = row) in pixel units, in images ``image_index`` [M]
    (int64) or, when None, point m in image ``m // (M / N)``.

    ``mode="bilinear"``: zeros outside, equal to ``grid_sample(align_corners=True,
    padding_mode="zeros")`` after normalisation; gradients to ``features`` and ``xy``.
    ``mode="nearest"``: the pixel at ``round(x), round(y)`` (half to even); gradient to
    ``features``. The backward into ``features`` is a scatter-add: deterministic on the CPU; on
    CUDA it uses float atomics unless ``torch.are_deterministic_algorithms_enabled()``, which
    selects a path without float atomics: for float32/16/bf16 a fixed-point scatter (each term
    rounded to a unit of at most ``max|grad| * M * 2**-61``, then added with 64-bit integer
    atomics, exact in any order; one host sync), for float64 or non-finite gradients a sort +
    segmented sums. Returns [M, D].
    """
    check_tensor(features, "features")
    check_tensor(xy, "xy")
    code = mode_code(mode)
    if has_kernel(features.device):
        return _ops.sample_points(features, image_index, xy, code)
    return reference.sample_points(features, image_index, xy, code)


@torch.library.register_fake("pyssl::sample_points")
@same_device_fake
def _sample_points_fake(features, image_index, xy, mode):
    return features.new_empty(xy.shape[0], features.shape[1])


def _setup(ctx, inputs, output):
    features, image_index, xy, mode = inputs
    ctx.mode = mode
    ctx.has_index = image_index is not None
    ctx.save_for_backward(features, xy, *([image_index] if image_index is not None else []))


def _backward(ctx, grad):
    features, xy, *idx = ctx.saved_tensors
    image_index = idx[0] if ctx.has_index else None
    need_f, need_xy = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    gf, gxy = _ops.sample_points_backward(grad, features, image_index, xy, ctx.mode, need_f,
                                          need_xy, False)
    return (gf if need_f else None), None, (gxy if need_xy else None), None


torch.library.register_autograd("pyssl::sample_points", _backward, setup_context=_setup)


@torch.library.register_fake("pyssl::sample_points_backward")
@same_device_fake
def _sample_points_backward_fake(grad, features, image_index, xy, mode, features_grad, xy_grad,
                                 deterministic):
    # the kernels' layouts: features' suggested memory format, xy contiguous
    gf = (torch.empty_like(features, memory_format=suggest_memory_format(features))
          if features_grad else features.new_empty(0))
    gxy = xy.new_empty(xy.shape) if xy_grad else xy.new_empty(0)
    return gf, gxy


def _bw_setup(ctx, inputs, output):
    grad, features, image_index, xy, mode, features_grad, xy_grad, _ = inputs
    ctx.mode = mode
    ctx.flags = (features_grad, xy_grad)
    ctx.has_index = image_index is not None
    ctx.save_for_backward(grad, features, xy, *([image_index] if image_index is not None else []))


def _double_backward(ctx, gg_features, gg_xy):
    """Second derivatives through the differentiable reference (rarely needed)."""
    grad, features, xy, *idx = ctx.saved_tensors
    image_index = idx[0] if ctx.has_index else None
    with torch.enable_grad():
        g = grad.detach().requires_grad_(True)
        f = features.detach().requires_grad_(True)
        x = xy.detach().requires_grad_(True)
        out = reference.sample_points(f, image_index, x, ctx.mode)
        gf, gx = torch.autograd.grad(out, (f, x), g, create_graph=True, allow_unused=True)
        total = 0
        if ctx.flags[0] and gg_features is not None and gg_features.numel() and gf is not None:
            total = total + (gf * gg_features).sum()
        if ctx.flags[1] and gg_xy is not None and gg_xy.numel() and gx is not None:
            total = total + (gx * gg_xy).sum()
        if not torch.is_tensor(total):
            return None, None, None, None, None, None, None, None
        dg, df, dx = torch.autograd.grad(total, (g, f, x), allow_unused=True)
    return dg, df, None, dx, None, None, None, None


torch.library.register_autograd("pyssl::sample_points_backward", _double_backward,
                                setup_context=_bw_setup)
