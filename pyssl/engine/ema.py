"""Momentum teacher: an exponential moving average of a student's parameters (BYOL, MoCo,
DINO), with buffers (e.g. BatchNorm statistics) copied."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .schedules import momentum_schedule

__all__ = ["MomentumTeacher", "ema_update"]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- m * t + (1 - m) * s`` for every parameter; buffers copied from the student."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    tp, sp = list(teacher.parameters()), list(student.parameters())
    if len(tp) != len(sp):
        raise ValueError("teacher and student have different parameter lists")
    sp = [p.detach().to(t.dtype) for t, p in zip(tp, sp)]
    torch._foreach_mul_(tp, momentum)
    torch._foreach_add_(tp, sp, alpha=1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


class MomentumTeacher(nn.Module):
    """Holds a frozen deep copy of ``student`` and updates it with a cosine momentum schedule
    from ``base_momentum`` to ``final_momentum`` over ``total_steps`` (call :meth:`update` with
    the step index after each optimizer step, e.g. from ``Recipe.on_after_optimizer_step``)."""

    def __init__(self, student: nn.Module, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, total_steps: int = 1):
        super().__init__()
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.schedule = momentum_schedule(base_momentum, max(1, total_steps), final_momentum)

    def set_total_steps(self, total_steps: int) -> None:
        self.schedule = momentum_schedule(self.schedule.base, max(1, total_steps),
                                          self.schedule.final)

    def momentum(self, step: int) -> float:
        return self.schedule(step)

    def update(self, student: nn.Module, step: int) -> float:
        m = self.momentum(step)
        ema_update(self.module, student, m)
        return m

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
