"""Per-step schedules: cosine with linear warm-up (learning rate, weight decay) and the
cosine momentum schedule of momentum teachers (BYOL/DINO)."""

from __future__ import annotations

import math

__all__ = ["Schedule", "cosine_schedule", "momentum_schedule"]


class Schedule:
    """A value per optimizer step: linear warm-up from ``warmup_start`` to ``base`` over
    ``warmup_steps`` steps, then a half cosine from ``base`` to ``final`` over the remaining
    steps (``value(total_steps - 1) == final``). Steps past the end stay at ``final``."""

    def __init__(self, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                 warmup_start: float = 0.0):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps], got {warmup_steps}")
        self.base, self.final = float(base), float(final)
        self.total, self.warmup, self.start = int(total_steps), int(warmup_steps), warmup_start

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (self.base - self.start) * step / self.warmup
        n = self.total - self.warmup
        if n <= 1:
            return self.final if step >= self.total - 1 else self.base
        t = min(step - self.warmup, n - 1) / (n - 1)
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * t))

    def __len__(self) -> int:
        return self.total


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> Schedule:
    return Schedule(base, final, total_steps, warmup_steps, warmup_start)


def momentum_schedule(base: float, total_steps: int, final: float = 1.0) -> Schedule:
    """BYOL/DINO teacher momentum: ``final - (final - base) * (cos(pi k / K) + 1) / 2``."""
    return Schedule(base, final, total_steps, 0)
