"""Where an op runs: the compiled kernel when the loaded build has one for the tensors' device,
else the plain-PyTorch reference (pyssl.ops.reference), which implements the same contract."""

from __future__ import annotations

import functools
import inspect
import numbers

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


def check_no_grad(value: torch.Tensor, name: str, alternative: str) -> None:
    """Fused losses that do not differentiate through an input refuse it with requires_grad
    (while autograd records), rather than drop its gradient without a word."""
    if value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but this fused loss gives it no gradient: pass "
                         f"{name}.detach(), or {alternative}")


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool):  # operator.index(True) would make it 1
        raise TypeError(f"{name} must be an int, got bool")
    if not isinstance(value, int):
        try:
            import operator

            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_size(condition, message) -> None:
    """A ValueError with ``message()`` unless ``condition`` holds. Under torch.compile sizes
    may be data-dependent (unbacked): the condition then becomes a runtime assertion
    (``torch._check``) instead of a guard that cannot be decided at trace time."""
    if torch.compiler.is_compiling():
        torch._check(condition)  # dynamo takes no message closure over non-constants
    elif not condition:
        raise ValueError(message())


def check_generator(value, name: str = "generator") -> torch.Generator | None:
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def fake_check(condition, message) -> None:
    """A shape check of a C++ kernel repeated in its fake (meta) kernel, so that meta tensors
    and torch.compile's tracing refuse what the kernel refuses instead of returning a shape
    made from bad input: a ValueError with ``message()`` unless ``condition`` holds (with
    symbolic sizes, a guard or a runtime assertion)."""
    torch._check_value(condition, message)


def same_device_fake(fn):
    """Wraps a fake (meta) kernel so that it rejects tensors on different devices, as the
    compiled kernels do. Without it, one input on ``meta`` among CPU inputs would send the
    call to the fake kernel, which returns uninitialised memory instead of an error."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        first = None
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if not isinstance(v, torch.Tensor):
                    continue
                if first is None:
                    first = (name, v.device)
                elif v.device != first[1]:
                    raise RuntimeError(f"{name} is on {v.device} but {first[0]} is on {first[1]}; "
                                       "move them to the same device")
        return fn(*args, **kwargs)

    return checked


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """Python twin of ATen's ``Tensor::suggest_memory_format()``: the layout the kernels give a
    gradient shaped like ``t`` (fake kernels must predict it to the stride)."""
    try:
        from torch._prims_common import suggest_memory_format as suggest
    except ImportError:  # older torch: the same rule, spelled out
        from torch._prims_common import are_strides_like_channels_last

        def suggest(x):
            if x.layout == torch.strided and x.dim() == 4 and \
                    are_strides_like_channels_last(x.shape, x.stride()):
                return torch.channels_last
            return torch.contiguous_format
    return suggest(t)
