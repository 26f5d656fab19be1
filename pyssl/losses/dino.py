"""DINO and iBOT loss modules: centre buffer, teacher-temperature warm-up, EMA centre update
(all-reduced across ranks), or Sinkhorn-Knopp centering, over the fused ops in
pyssl.ops.dino_loss."""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import nn

from ..ops._dispatch import check_int, check_size
from ..ops.dino_loss import dino_loss, ibot_patch_loss, ibot_weights, sinkhorn_knopp_center

CENTERINGS = ("center", "sinkhorn_knopp")


class _CenteredLoss(nn.Module):
    """Shared state of DINOLoss and IBOTPatchLoss: the centre and its update."""

    def __init__(self, out_dim: int, teacher_temp: float, warmup_teacher_temp: float,
                 warmup_epochs: int, student_temp: float, center_momentum: float,
                 centering: str, sinkhorn_iterations: int, process_group):
        super().__init__()
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive int, got {out_dim!r}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        for name, value in (("teacher_temp", teacher_temp), ("student_temp", student_temp),
                            ("warmup_teacher_temp", warmup_teacher_temp),
                            ("center_momentum", center_momentum)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if name != "center_momentum" and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        warmup_epochs = check_int(warmup_epochs, "warmup_epochs", minimum=0)
        sinkhorn_iterations = check_int(sinkhorn_iterations, "sinkhorn_iterations",
                                        minimum=1 if centering == "sinkhorn_knopp" else 0)
        self.out_dim = out_dim
        self.teacher_temp = float(teacher_temp)
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.warmup_epochs = int(warmup_epochs)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.process_group = process_group
        self.register_buffer("center", torch.zeros(out_dim))
        self._pending = None  # (all-reduce work or None, [sum..., count] tensor)

    def teacher_temperature(self, epoch: float = 0) -> float:
        """DINO's schedule: ``np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)[epoch]``
        during the warm-up, ``teacher_temp`` afterwards; fractional epochs interpolate."""
        if self.warmup_epochs <= 0 or epoch >= self.warmup_epochs:
            return self.teacher_temp
        if self.warmup_epochs == 1:
            return self.warmup_teacher_temp
        frac = min(1.0, max(0.0, float(epoch)) / (self.warmup_epochs - 1))
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * frac

    def _check_out_dim(self, t: torch.Tensor, name: str) -> None:
        if t.dim() != 2 or t.shape[1] != self.out_dim:
            raise ValueError(f"{name} must be [rows, out_dim] = [rows, {self.out_dim}] (this loss was "
                             f"built with out_dim={self.out_dim}), got shape {tuple(t.shape)}")

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _center_on(self, device) -> torch.Tensor:
        if self.center.device != device:
            self.flush()
            self.center = self.center.to(device)
        return self.center

    def _update_center(self, teacher_mean: torch.Tensor, rows: int) -> None:
        """EMA update with the mean of the teacher rows over all ranks. Across ranks the sum and
        count are all-reduced asynchronously; the update is applied at the next forward (or
        flush / state_dict), so the communication overlaps the backward pass."""
        dtype = torch.float64 if self.center.dtype == torch.float64 else torch.float32
        payload = torch.cat([teacher_mean.detach().to(dtype) * rows,
                             teacher_mean.new_tensor([float(rows)], dtype=dtype)])
        if self._distributed():
            work = dist.all_reduce(payload, group=self.process_group, async_op=True)
            self._pending = (work, payload)
        elif torch.compiler.is_compiling():
            # Under torch.compile the update waits for the next call (or flush / state_dict):
            # an in-place update of the buffer after the fused op has read the centre is
            # miscompiled by inductor (torch 2.14: wrong student gradients; measured), while
            # an update before the read is compiled correctly.
            self._pending = (None, payload)
        else:
            self._apply_center_update(payload)

    def _apply_center_update(self, payload: torch.Tensor) -> None:
        count = payload[-1]
        batch_center = (payload[:-1] / count).to(self.center.dtype)
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        # no rows on any rank (iBOT without masked patches): the centre stays (no host sync)
        self.center.copy_(torch.where(count > 0, updated, self.center))

    @torch.no_grad()
    def flush(self) -> None:
        """Waits for a pending cross-rank centre update and applies it."""
        if self._pending is not None:
            work, payload = self._pending
            self._pending = None
            if work is not None:
                work.wait()
            self._apply_center_update(payload)

    def state_dict(self, *args, **kwargs):
        self.flush()
        return super().state_dict(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._pending = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _targets_center(self, teacher: torch.Tensor, temp: float) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp_center(teacher, temp, self.sinkhorn_iterations,
                                         process_group=self.process_group)
        self.flush()
        # A copy: the op keeps the centre for backward, and the EMA update changes the buffer
        # in place before the backward pass runs.
        return self._center_on(teacher.device).clone()

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, centering={self.centering!r}, "
                f"teacher_temp={self.teacher_temp}, student_temp={self.student_temp}")


class DINOLoss(_CenteredLoss):
    """DINO's loss module (Caron et al., 2021) over the fused :func:`pyssl.ops.dino_loss`.

    ``loss = DINOLoss(out_dim)(student_out, teacher_out, epoch)`` with crop-major rows
    (``[S*B, K]`` and ``[T*B, K]``). Holds the centre buffer (on the inputs' device), the
    teacher-temperature warm-up, and the EMA centre update over all ranks (DINO's
    ``update_center``), or DINOv2's Sinkhorn-Knopp targets with
    ``centering="sinkhorn_knopp"`` (no centre buffer update then).

    Under ``torch.compile`` (``fullgraph=True`` works) the EMA update of a call is applied at the
    start of the next call, or by ``flush()`` / ``state_dict()``: read ``center`` after
    ``flush()`` there. Eagerly and in one process it is applied before ``forward`` returns.
    """

    def __init__(self, out_dim: int, n_teacher_crops: int = 2, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_epochs: int = 0,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", *, sinkhorn_iterations: int = 3,
                 skip_same_view: bool = True, process_group=None):
        super().__init__(out_dim, teacher_temp, warmup_teacher_temp, warmup_epochs, student_temp,
                         center_momentum, centering, sinkhorn_iterations, process_group)
        self.n_teacher_crops = check_int(n_teacher_crops, "n_teacher_crops", minimum=1)
        self.skip_same_view = bool(skip_same_view)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: float = 0) -> torch.Tensor:
        self._check_out_dim(student_output, "student_output")
        self._check_out_dim(teacher_output, "teacher_output")
        teacher_output = teacher_output.detach()
        temp = self.teacher_temperature(epoch)
        center = self._targets_center(teacher_output, temp)
        loss, teacher_mean = dino_loss(student_output, teacher_output, center,
                                       n_teacher_crops=self.n_teacher_crops,
                                       student_temp=self.student_temp, teacher_temp=temp,
                                       skip_same_view=self.skip_same_view)
        if self.centering == "center" and self.training:
            self._update_center(teacher_mean, teacher_output.shape[0])
        return loss


