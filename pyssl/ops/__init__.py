"""pyssl's fused ops. Every op is a ``torch.ops.pyssl.*`` custom op with CPU (C++) and CUDA
kernels, autograd and a fake (meta) implementation, wrapped by a documented function here.
``pyssl.ops.reference`` implements each contract in plain PyTorch."""

from . import reference
from ._dispatch import has_kernel
from .dino_loss import (
    DinoLossResult,
    dino_loss,
    ibot_patch_loss,
    ibot_weights,
    sinkhorn_knopp,
    sinkhorn_knopp_center,
)
from .flow import (
    FlowCorrespondence,
    affine_correspondence,
    crop_theta,
    dense_correspondence_loss,
    flow_correspondence,
    sample_features,
)
from .masking import MaskingResult, block_masking, random_masking, unshuffle_tokens
from .projection import (
    PixelPairs,
    Projection,
    gather_pixel_features,
    pixel_to_point_distillation_loss,
    point_pixel_pairs,
    project_points,
    segment_mean,
)
from .sampling import sample_points

__all__ = [
    "FlowCorrespondence",
    "affine_correspondence",
    "crop_theta",
    "dense_correspondence_loss",
    "flow_correspondence",
    "sample_features",
    "DinoLossResult",
    "MaskingResult",
    "PixelPairs",
    "Projection",
    "dino_loss",
    "gather_pixel_features",
    "ibot_patch_loss",
    "ibot_weights",
    "pixel_to_point_distillation_loss",
    "point_pixel_pairs",
    "project_points",
    "sinkhorn_knopp",
    "sinkhorn_knopp_center",
    "block_masking",
    "has_kernel",
    "random_masking",
    "reference",
    "sample_points",
    "segment_mean",
    "unshuffle_tokens",
]
