"""pyssl's fused ops. Every op is a ``torch.ops.pyssl.*`` custom op with CPU (C++) and CUDA
kernels, autograd and a fake (meta) implementation, wrapped by a documented function here.
``pyssl.ops.reference`` implements each contract in plain PyTorch."""

from . import reference
from ._dispatch import has_kernel
from .masking import MaskingResult, block_masking, random_masking, unshuffle_tokens

__all__ = [
    "MaskingResult",
    "block_masking",
    "has_kernel",
    "random_masking",
    "reference",
    "unshuffle_tokens",
]
