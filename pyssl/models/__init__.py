"""Backbones (ResNet, ViT) with pooled and per-patch features, and the backbone registry that
checkpoints and evaluation use to rebuild an encoder from its spec; heads (DINO, projection
MLP), MAE's decoder and the VQ tokenizer."""

from .backbones import BACKBONES, build_backbone, parse_backbone
from .heads import DINOHead, WeightNormLinear, projection_mlp
from .mae import MAEDecoder
from .resnet import ResNet
from .tokenizer import VQTokenizer
from .vit import VisionTransformer

__all__ = ["BACKBONES", "DINOHead", "MAEDecoder", "ResNet", "VQTokenizer", "VisionTransformer",
           "WeightNormLinear", "build_backbone", "parse_backbone", "projection_mlp"]
