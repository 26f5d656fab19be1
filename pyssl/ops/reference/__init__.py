"""Plain-PyTorch implementations of every pyssl op's contract.

They are the test oracle (tests compare the compiled kernels against them in float64) and the
fallback on devices that have no compiled kernel. Readable, not fast."""

from .dino_loss import dino_loss, ibot_patch_loss, offset_logsumexp, sinkhorn_knopp
from .flow import (
    affine_correspondence,
    dense_correspondence_loss,
    flow_correspondence,
    sample_features,
)
from .masking import block_masking, random_masking, unshuffle_tokens
from .projection import (
    pixel_to_point_distillation_loss,
    point_pixel_pairs,
    project_points,
    segment_mean,
)
from .sampling import sample_points

__all__ = [
    "affine_correspondence",
    "dense_correspondence_loss",
    "flow_correspondence",
    "sample_features",
    "block_masking",
    "dino_loss",
    "ibot_patch_loss",
    "offset_logsumexp",
    "pixel_to_point_distillation_loss",
    "point_pixel_pairs",
    "project_points",
    "random_masking",
    "sample_points",
    "segment_mean",
    "sinkhorn_knopp",
    "unshuffle_tokens",
]
