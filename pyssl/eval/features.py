"""Frozen encoders from checkpoints, and feature extraction.

Evaluation reads only the checkpoint's ``encoder`` entry (``spec`` + ``state_dict``; see
:mod:`pyssl.engine.checkpoint`), never recipe code: ``spec["backbone"]`` rebuilds the network
with :func:`pyssl.models.build_backbone`, ``spec["input"]`` says how to preprocess images
(:func:`pyssl.data.transforms.preprocess`), ``spec["feature"]`` which output to read. With a
patch grid in the input spec (patch-based recipes) an image's feature is the mean of its
patches' features (:func:`encode`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.transforms import preprocess
from ..engine.checkpoint import load_checkpoint
from ..models import build_backbone

__all__ = ["encode", "extract_features", "image_view", "load_encoder"]


def encode(encoder: nn.Module, x: torch.Tensor, key: str = "pooled") -> torch.Tensor:
    """Features ``[B, D]`` of a batch of preprocessed inputs: ``x`` ``[B, C, H, W]`` (images),
    or ``[B, P, C, h, w]`` (a grid of P patches per image, features averaged over the patches,
    as in Kolesnikov et al. 2019). Non-vector outputs (maps, patch tokens) are flattened."""
    five = x.dim() == 5
    out = encoder.forward_features(x.flatten(0, 1) if five else x)
    if key not in out:
        raise ValueError(f"feature {key!r} not produced by the encoder; available: "
                         f"{', '.join(out)}")
    f = out[key]
    f = f.flatten(1) if f.dim() > 2 else f
    return f.view(x.shape[0], x.shape[1], -1).mean(1) if five else f


def image_view(spec: dict) -> dict:
    """The spec with whole-image evaluation (its patch grid, if any, dropped)."""
    inp = {k: v for k, v in spec.get("input", spec).items() if k != "patches"}
    return {**spec, "input": inp} if "input" in spec else inp


def load_encoder(checkpoint, random_init: bool = False, seed: int = 0
                 ) -> tuple[nn.Module, dict, dict]:
    """(encoder in eval mode, spec, checkpoint metadata). ``checkpoint`` is a path, a run folder
    or an already-loaded dict. ``random_init=True`` builds the same architecture with fresh
    (seeded) weights: the random-init baseline of every protocol."""
    ck = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    enc = ck.get("encoder")
    if not enc or "spec" not in enc:
        raise ValueError(f"checkpoint {ck.get('path', '')} has no encoder entry")
    spec = enc["spec"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(**spec["backbone"])
    if not random_init:
        missing, unexpected = model.load_state_dict(enc["state_dict"], strict=True), None
        del missing, unexpected
    meta = {k: ck.get(k) for k in ("recipe", "config", "step", "epoch", "path")}
    return model.eval(), spec, meta


class _Preprocessed(Dataset):
    def __init__(self, base, spec):
        self.base, self.spec = base, spec.get("input", spec)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return preprocess(img, self.spec), label


@torch.no_grad()
def extract_features(encoder: nn.Module, spec: dict, dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu", feature: str | None = None,
                     num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, on CPU) and labels ``[N]`` of a dataset, in order.
    ``spec`` is the checkpoint's encoder spec (or just its ``input`` part)."""
    key = feature or spec.get("feature", "pooled")
    encoder = encoder.to(device).eval()
    loader = DataLoader(_Preprocessed(dataset, spec), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    feats, labels = [], []
    for x, y in loader:
        feats.append(encode(encoder, x.to(device), key).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()
