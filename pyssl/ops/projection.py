"""Point-to-pixel projection for image-to-LiDAR distillation (SLidR, ScaLR): LiDAR points to
multi-camera pixels, compacted point-pixel pairs, pixel-feature gathers, superpixel pooling.

Conventions: LiDAR frame as nuScenes (x forward, y left, z up); ``lidar_to_cam`` [C, 4, 4] maps
LiDAR-frame points to OpenCV-style camera frames (x right, y down, z forward); ``intrinsics``
[C, 3, 3] pinhole matrices; pixel (row i, col j) has its centre at u = j, v = i.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import reference
from ._dispatch import (check_generator, check_int, check_no_grad, check_tensor, fake_check, has_kernel,
                        same_device_fake, suggest_memory_format)
from .sampling import sample_points

__all__ = [
    "PixelPairs",
    "Projection",
    "gather_pixel_features",
    "pixel_to_point_distillation_loss",
    "point_pixel_pairs",
    "project_points",
    "segment_mean",
]

_ops = torch.ops.pyssl
_ROUNDING = {"none": 0, "floor": 1, "round": 2}
_CAMERAS = {"all": 0, "first": 1, "random": 2}


class Projection(NamedTuple):
    pixels: torch.Tensor  # [C, P, 2] (u = column, v = row)
    depth: torch.Tensor  # [C, P] camera z
    valid: torch.Tensor  # [C, P] bool


class PixelPairs(NamedTuple):
    point_index: torch.Tensor  # [M] int64
    camera_index: torch.Tensor  # [M] int64
    row: torch.Tensor  # [M] int64
    col: torch.Tensor  # [M] int64


def _image_size_tensor(image_size, lidar_to_cam: torch.Tensor, batched: bool) -> torch.Tensor:
    """(H, W) / [C, 2] / [B, C, 2] -> a tensor of the op's layout. Python sizes are checked
    here; a size tensor is passed through (a non-positive size simply makes every point
    invalid, since no pixel satisfies 0 <= u <= W - 1)."""
    C = lidar_to_cam.shape[-3] if lidar_to_cam.dim() >= 3 else 0
    if isinstance(image_size, torch.Tensor):
        if image_size.is_complex() or image_size.dtype == torch.bool:
            raise TypeError(f"image_size must be a real tensor of sizes, got {image_size.dtype}")
        if image_size.device.type == "meta" and lidar_to_cam.device.type != "meta":
            raise ValueError("image_size is a meta tensor (it holds no sizes); pass it on "
                             f"lidar_to_cam's device ({lidar_to_cam.device}) or as (H, W)")
        size = image_size.to(lidar_to_cam.device)
    else:
        def flat(x):
            if isinstance(x, (list, tuple)):
                return [v for item in x for v in flat(item)]
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise TypeError(f"image_size must be (H, W), [C, 2] or a tensor, got {image_size!r}")
            return [x]

        if not all(0 < v < 2**31 for v in flat(image_size)):  # NaN fails too
            raise ValueError(f"image_size entries must be positive and below 2**31, got "
                             f"{image_size!r}")
        size = torch.tensor(image_size, dtype=torch.float64, device=lidar_to_cam.device)
    if size.dim() == 1:
        if size.numel() != 2:
            raise ValueError(f"image_size must be (H, W), got shape {tuple(size.shape)}")
        size = size.expand(C, 2)
    if batched and size.dim() == 2:
        size = size.expand(lidar_to_cam.shape[0], *size.shape)
    return size


def _check_devices(points, **tensors):
    for name, t in tensors.items():
        if t is not None:
            check_tensor(t, name)
            if t.device != points.device:
                raise RuntimeError(f"{name} is on {t.device} but points are on {points.device}; "
                                   "move them to the same device")


def _options(min_depth, margin, rounding):
    for name, value in (("min_depth", min_depth), ("margin", margin)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0 <= float(min_depth) < math.inf:
        raise ValueError(f"min_depth must be finite and >= 0 (a negative one validates points "
                         f"behind the camera), got {min_depth}")
    if not float(margin) >= 0:
        raise ValueError(f"margin must be >= 0 (a negative margin validates pixels outside the "
                         f"image), got {margin}")
    if rounding not in _ROUNDING:
        raise ValueError(f"rounding must be one of {tuple(_ROUNDING)}, got {rounding!r}")
    return float(min_depth), float(margin), _ROUNDING[rounding]


def project_points(points: torch.Tensor, lidar_to_cam: torch.Tensor, intrinsics: torch.Tensor,
                   image_size, *, min_depth: float = 1.0, margin: float = 0.0,
                   rounding: str = "none", batch: torch.Tensor | None = None) -> Projection:
    """Projects LiDAR points into C calibrated cameras in one pass.

    Args:
        points: ``[P, 3+]`` (x, y, z in the LiDAR frame; extra columns such as intensity are
            ignored).
        lidar_to_cam: ``[C, 4, 4]`` (``[B, C, 4, 4]`` with ``batch``).
        intrinsics: ``[C, 3, 3]`` (``[B, C, 3, 3]`` with ``batch``).
        image_size: ``(H, W)``, or ``[C, 2]`` / ``[B, C, 2]`` per camera (Python sizes must be
            below 2**31; a size tensor's sides above 2**31 count as 2**31).
        min_depth: points at camera depth ``<= min_depth`` are invalid.
        margin: pixels closer than ``margin`` (>= 0) to the border are invalid.
        rounding: ``"none"`` | ``"floor"`` (ScaLR) | ``"round"`` (SLidR; half to even).
        batch: optional ``[P]`` int64 scan index of each point, for several scans at once.

    Computes ``p_cam = R p + t``, ``depth = p_cam.z``, ``(u, v) = (K p_cam)[:2] / depth`` —
    identical to nuscenes-devkit's ``view_points(..., normalize=True)`` — then
    ``valid = depth > min_depth and margin <= u <= W-1-margin and margin <= v <= H-1-margin``
    (after rounding); NaN/inf points are invalid. Math in float32 (float64 if any input is).

    Returns:
        :class:`Projection` ``(pixels [C, P, 2] (u = column, v = row), depth [C, P],
        valid bool [C, P])``. Gradients (``rounding="none"``) flow to points, lidar_to_cam and
        intrinsics.
    """
    check_tensor(points, "points")
    _check_devices(points, lidar_to_cam=lidar_to_cam, intrinsics=intrinsics, batch=batch)
    md, mg, rd = _options(min_depth, margin, rounding)
    size = _image_size_tensor(image_size, lidar_to_cam, batch is not None)
    if has_kernel(points.device):
        return Projection(*_ops.project_points(points, lidar_to_cam, intrinsics, size, batch, md, mg, rd))
    if batch is not None:
        raise NotImplementedError("the batched form needs pyssl's compiled kernels")
    return Projection(*reference.project_points(points, lidar_to_cam, intrinsics, size, md, mg, rounding))


def _acc(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.register_fake("pyssl::project_points")
@same_device_fake
def _project_fake(points, lidar_to_cam, intrinsics, image_size, batch, min_depth, margin, rounding):
    acc = _acc(points, lidar_to_cam, intrinsics)
    fake_check(points.dim() == 2 and points.shape[1] >= 3,
               lambda: f"points must be [P, 3+] (x, y, z, extra columns ignored), got {tuple(points.shape)}")
    lead = 2 if batch is not None else 1
    fake_check(lidar_to_cam.dim() == lead + 2 and lidar_to_cam.shape[-1] == 4 and lidar_to_cam.shape[-2] == 4,
               lambda: f"lidar_to_cam must be {'[B, C, 4, 4]' if batch is not None else '[C, 4, 4]'}, got "
                       f"{tuple(lidar_to_cam.shape)}")
    fake_check(intrinsics.shape[:-2] == lidar_to_cam.shape[:-2] and intrinsics.shape[-2:] == (3, 3),
               lambda: f"intrinsics must be [..., C, 3, 3] matching lidar_to_cam {tuple(lidar_to_cam.shape)}, "
                       f"got {tuple(intrinsics.shape)}")
    C, P = lidar_to_cam.shape[-3], points.shape[0]
    return (points.new_empty(C, P, 2, dtype=acc), points.new_empty(C, P, dtype=acc),
            points.new_empty(C, P, dtype=torch.bool))


def _project_setup(ctx, inputs, output):
    points, lidar_to_cam, intrinsics, image_size, batch, min_depth, margin, rounding = inputs
    ctx.rounding = rounding
    ctx.has_batch = batch is not None
    ctx.save_for_backward(points, lidar_to_cam, intrinsics, *([batch] if batch is not None else []))


def _project_backward(ctx, g_pixels, g_depth, _g_valid):
    """Exact derivatives of the projection, in plain PyTorch (linear algebra, not a hot path).
    With rounding the pixels are piecewise constant: only depth carries a gradient."""
    points, lidar_to_cam, intrinsics, *b = ctx.saved_tensors
    acc = _acc(points, lidar_to_cam, intrinsics)
    p = points[:, :3].to(acc)
    M, K = lidar_to_cam.to(acc), intrinsics.to(acc)
    if ctx.has_batch:
        M, K = M[b[0]].transpose(0, 1), K[b[0]].transpose(0, 1)  # [C, P, 4, 4], [C, P, 3, 3]
        q = torch.einsum("cpij,pj->cpi", M[..., :3, :3], p) + M[..., :3, 3]
        w = torch.einsum("cpij,cpj->cpi", K, q)
    else:
        q = torch.einsum("cij,pj->cpi", M[:, :3, :3], p) + M[:, None, :3, 3]
        w = torch.einsum("cij,cpj->cpi", K, q)
    z = q[..., 2]
    g_pixels = torch.zeros_like(w[..., :2]) if (g_pixels is None or ctx.rounding != 0) else g_pixels.to(acc)
    g_depth = torch.zeros_like(z) if g_depth is None else g_depth.to(acc)
    gu, gv = g_pixels[..., 0], g_pixels[..., 1]
    grad_w = torch.stack([gu / z, gv / z, torch.zeros_like(z)], -1)
    if ctx.has_batch:
        grad_q = torch.einsum("cpji,cpj->cpi", K, grad_w)
    else:
        grad_q = torch.einsum("cji,cpj->cpi", K, grad_w)
    grad_q = grad_q.clone()
    grad_q[..., 2] += g_depth - (gu * w[..., 0] + gv * w[..., 1]) / (z * z)
    grads = [None] * 8
    if ctx.needs_input_grad[0]:
        R = M[..., :3, :3]
        gp = torch.einsum("cpji,cpj->pi", R, grad_q) if ctx.has_batch else torch.einsum("cji,cpj->pi", R, grad_q)
        full = torch.zeros_like(points, dtype=acc)
        full[:, :3] = gp
        grads[0] = full.to(points.dtype)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        gM = torch.cat([torch.einsum("cpi,pj->cpij", grad_q, p), grad_q[..., None]], -1)  # [C,P,3,4]
        gK = torch.einsum("cpi,cpj->cpij", grad_w, q)  # [C, P, 3, 3]
        if ctx.has_batch:
            onehot = torch.nn.functional.one_hot(b[0], lidar_to_cam.shape[0]).to(acc)  # [P, B]
            gM = torch.einsum("pb,cpij->bcij", onehot, gM)
            gK = torch.einsum("pb,cpij->bcij", onehot, gK)
        else:
            gM, gK = gM.sum(1), gK.sum(1)
        if ctx.needs_input_grad[1]:
            full = torch.zeros_like(lidar_to_cam, dtype=acc)
            full[..., :3, :] = gM
            grads[1] = full.to(lidar_to_cam.dtype)
        if ctx.needs_input_grad[2]:
            grads[2] = gK.to(intrinsics.dtype)
    return tuple(grads)


torch.library.register_autograd("pyssl::project_points", _project_backward,
                                setup_context=_project_setup)


def point_pixel_pairs(points: torch.Tensor, lidar_to_cam: torch.Tensor, intrinsics: torch.Tensor,
                      image_size, *, min_depth: float = 1.0, margin: float = 0.0,
                      rounding: str = "round", cameras: str = "all",
                      generator: torch.Generator | None = None,
                      batch: torch.Tensor | None = None) -> PixelPairs:
    """The valid (point, camera, pixel) pairs of :func:`project_points`, compacted.

    Same geometry and validity as :func:`project_points` with integer pixels (``rounding`` is
    ``"round"`` (default, the pixel whose centre is nearest) or ``"floor"``). ``cameras``:
    ``"all"`` every valid camera of each point; ``"first"`` the lowest-index valid camera;
    ``"random"`` one valid camera drawn uniformly per point from ``generator``.

    Returns:
        :class:`PixelPairs` ``(point_index, camera_index, row, col)``, int64 [M], ordered by
        point, then camera (deterministic; the output size is data dependent, so on CUDA this
        synchronises once). With ``batch``, ``camera_index`` is the camera within the point's
        scan (0..C-1): for features stacked as ``[B*C, D, H, W]`` index them with
        ``batch[point_index] * C + camera_index``.
    """
    check_tensor(points, "points")
    _check_devices(points, lidar_to_cam=lidar_to_cam, intrinsics=intrinsics, batch=batch)
    md, mg, rd = _options(min_depth, margin, rounding)
    if cameras not in _CAMERAS:
        raise ValueError(f"cameras must be one of {tuple(_CAMERAS)}, got {cameras!r}")
    size = _image_size_tensor(image_size, lidar_to_cam, batch is not None)
    random = None
    check_generator(generator)
    if cameras == "random":
        gen_device = generator.device if generator is not None else points.device
        random = torch.rand(points.shape[0], generator=generator, device=gen_device,
                            dtype=torch.float64).to(points.device)
    if not has_kernel(points.device):
        raise NotImplementedError(f"point_pixel_pairs has no kernel for device {points.device}")
    return PixelPairs(*_ops.point_pixel_pairs(points, lidar_to_cam, intrinsics, size, batch, md, mg,
                                              rd, _CAMERAS[cameras], random))


@torch.library.register_fake("pyssl::point_pixel_pairs")
@same_device_fake
def _pairs_fake(points, lidar_to_cam, intrinsics, image_size, batch, min_depth, margin, rounding,
                cameras, random):
    n = torch.library.get_ctx().new_dynamic_size()
    return tuple(points.new_empty(n, dtype=torch.long) for _ in range(4))


def gather_pixel_features(features: torch.Tensor, camera_index: torch.Tensor, row: torch.Tensor,
                          col: torch.Tensor, *, mode: str = "nearest") -> torch.Tensor:
    """Reads per-camera image features at point-pixel pairs.

    Args:
        features: ``[C, D, H, W]`` (channels-last memory format is fastest).
        camera_index, row, col: ``[M]`` pairs, e.g. from :func:`point_pixel_pairs`. For
            ``mode="nearest"`` row/col are integer pixels, inside the image (a ValueError
            otherwise); for ``mode="bilinear"`` they are float pixel coordinates (u = col,
            v = row), zeros outside the image.
    Returns:
        ``[M, D]``. Gradient to ``features`` (a scatter-add: deterministic on the CPU; on CUDA
        without float atomics when ``torch.are_deterministic_algorithms_enabled()``), and to
        row/col in bilinear mode.

    For a cosine or normalised-L2 distillation loss, :func:`pixel_to_point_distillation_loss`
    reads the same features without this ``[M, D]`` copy (on the CPU it is also faster:
    benchmarks/RESULTS.md).
    """
    for name, t in (("features", features), ("camera_index", camera_index), ("row", row), ("col", col)):
        check_tensor(t, name)
    if not (camera_index.shape == row.shape == col.shape) or camera_index.dim() != 1:
        raise ValueError(f"camera_index, row and col must be 1-D of the same length, got "
                         f"{tuple(camera_index.shape)}, {tuple(row.shape)}, {tuple(col.shape)}")
    _check_camera_index(camera_index, features, row, col)
    xy = _pair_coordinates(features, row, col, mode)
    _check_pair_ranges(features, camera_index, row, col, mode)
    return sample_points(features, xy, camera_index.long(), mode=mode)


_LOSSES = {"cosine": 0, "l2_normalized": 1}


def _check_camera_index(camera_index, features, row, col):
    """camera_index: integer; camera_index, row and col on features's device."""
    if camera_index.is_floating_point() or camera_index.is_complex() or \
            camera_index.dtype == torch.bool:
        raise TypeError(f"camera_index must be an integer tensor, got {camera_index.dtype}")
    for name, t in (("camera_index", camera_index), ("row", row), ("col", col)):
        if t.device != features.device:
            raise ValueError(f"{name} must be on features's device ({features.device}), got {t.device}")


def _values_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host is possible and allowed here."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t):
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _check_pair_ranges(features, camera_index, row, col, mode):
    """camera_index in [0, C) and, in nearest mode, row in [0, H) and col in [0, W): integer
    pixels are indices, so one outside the image is a caller's bug (swapped row and col, pixels
    of points no camera sees), not a miss; float coordinates in bilinear mode may fall outside
    and read zeros. One host sync for all three (the kernels check camera_index again, for
    torch.ops callers). Skipped where the values cannot be read: under torch.compile, on meta
    or fake tensors, and while a CUDA graph is being captured (a sync would end the capture)."""
    if features.dim() != 4 or camera_index.numel() == 0 or not _values_readable(camera_index):
        return
    named = [("camera_index", camera_index, features.shape[0])]
    if mode == "nearest":
        named += [("row", row, features.shape[2]), ("col", col, features.shape[3])]
    bounds = torch.stack([v.long() for _, t, _ in named for v in torch.aminmax(t)]).tolist()
    for i, (name, _, size) in enumerate(named):
        lo, hi = bounds[2 * i], bounds[2 * i + 1]
        if lo < 0 or hi >= size:
            what = "(one map per camera in features)" if name == "camera_index" else "in mode='nearest'"
            raise ValueError(f"{name} values must be in [0, {size}) {what}, got values in [{lo}, {hi}]")


def _pair_coordinates(features, row, col, mode):
    if mode == "nearest":
        for name, t in (("row", row), ("col", col)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"mode='nearest' takes integer row/col (use mode='bilinear' for float "
                                f"coordinates), got {name} of dtype {t.dtype}")
        coord_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    elif mode == "bilinear":
        if not (row.is_floating_point() and col.is_floating_point()):
            raise TypeError("mode='bilinear' takes floating-point row/col")
        coord_dtype = torch.promote_types(row.dtype, col.dtype)
    else:
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    return torch.stack([col.to(coord_dtype), row.to(coord_dtype)], dim=-1)


def pixel_to_point_distillation_loss(point_features: torch.Tensor, features: torch.Tensor,
                                     camera_index: torch.Tensor, row: torch.Tensor,
                                     col: torch.Tensor, *, loss: str = "cosine",
                                     mode: str = "nearest") -> torch.Tensor:
    """Image-to-LiDAR distillation loss read straight from the 2D feature maps (SLidR / ScaLR).

    For each pair m (e.g. from :func:`point_pixel_pairs`): ``f`` = ``features[camera_index[m]]``
    at (``row[m]``, ``col[m]``) (``mode`` as in :func:`gather_pixel_features`), ``g`` =
    ``point_features[m]``; with ``a = f / max(|f|, 1e-12)``, ``b = g / max(|g|, 1e-12)``
    (``F.normalize``): ``loss="cosine"``: ``1 - a.b``; ``loss="l2_normalized"``: ``|a - b|^2``
    (ScaLR). Returns the mean over pairs (a scalar, float32; float64 for float64 inputs).

    Fused: no ``[M, D]`` copy of the pixel features is made in the forward or backward, and
    only three scalars per pair are kept for backward. Gradients to ``point_features`` and
    ``features`` (the scatter-add into ``features`` is deterministic on the CPU; on CUDA without
    float atomics under ``torch.use_deterministic_algorithms``); row/col get none (a row or col that
    requires grad is refused with a ValueError). On CUDA, NCHW maps
    with 16 channels or more are read through a channels-last copy made for the call (memory
    of one map while it runs, nothing kept), so that a warp's reads of a pixel are coalesced.
    """
    for name, t in (("point_features", point_features), ("features", features),
                    ("camera_index", camera_index), ("row", row), ("col", col)):
        check_tensor(t, name)
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {tuple(_LOSSES)}, got {loss!r}")
    if not (camera_index.shape == row.shape == col.shape) or camera_index.dim() != 1:
        raise ValueError("camera_index, row and col must be 1-D of the same length")
    _check_camera_index(camera_index, features, row, col)
    for name, t in (("row", row), ("col", col)):
        check_no_grad(t, name, "use gather_pixel_features and a loss for gradients to the pixels")
    xy = _pair_coordinates(features, row, col, mode)
    _check_pair_ranges(features, camera_index, row, col, mode)
    code = 0 if mode == "bilinear" else 1
    if has_kernel(features.device):
        return _ops.distill_loss(point_features, features, camera_index.long(), xy, None, code,
                                 _LOSSES[loss])[0]
    return reference.pixel_to_point_distillation_loss(point_features, features, camera_index.long(),
                                                       xy, code, loss)


@torch.library.register_fake("pyssl::distill_loss")
@same_device_fake
def _distill_fake(point_features, features, image_index, xy, weights, mode, loss):
    acc = torch.float64 if torch.float64 in (features.dtype, xy.dtype) else torch.float32
    return features.new_empty((), dtype=acc), features.new_empty(xy.shape[0], 3, dtype=acc)


def _distill_setup(ctx, inputs, output):
    point_features, features, image_index, xy, weights, mode, loss = inputs
    ctx.meta = (mode, loss, image_index is not None, weights is not None)
    ctx.save_for_backward(point_features, features, xy, output[1],
                          *([image_index] if image_index is not None else []),
                          *([weights] if weights is not None else []))


def _distill_backward(ctx, grad_loss, _grad_stats):
    point_features, features, xy, stats, *rest = ctx.saved_tensors
    mode, loss, has_index, has_weights = ctx.meta
    index = rest.pop(0) if has_index else None
    weights = rest.pop(0) if has_weights else None
    need_pf, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gpf, gf = _ops.distill_loss_backward(grad_loss, point_features, features, index, xy, weights,
                                         stats, mode, loss, need_pf, need_f, False)
    return (gpf if need_pf else None), (gf if need_f else None), None, None, None, None, None


torch.library.register_autograd("pyssl::distill_loss", _distill_backward, setup_context=_distill_setup)


@torch.library.register_fake("pyssl::distill_loss_backward")
@same_device_fake
def _distill_backward_fake(grad_loss, point_features, features, image_index, xy, weights, stats, mode,
                           loss, point_features_grad, features_grad, deterministic):
    return (torch.empty_like(point_features) if point_features_grad else point_features.new_empty(0),
            torch.empty_like(features, memory_format=suggest_memory_format(features))
            if features_grad else features.new_empty(0))


def segment_mean(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, *,
                 deterministic: bool = False):
    """Mean of the rows of ``values`` [N, D] per segment (superpixel pooling, SLidR), without
    sparse matrices.

    ``segment_ids`` [N] int64 in ``[0, num_segments)``, or -1 for rows to ignore. Returns
    ``(means [S, D], counts [S] int64)``; empty segments have mean 0. Gradient to ``values``
    (a gather). The forward sum is deterministic on the CPU; on CUDA it uses float atomics
    unless ``deterministic`` or ``torch.are_deterministic_algorithms_enabled()``.
    """
    check_tensor(values, "values")
    check_tensor(segment_ids, "segment_ids")
    num_segments = check_int(num_segments, "num_segments")
    if not has_kernel(values.device):
        raise NotImplementedError(f"segment_mean has no kernel for device {values.device}")
    return tuple(_ops.segment_mean(values, segment_ids, num_segments, bool(deterministic)))


@torch.library.register_fake("pyssl::segment_mean")
@same_device_fake
def _segment_fake(values, segment_ids, num_segments, deterministic):
    fake_check(values.dim() == 2, lambda: f"values must be [N, D], got shape {tuple(values.shape)}")
    fake_check(segment_ids.dim() == 1 and segment_ids.shape[0] == values.shape[0],
               lambda: f"segment_ids must be [N] = [{values.shape[0]}], got {tuple(segment_ids.shape)}")
    fake_check(num_segments >= 0, lambda: f"num_segments must be >= 0, got {num_segments}")
    return (values.new_empty(num_segments, values.shape[1]),
            segment_ids.new_empty(num_segments, dtype=torch.long))


def _segment_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], output[1])


def _segment_backward(ctx, grad_means, _grad_counts):
    ids, counts = ctx.saved_tensors
    return _ops.segment_mean_backward(grad_means, ids, counts), None, None, None


@torch.library.register_fake("pyssl::segment_mean_backward")
@same_device_fake
def _segment_backward_fake(grad_means, segment_ids, counts):
    return grad_means.new_empty(segment_ids.shape[0], grad_means.shape[1])


def _segment_bw_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _segment_double_backward(ctx, grad):
    # the backward is linear in grad_means: its adjoint is the segment sum divided by the counts
    ids, counts = ctx.saved_tensors
    means, _ = _ops.segment_mean(grad, ids, counts.shape[0], False)
    return means, None, None


torch.library.register_autograd("pyssl::segment_mean_backward", _segment_double_backward,
                                setup_context=_segment_bw_setup)


torch.library.register_autograd("pyssl::segment_mean", _segment_backward, setup_context=_segment_setup)
