"""Loading of the compiled extension ``pyssl._C`` and what it reports about its build."""

from __future__ import annotations

import functools
import json
import os

import torch

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "pyssl's compiled extension (pyssl._C) failed to load: "
        f"{exc}.\nIt must be built against the torch installed here (torch {torch.__version__}); "
        "rebuild it with `pip install --no-build-isolation -e .` from the repository root."
    ) from exc


# The widest CPU kernel build the run-time dispatch may pick (csrc/cpu/simd.h reads it once).
CPU_ISAS = ("baseline", "avx2", "avx512")
_isa = os.environ.get("PYSSL_CPU_ISA")
if _isa is not None and _isa not in CPU_ISAS:
    raise ValueError(f"PYSSL_CPU_ISA={_isa!r} is not one of {', '.join(CPU_ISAS)} (the widest CPU "
                     "kernel build pyssl may use; unset it to use the widest the CPU has)")


@functools.cache
def build_info() -> dict:
    """How the loaded extension was built: version, torch version, CUDA, OpenMP, compiler, and
    ``cpu_isa``, the CPU kernel build in use ("avx512", "avx2" or "baseline")."""
    return json.loads(_C.build_info())


def has_cuda_kernels() -> bool:
    """True when the loaded build of pyssl contains CUDA kernels."""
    return bool(build_info()["cuda"])


def check_torch_version() -> str | None:
    """A warning message when the running torch differs from the one pyssl was built with."""
    built = build_info()["torch_version"]
    if built != torch.__version__:
        return (
            f"pyssl was built against torch {built} but torch {torch.__version__} is running; "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
    return None


def release_cpu_scratch() -> int:
    """Frees the scratch buffers the CPU kernels keep between calls and returns the bytes freed.

    The dense sampling and flow kernels for few channels (``ops.sample_features`` with 3 or 4
    channels, ``ops.flow_correspondence`` with a backward flow) work in interleaved copies of
    their images, kept between calls (up to 64 MiB for the images and 64 MiB for the gradient
    accumulator) because a fresh multi-MB buffer costs a page fault per 4 KiB. Call this to hand
    that memory back, e.g. after the CPU part of a job; the next call allocates again."""
    return int(_C.release_cpu_scratch())
