"""The DINO loss family, fused: teacher centering + sharpening and the multi-crop
cross-entropy (DINO), the masked-patch loss (iBOT), and Sinkhorn-Knopp centering (DINOv2),
without materialising any [rows, K] probability tensor.

Rows are crop-major (``torch.cat(list_of_crops)``): crop ``c`` owns rows ``c*B .. c*B+B-1``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import reference
from ._dispatch import (check_bool, check_int, check_size, check_tensor, fake_check, has_kernel,
                        same_device_fake)

__all__ = [
    "DinoLossResult",
    "dino_loss",
    "ibot_patch_loss",
    "ibot_weights",
    "sinkhorn_knopp",
    "sinkhorn_knopp_center",
]

_ops = torch.ops.pyssl


class DinoLossResult(NamedTuple):
    loss: torch.Tensor  # scalar (float32; float64 for float64 inputs)
    teacher_mean: torch.Tensor  # [K] mean of the raw teacher rows, for the centre update


def _check_temp(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (0 < float(value) < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, *,
              n_teacher_crops: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.04,
              skip_same_view: bool = True) -> DinoLossResult:
    """DINO's multi-crop cross-entropy (Caron et al., "Emerging Properties in Self-Supervised
    Vision Transformers", 2021), fused.

    Args:
        student: ``[S*B, K]`` student head outputs for S crops (crop-major); the first
            ``n_teacher_crops`` crops are the views the teacher saw. fp32, fp16, bf16 (fp64 for
            tests); math in fp32 (fp64 for fp64 inputs).
        teacher: ``[T*B, K]`` teacher head outputs, ``T = n_teacher_crops``.
        center: ``[K]`` teacher centre.
        student_temp, teacher_temp: temperatures (> 0).
        skip_same_view: skip pairs where the student crop is the teacher's own view.

    Computes ``q_i = softmax((teacher_i - center) / teacher_temp)``,
    ``log p_v = log_softmax(student_v / student_temp)`` and the mean over the pairs
    ``(i in teacher crops, v in student crops)`` of the batch mean of ``-sum_k q_i[k] log p_v[k]``
    — exactly DINO's ``total_loss / n_loss_terms`` (``pyssl.ops.reference.dino_loss``).
    A ``-inf`` logit is a prototype of probability 0 (masked), as in torch's softmax; NaN or
    ``+inf`` logits give a NaN loss.

    Returns:
        :class:`DinoLossResult` ``(loss, teacher_mean)``; ``teacher_mean`` [K] is the mean of
        the raw teacher rows (for the EMA centre update, see ``pyssl.losses.DINOLoss``).

    Gradient: to ``student`` only (teacher and centre are targets). The forward reads each
    input once and keeps only per-row log-sum-exps for backward, which recomputes p and q; no
    [rows, K] tensor is saved or created. Reductions run in a fixed order: results are bitwise
    repeatable and do not depend on the number of threads.
    """
    check_tensor(student, "student")
    check_tensor(teacher, "teacher")
    check_tensor(center, "center")
    args = (check_int(n_teacher_crops, "n_teacher_crops", minimum=1),
            _check_temp(student_temp, "student_temp"), _check_temp(teacher_temp, "teacher_temp"),
            check_bool(skip_same_view, "skip_same_view"))
    if has_kernel(student.device):
        loss, mean, _, _ = _ops.dino_loss(student, teacher, center, None, *args)
        return DinoLossResult(loss, mean)
    return DinoLossResult(*reference.dino_loss(student, teacher, center, *args))


def ibot_patch_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor,
                    center: torch.Tensor, weights: torch.Tensor, *, student_temp: float = 0.1,
                    teacher_temp: float = 0.04) -> DinoLossResult:
    """iBOT's masked-patch loss (Zhou et al., "iBOT: Image BERT Pre-Training with Online
    Tokenizer", 2022; as in DINOv2), fused like :func:`dino_loss`.

    Args:
        student_patches: ``[M, K]`` student head outputs of the masked patch tokens.
        teacher_patches: ``[M, K]`` teacher outputs of the same patches (row m pairs with m).
        center: ``[K]`` patch centre (a Sinkhorn-Knopp centre works too).
        weights: ``[M]`` per-patch weights; DINOv2's normalisation is :func:`ibot_weights`.

    Returns ``(loss, teacher_mean)`` with
    ``loss = sum_m weights[m] * (-sum_k q_m[k] log p_m[k])``; gradient to ``student_patches``.
    """
    check_tensor(student_patches, "student_patches")
    check_tensor(teacher_patches, "teacher_patches")
    check_tensor(center, "center")
    check_tensor(weights, "weights")
    ts = _check_temp(student_temp, "student_temp")
    tt = _check_temp(teacher_temp, "teacher_temp")
    # Checked here with iBOT's names; the shared kernel would name dino_loss's arguments. Sizes
    # may be data-dependent under torch.compile (patches selected by a mask): check_size.
    if student_patches.dim() != 2:
        raise ValueError(f"student_patches must be a 2-D tensor [M, K], got shape "
                         f"{tuple(student_patches.shape)}")
    M, K = student_patches.shape
    if teacher_patches.dim() != 2:
        raise ValueError(f"teacher_patches must be a 2-D tensor [M, K], got shape "
                         f"{tuple(teacher_patches.shape)}")
    for i in range(2):
        check_size(teacher_patches.shape[i] == student_patches.shape[i],
                   lambda: f"teacher_patches must have the shape of student_patches [M, K] = "
                           f"{(M, K)} (row m pairs with row m), got {tuple(teacher_patches.shape)}")
    check_size(M > 0, lambda: "student_patches has no rows: ibot_patch_loss needs at least one "
                              "masked patch (skip the loss when no patch is masked)")
    if center.dim() != 1:
        raise ValueError(f"center must have shape [K] = [{K}], got {tuple(center.shape)}")
    check_size(center.shape[0] == K,
               lambda: f"center must have shape [K] = [{K}], got {tuple(center.shape)}")
    if weights.dim() != 1:
        raise ValueError(f"weights must have shape [M] = [{M}], got {tuple(weights.shape)}")
    check_size(weights.shape[0] == M,
               lambda: f"weights must have shape [M] = [{M}] (one per patch), got "
                       f"{tuple(weights.shape)}")
    for name, t in (("teacher_patches", teacher_patches), ("center", center), ("weights", weights)):
        if t.device != student_patches.device:
            raise RuntimeError(f"{name} is on {t.device} but student_patches is on "
                               f"{student_patches.device}; move them to the same device")
    if has_kernel(student_patches.device):
        loss, mean, _, _ = _ops.dino_loss(student_patches, teacher_patches, center, weights, 1, ts,
                                          tt, False)
        return DinoLossResult(loss, mean)
    return DinoLossResult(*reference.ibot_patch_loss(student_patches, teacher_patches, center,
                                                     weights, ts, tt))


def ibot_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per-masked-patch weights of DINOv2's iBOT loss for bool ``masks`` [N, L]: each masked
    patch of image n weighs ``1 / (n_masked(n) * N)``; returned in ``masks[masks]`` order."""
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 2:
        raise ValueError("masks must be a bool tensor [N, L] (True = masked patch), got "
                         + (f"{masks.dtype} of shape {tuple(masks.shape)}" if isinstance(masks, torch.Tensor)
                            else type(masks).__name__))
    n_images = masks.shape[0]
    per_image = 1.0 / masks.sum(-1).clamp(min=1).to(torch.float32)
    return (per_image[:, None].expand_as(masks)[masks]) / n_images


