"""Where an op runs: the compiled kernel when the loaded build has one for the tensors' device,
else the plain-PyTorch reference (pyssl.ops.reference), which implements the same contract."""

from __future__ import annotations

import torch

from .._native import has_cuda_kernels


def has_kernel(device: torch.device | str) -> bool:
    """True when pyssl's compiled kernels cover ``device`` (always for CPU; for CUDA when the
    build has CUDA kernels)."""
    kind = torch.device(device).type
    if kind in ("cpu", "meta"):
        return True
    if kind == "cuda":
        return has_cuda_kernels()
    return False


def check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import operator

            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
