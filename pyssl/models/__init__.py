"""Backbones (ResNet, ViT) with pooled and per-patch features, and the backbone registry that
checkpoints and evaluation use to rebuild an encoder from its spec."""

from .backbones import BACKBONES, build_backbone, parse_backbone
from .resnet import ResNet
from .vit import VisionTransformer

__all__ = ["BACKBONES", "ResNet", "VisionTransformer", "build_backbone", "parse_backbone"]