@torch.library.register_fake("pyssl::dino_loss")
@same_device_fake
def _dino_loss_fake(student, teacher, center, weights, n_teacher_crops, student_temp,
                    teacher_temp, skip_same_view):
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    for name, t in (("student", student), ("teacher", teacher)):
        fake_check(t.dim() == 2, lambda: f"{name} must be [rows, K], got shape {tuple(t.shape)}")
    K, T = student.shape[1], n_teacher_crops
    fake_check(teacher.shape[1] == K, lambda: f"teacher.shape[1] (K={teacher.shape[1]}) must equal "
                                              f"student.shape[1] (K={K})")
    fake_check(K >= 1, lambda: f"the number of prototypes K must be >= 1, got {K}")
    fake_check(T >= 1, lambda: f"n_teacher_crops must be >= 1, got {T}")
    fake_check(teacher.shape[0] > 0, lambda: f"teacher has {teacher.shape[0]} rows, which do not split "
                                             f"into n_teacher_crops={T} non-empty crops")
    fake_check(teacher.shape[0] % T == 0, lambda: f"teacher has {teacher.shape[0]} rows, which do not "
                                                  f"split into n_teacher_crops={T} non-empty crops")
    B = teacher.shape[0] // n_teacher_crops
    fake_check(student.shape[0] % B == 0, lambda: f"student has {student.shape[0]} rows, not a multiple "
                                                  f"of the batch size B={B} (teacher rows / n_teacher_crops)")
    S = student.shape[0] // B
    fake_check(S >= T, lambda: f"n_teacher_crops ({T}) must be <= the number of student crops ({S})")
    fake_check(center.dim() == 1 and center.shape[0] == K,
               lambda: f"center must have shape [K] = [{K}], got {tuple(center.shape)}")
    return (student.new_empty((), dtype=acc), student.new_empty(student.shape[1], dtype=acc),
            student.new_empty(S * B, dtype=acc), student.new_empty(teacher.shape[0], dtype=acc))


