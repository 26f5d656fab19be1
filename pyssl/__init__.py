"""pyssl: fused C++/CUDA kernels and complete recipes for self-supervised learning."""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch before the extension)

from ._native import build_info, check_torch_version, has_cuda_kernels, release_cpu_scratch

__version__ = "0.1.0"

_mismatch = check_torch_version()
if _mismatch:
    warnings.warn(_mismatch, RuntimeWarning, stacklevel=2)

from . import ops  # noqa: E402

__all__ = ["__version__", "build_info", "has_cuda_kernels", "ops", "release_cpu_scratch"]
