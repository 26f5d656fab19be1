"""Reference implementations of the DINO-loss family (plain PyTorch, the published algorithms)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def dino_loss(student, teacher, center, n_teacher_crops=2, student_temp=0.1, teacher_temp=0.04,
              skip_same_view=True, weights=None):
    """DINO v1's loss (Caron et al., 2021; DINOLoss in facebookresearch/dino): a loop over
    (teacher crop, student crop) pairs of ``-sum(q * log_softmax(s))``, batch mean, divided by the
    number of pairs. ``weights`` [B] replaces the batch mean by a weighted sum. Returns
    ``(loss, teacher_mean)``."""
    batch = teacher.shape[0] // n_teacher_crops
    n_student = student.shape[0] // batch
    s = (student / student_temp).chunk(n_student)
    q = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().chunk(n_teacher_crops)
    total, n_terms = 0.0, 0
    for i, qi in enumerate(q):
        for v in range(n_student):
            if skip_same_view and v == i:
                continue
            per_image = torch.sum(-qi * F.log_softmax(s[v], dim=-1), dim=-1)
            total = total + (per_image.mean() if weights is None else (per_image * weights).sum())
            n_terms += 1
    return total / n_terms, teacher.detach().mean(0)


def ibot_patch_loss(student_patches, teacher_patches, center, weights, student_temp=0.1,
                    teacher_temp=0.04):
    """iBOT's masked-patch loss (Zhou et al., 2022; DINOv2's iBOTPatchLoss): per masked patch,
    ``-sum(q * log_softmax(s / student_temp))`` with ``q = softmax((t - center) / teacher_temp)``,
    weighted by ``weights`` and summed. Returns ``(loss, teacher_mean)``."""
    q = F.softmax((teacher_patches - center) / teacher_temp, dim=-1).detach()
    per_patch = torch.sum(-q * F.log_softmax(student_patches / student_temp, dim=-1), dim=-1)
    return (per_patch * weights).sum(), teacher_patches.detach().mean(0)


@torch.no_grad()
def sinkhorn_knopp(teacher, teacher_temp, n_iterations=3, process_group=None):
    """DINOv2's Sinkhorn-Knopp teacher targets, in the probability domain as published
    (SinkhornKnoppTeacher.sinkhorn_knopp_teacher): overflows for large logits / small
    temperatures, which the fused log-domain version does not. Row sums of the prototype
    matrix are all-reduced across ``process_group`` when a process group is initialised."""
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(process_group) if distributed else 1
    Q = torch.exp(teacher.double() / teacher_temp).t()  # [K, B]
    n_samples = Q.shape[1] * world
    n_protos = Q.shape[0]
    total = Q.sum()
    if distributed:
        dist.all_reduce(total, group=process_group)
    Q /= total
    for _ in range(n_iterations):
        rows = Q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(rows, group=process_group)
        Q /= rows
        Q /= n_protos
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= n_samples
    Q *= n_samples
    return Q.t()


def offset_logsumexp(x, row_offset, col_offset, scale, dim):
    """``logsumexp(x * scale - row_offset[:, None] - col_offset[None, :], dim)``."""
    y = x.double() * scale
    if row_offset is not None:
        y = y - row_offset.double()[:, None]
    if col_offset is not None:
        y = y - col_offset.double()[None, :]
    return torch.logsumexp(y, dim=dim)