def _dino_setup(ctx, inputs, output):
    student, teacher, center, weights, *rest = inputs
    ctx.rest = rest
    ctx.has_weights = weights is not None
    saved = [student, teacher, center, output[2], output[3]]
    if weights is not None:
        saved.append(weights)
    ctx.save_for_backward(*saved)


def _dino_backward(ctx, grad_loss, _g_mean, _g_slse, _g_tlse):
    student, teacher, center, slse, tlse, *w = ctx.saved_tensors
    weights = w[0] if ctx.has_weights else None
    grad = _ops.dino_loss_backward(grad_loss, student, teacher, center, weights, slse, tlse,
                                   *ctx.rest)
    return grad, None, None, None, None, None, None, None


torch.library.register_autograd("pyssl::dino_loss", _dino_backward, setup_context=_dino_setup)


@torch.library.register_fake("pyssl::dino_loss_backward")
@same_device_fake
def _dino_loss_backward_fake(grad_loss, student, *args):
    return student.new_empty(student.shape)  # contiguous, as the kernels write it


def _dino_bw_setup(ctx, inputs, output):
    grad_loss, student, teacher, center, weights, slse, tlse, T, ts, tt, skip = inputs
    ctx.meta = (T, ts, tt, skip, weights is not None)
    ctx.save_for_backward(grad_loss, student, teacher, center, slse, tlse,
                          *([weights] if weights is not None else []))


def _dino_double_backward(ctx, gg):
    """Second derivatives (rarely needed; plain PyTorch, materialises p). dL/ds is linear in
    grad_loss and, through p = softmax(s / student_temp), a softmax Jacobian in s."""
    grad_loss, student, teacher, center, slse, tlse, *w = ctx.saved_tensors
    T, ts, tt, skip, has_w = ctx.meta
    weights = w[0] if has_w else None
    B = teacher.shape[0] // T
    S = student.shape[0] // B
    n_terms = T * S - (T if skip else 0)
    unit = _ops.dino_loss_backward(torch.ones_like(grad_loss), student, teacher, center, weights,
                                   slse, tlse, T, ts, tt, skip)
    g_grad = (gg * unit).sum().reshape(grad_loss.shape).to(grad_loss.dtype)
    acc = slse.dtype
    p = torch.exp(student.to(acc) / ts - slse[:, None])
    wb = weights.to(acc) if weights is not None else torch.full((B,), 1.0 / B, dtype=acc,
                                                                  device=student.device)
    n_v = torch.full((S,), float(T), dtype=acc, device=student.device)
    if skip:
        n_v[:T] -= 1
    row_coef = (grad_loss.to(acc) * (n_v[:, None] * wb[None, :]).reshape(-1)
                / (n_terms * ts * ts))[:, None]
    pg = p * gg.to(acc)
    g_student = (row_coef * (pg - p * pg.sum(-1, keepdim=True))).to(student.dtype)
    return g_grad, g_student, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("pyssl::dino_loss_backward", _dino_double_backward,
                                setup_context=_dino_bw_setup)


@torch.library.register_fake("pyssl::offset_logsumexp")
@same_device_fake
def _offset_lse_fake(x, row_offset, col_offset, scale, dim):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[1 - dim], dtype=acc)


