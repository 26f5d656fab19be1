"""Frozen encoders from checkpoints, and feature extraction.

Evaluation reads only the checkpoint's ``encoder`` entry (``spec`` + ``state_dict``; see
:mod:`pyssl.engine.checkpoint`), never recipe code: ``spec["backbone"]`` rebuilds the network
with :func:`pyssl.models.build_backbone`, ``spec["input"]`` says how to preprocess images
(:func:`pyssl.data.transforms.preprocess`), ``spec["feature"]`` which output to read."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.transforms import preprocess
from ..engine.checkpoint import load_checkpoint
from ..models import build_backbone

__all__ = ["extract_features", "load_encoder"]


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
        out = encoder.forward_features(x.to(device))
        if key not in out:
            raise ValueError(f"feature {key!r} not produced by the encoder; available: "
                             f"{', '.join(out)}")
        f = out[key]
        feats.append((f.flatten(1) if f.dim() > 2 else f).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()
