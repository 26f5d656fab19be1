"""Backbone registry: one name + keyword arguments -> an encoder with ``forward_features``.

A checkpoint stores the encoder as ``{"spec": {"name", "in_chans", "image_size", "kwargs"},
"state_dict"}``; ``build_backbone(**spec)`` rebuilds it, so evaluation never imports a recipe.

Names: ``resnet_tiny`` (ResNet-10, width 32: CPU-sized), ``resnet10``, ``resnet18``,
``resnet34``, ``resnet50``, ``resnet101``; ``vit_micro`` (2 blocks, dim 64: tests),
``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``; ``vq_encoder`` (the VQ tokenizer's
encoder). ResNets use the small-image stem when
``image_size <= 64``; ViTs use 4 px patches when ``image_size <= 64`` and 16 px otherwise.
"""

from __future__ import annotations

from torch import nn

from .resnet import ResNet
from .vit import VisionTransformer, vit_config

__all__ = ["BACKBONES", "build_backbone", "parse_backbone"]

BACKBONES = {
    "resnet_tiny": "ResNet-10 with 32 first-stage channels (~1.2M params; CPU-sized)",
    "resnet10": "ResNet-10 (one BasicBlock per stage)",
    "resnet18": "ResNet-18 (torchvision blocks)",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50 (Bottleneck blocks)",
    "resnet101": "ResNet-101",
    "vit_micro": "ViT, dim 64, 2 blocks, 2 heads (tests)",
    "vit_tiny": "ViT-Ti: dim 192, 12 blocks, 3 heads",
    "vit_small": "ViT-S: dim 384, 12 blocks, 6 heads",
    "vit_base": "ViT-B: dim 768, 12 blocks, 12 heads",
    "vit_large": "ViT-L: dim 1024, 24 blocks, 16 heads",
    "vq_encoder": "VQ-VAE tokenizer encoder (pyssl.models.tokenizer.VQEncoder; features before "
                  "quantisation)",
}


def parse_backbone(name: str) -> str:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    return name


def build_backbone(name: str, in_chans: int = 3, image_size: int = 224,
                   kwargs: dict | None = None) -> nn.Module:
    """Build a backbone. ``kwargs`` override the defaults (e.g. ``{"width": 16}`` for a
    ResNet, ``{"patch_size": 8, "depth": 4}`` for a ViT, ``{"norm": "group"}``)."""
    parse_backbone(name)
    kw = dict(kwargs or {})
    if name == "vq_encoder":
        from .tokenizer import VQEncoder

        return VQEncoder(in_chans=in_chans, **kw)
    if name.startswith("resnet"):
        depth, width = (10, 32) if name == "resnet_tiny" else (int(name[6:]), 64)
        args = {"depth": depth, "width": width, "small_stem": image_size <= 64}
        args.update(kw)
        return ResNet(in_chans=in_chans, **args)
    args = vit_config(name.split("_", 1)[1])
    args["patch_size"] = 4 if image_size <= 64 else 16
    args.update(kw)
    return VisionTransformer(image_size=image_size, in_chans=in_chans, **args)