def _offset_logsumexp(x, row_offset, col_offset, scale, dim):
    if has_kernel(x.device):
        return _ops.offset_logsumexp(x, row_offset, col_offset, scale, dim)
    return reference.offset_logsumexp(x, row_offset, col_offset, scale, dim).to(
        torch.float64 if x.dtype == torch.float64 else torch.float32)


def _all_logsumexp(values: torch.Tensor, group) -> torch.Tensor:
    """log(sum over ranks of exp(values)), elementwise, stable."""
    top = values.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    total = torch.exp(values - shift)
    dist.all_reduce(total, group=group)
    return shift + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp_center(teacher: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
                          process_group=None) -> torch.Tensor:
    """The centre that turns softmax centering into DINOv2's Sinkhorn-Knopp targets.

    DINOv2 (Oquab et al., 2023) normalises ``exp(teacher / teacher_temp)`` alternately over
    samples (per prototype) and over prototypes (per sample). After the last per-sample
    normalisation its targets equal ``softmax(teacher / teacher_temp - u)`` where ``u`` [K] is
    the last per-prototype log-normaliser; this returns ``center = teacher_temp * u``, so
    ``dino_loss(student, teacher, center, teacher_temp=teacher_temp)`` trains on exactly the
    Sinkhorn-Knopp targets. Computed in the log domain (fused log-sum-exp reductions, no
    [R, K] temporaries): teacher_temp = 0.04 with logits of magnitude 1e3 does not overflow,
    unlike the published version (``pyssl.ops.reference.sinkhorn_knopp``).

    Args:
        teacher: ``[R, K]`` teacher outputs (all teacher crops of this process).
        teacher_temp: temperature (> 0). n_iterations: Sinkhorn iterations (DINOv2: 3).
        process_group: when torch.distributed is initialised, the sums over samples and the
            number of samples are all-reduced across this group (default: the world), as in
            DINOv2; ranks may hold different numbers of rows, or none (every rank must call).
    Returns:
        ``[K]`` float32 centre (float64 for float64 input).
    """
    check_tensor(teacher, "teacher")
    if teacher.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"teacher must be float32, float64, float16 or bfloat16, got {teacher.dtype}")
    if teacher.dim() != 2 or teacher.shape[1] == 0:
        raise ValueError(f"teacher must be a 2-D tensor [R, K] with K >= 1 prototypes, got shape "
                         f"{tuple(teacher.shape)}")
    inv = 1.0 / _check_temp(teacher_temp, "teacher_temp")
    n_iterations = check_int(n_iterations, "n_iterations", minimum=1)
    distributed = dist.is_available() and dist.is_initialized()
    log_k = math.log(teacher.shape[1])
    if distributed:
        # Ranks may hold different numbers of rows (iBOT's masked patches), even none: the
        # sample count is all-reduced too (as DINOv2 does for patches), kept on the device.
        count = torch.tensor(float(teacher.shape[0]), device=teacher.device, dtype=torch.float64)
        dist.all_reduce(count, group=process_group)
        log_n = count.log().to(torch.float64 if teacher.dtype == torch.float64 else torch.float32)
    else:
        if teacher.shape[0] == 0:
            raise ValueError("teacher has no rows: Sinkhorn-Knopp needs at least one sample")
        log_n = math.log(teacher.shape[0])
    sample_offset = None
    proto_offset = None
    for _ in range(n_iterations):
        col = _offset_logsumexp(teacher, sample_offset, None, inv, 0)
        if distributed:
            col = _all_logsumexp(col, process_group)
        proto_offset = col + log_k
        sample_offset = _offset_logsumexp(teacher, None, proto_offset, inv, 1) + log_n
    return proto_offset * teacher_temp


@torch.no_grad()
def sinkhorn_knopp(teacher: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
                   process_group=None) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets ``[R, K]`` (rows sum to 1), materialised (for
    inspection and tests; training uses :func:`sinkhorn_knopp_center` with the fused loss)."""
    center = sinkhorn_knopp_center(teacher, teacher_temp, n_iterations, process_group=process_group)
    return torch.softmax((teacher.to(center.dtype) - center) / teacher_temp, dim=-1)
