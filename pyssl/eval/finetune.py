"""Fine-tuning with a fraction of the labels: the checkpoint's encoder plus a linear head,
trained end to end (light augmentation: random resized crop + flip) on a fixed, class-balanced
``fraction`` of the training labels by the same engine the recipes use, then top-1 accuracy on
the test set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import preprocess
from ..engine.recipe import Recipe, RecipeConfig
from ..models import build_backbone
from ..recipes.common import light_augment, resize
from .features import encode

__all__ = ["SupervisedFinetune", "balanced_fraction"]


def balanced_fraction(labels: list[int], fraction: float, seed: int = 0) -> list[int]:
    """Indices of a fixed ``fraction`` of each class (at least one per class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    y = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        out += idx[:max(1, round(fraction * len(idx)))].tolist()
    return sorted(out)


@dataclass
class _FinetuneConfig(RecipeConfig):
    pass


class SupervisedFinetune(Recipe):
    name = "finetune"
    description = "supervised fine-tuning of a pretrained encoder (evaluation protocol)"

    def __init__(self, spec: dict, state_dict: dict | None, num_classes: int):
        cfg = _FinetuneConfig(image_size=spec["input"]["image_size"])
        super().__init__(cfg, spec["input"]["channels"])
        self.spec = spec
        self.backbone = build_backbone(**spec["backbone"])
        if state_dict is not None:
            self.backbone.load_state_dict(state_dict)
        self._backbone_spec = spec["backbone"]
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.aug = light_augment(cfg.image_size, (0.6, 1.0))

    @property
    def encoder(self):
        return self.backbone

    def encoder_spec(self) -> dict:
        return self.spec

    def views(self, image, label):
        # the augmented image, preprocessed as evaluation does (channels, normalisation, and the
        # patch grid of patch-based encoders)
        img = self.aug(resize(image, self.cfg.image_size))
        return preprocess(img, self.spec["input"]), torch.tensor(label)

    def training_step(self, batch, ctx):
        x, y = batch
        logits = self.head(encode(self.backbone, x))
        loss = F.cross_entropy(logits.float(), y)
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}

    @torch.no_grad()
    def accuracy(self, dataset, batch_size: int = 256) -> float:
        self.eval()
        correct = 0
        for i in range(0, len(dataset), batch_size):
            items = [dataset[j] for j in range(i, min(len(dataset), i + batch_size))]
            x = torch.stack([preprocess(im, self.spec["input"]) for im, _ in items])
            y = torch.tensor([lab for _, lab in items])
            correct += int((self.head(encode(self.backbone, x)).argmax(1) == y).sum())
        return correct / len(dataset)