class IBOTPatchLoss(_CenteredLoss):
    """iBOT's masked-patch loss module (as in DINOv2) over the fused
    :func:`pyssl.ops.ibot_patch_loss`: ``loss(student_patches [M, K], teacher_patches [M, K],
    masks [N, L] bool, epoch)`` with rows in ``masks[masks]`` order, weighted per image as in
    DINOv2 (:func:`pyssl.ops.ibot_weights`)."""

    def __init__(self, out_dim: int, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_epochs: int = 0,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", *, sinkhorn_iterations: int = 3, process_group=None):
        super().__init__(out_dim, teacher_temp, warmup_teacher_temp, warmup_epochs, student_temp,
                         center_momentum, centering, sinkhorn_iterations, process_group)

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor,
                masks: torch.Tensor, epoch: float = 0) -> torch.Tensor:
        self._check_out_dim(student_patches, "student_patches")
        self._check_out_dim(teacher_patches, "teacher_patches")
        teacher_patches = teacher_patches.detach()
        temp = self.teacher_temperature(epoch)
        weights = ibot_weights(masks).to(student_patches.device)
        for name, t in (("student_patches", student_patches), ("teacher_patches", teacher_patches)):
            # (data-dependent under torch.compile: check_size makes it a runtime assertion)
            check_size(t.shape[0] == weights.shape[0],
                       lambda: f"masks marks {weights.shape[0]} patches, but {name} has {t.shape[0]} "
                               f"rows (one per masked patch, in masks[masks] order)")
        if teacher_patches.shape[0] == 0:
            # No masked patch here. Under torch.distributed the other ranks still wait for this
            # rank's share of the collectives (Sinkhorn-Knopp sums, centre update): join them.
            if self._distributed():
                if self.centering == "sinkhorn_knopp":
                    self._targets_center(teacher_patches, temp)
                elif self.training:
                    self.flush()  # the previous step's update first, as _targets_center does
                    self._update_center(teacher_patches.new_zeros(teacher_patches.shape[1]), 0)
            return student_patches.sum() * 0.0
        center = self._targets_center(teacher_patches, temp)
        loss, teacher_mean = ibot_patch_loss(student_patches, teacher_patches, center, weights,
                                             student_temp=self.student_temp, teacher_temp=temp)
        if self.centering == "center" and self.training:
            self._update_center(teacher_mean, teacher_patches.shape[0])
        return loss
