"""Plain-PyTorch implementations of every pyssl op's contract.

They are the test oracle (tests compare the compiled kernels against them in float64) and the
fallback on devices that have no compiled kernel. Readable, not fast."""

from .masking import block_masking, random_masking, unshuffle_tokens
from .projection import project_points

__all__ = ["block_masking", "project_points", "random_masking", "unshuffle_tokens"]
