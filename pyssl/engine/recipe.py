"""The recipe interface the engine trains.

A recipe is an ``nn.Module`` that owns its model(s) and states its method; the engine owns the
loop. To add a method, subclass :class:`Recipe`, set the class attributes, implement
``views`` and ``training_step``, and register the class in ``pyssl/recipes/__init__.py``::

    @dataclass
    class MyConfig(RecipeConfig):       # recipe keys, overridable as key=value
        temperature: float = 0.1

    class MyRecipe(Recipe):
        name = "mine"; description = "one line"; paper = "Author et al., Title, Venue Year"
        small_scale = "what differs from the paper at CPU scale"
        Config = MyConfig
        train_defaults = {"lr": 1e-3, "epochs": 20}    # TrainConfig defaults for this recipe

        def __init__(self, cfg, channels):               # build backbone(s), heads, loss
        def views(self, image, label):                   # uint8 [C,H,W] -> one sample
        def training_step(self, batch, ctx):             # -> {"loss": tensor, ...scalars}

Optional: ``collate(samples)`` (default: ``torch.utils.data.default_collate``),
``param_groups()`` (default: no weight decay on norms, biases, tokens), ``on_train_start(ctx)``
(e.g. estimate a colour prior from ``ctx.dataset``; set EMA schedule lengths from
``ctx.total_steps``), ``on_epoch_start(ctx)``, ``on_before_optimizer_step(ctx)`` (after backward
and gradient clipping: e.g. drop a frozen last layer's gradients), ``on_after_optimizer_step(ctx)``
(EMA teacher update), ``on_epoch_end(ctx)`` (after a complete epoch, before its checkpoint: e.g.
a k-NN monitor, figures), ``on_train_end(ctx)`` (once, when the loop stops: finished or
interrupted), ``fsdp_modules()`` (modules to shard under FSDP).

The encoder that evaluation reads is ``self.encoder`` (a backbone from
:func:`pyssl.models.build_backbone`); ``encoder_spec()`` records how to rebuild it and how to
preprocess images for it. Randomness in ``views`` must come from torch's global RNG (the data
pipeline seeds it per sample); randomness in ``training_step`` too (the engine seeds it per
step), so a resumed run is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import default_collate

from ..data.transforms import input_spec
from ..models import build_backbone
from .config import ConfigError

__all__ = ["Recipe", "RecipeConfig", "StepContext"]


@dataclass
class RecipeConfig:
    """Keys every recipe has: the backbone and the size images are trained at."""

    backbone: str = "resnet_tiny"
    image_size: int = 32
    backbone_width: int = 0      # >0: override the ResNet width / ViT dim
    backbone_norm: str = "batch"  # ResNet normalisation: batch | group
    feature: str = "pooled"      # which encoder output evaluation reads

    def backbone_kwargs(self) -> dict:
        kw: dict[str, Any] = {}
        if self.backbone.startswith("resnet"):
            kw["norm"] = self.backbone_norm
            if self.backbone_width:
                kw["width"] = self.backbone_width
        elif self.backbone_width:
            kw["embed_dim"] = self.backbone_width
        return kw


class StepContext:
    """What a recipe sees of the loop (read-only by convention)."""

    def __init__(self, **kw):
        self.step = 0                # optimizer steps done before this one
        self.epoch = 0
        self.total_steps = 1
        self.steps_per_epoch = 1
        self.lr = 0.0
        self.weight_decay = 0.0
        self.device = torch.device("cpu")
        self.rank, self.world_size = 0, 1
        self.dataset = None          # the ViewDataset (on_train_start)
        self.train_config = None
        self.__dict__.update(kw)

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


class Recipe(nn.Module):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    small_scale: ClassVar[str] = ""
    Config: ClassVar[type] = RecipeConfig
    train_defaults: ClassVar[dict] = {}
    needs_color: ClassVar[bool] = False
    default_eval_data: ClassVar[str | None] = None  # None: evaluate on the pretraining data
    find_unused_parameters: ClassVar[bool] = True   # DDP: False if every parameter gets a grad

    def __init__(self, cfg: RecipeConfig, channels: int):
        super().__init__()
        self.cfg = cfg
        self.channels = channels

    # --------------------------------------------------------------- helpers for subclasses
    def build_encoder(self, in_chans: int | None = None, image_size: int | None = None
                      ) -> nn.Module:
        """The backbone from the config (``backbone``, ``backbone_width``, ...) and remember its
        spec for checkpoints."""
        spec = {"name": self.cfg.backbone, "in_chans": in_chans or self.channels,
                "image_size": image_size or self.cfg.image_size,
                "kwargs": self.cfg.backbone_kwargs()}
        try:
            enc = build_backbone(**spec)
        except ValueError as e:
            raise ConfigError(f"backbone={self.cfg.backbone!r}: {e}") from None
        self._backbone_spec = spec
        return enc

    # --------------------------------------------------------------- interface
    @property
    def encoder(self) -> nn.Module:
        raise NotImplementedError

    def input_spec(self) -> dict:
        """How evaluation preprocesses images for the encoder (default: the training image
        size, the data's channels, pixels scaled to [-1, 1])."""
        return input_spec(self.cfg.image_size, self.channels)

    def encoder_spec(self) -> dict:
        return {"backbone": dict(self._backbone_spec), "input": self.input_spec(),
                "feature": self.cfg.feature}

    def views(self, image: torch.Tensor, label: int):
        raise NotImplementedError

    def collate(self, samples: list):
        return default_collate(samples)

    def training_step(self, batch, ctx: StepContext) -> dict:
        raise NotImplementedError

    def forward(self, batch, ctx: StepContext) -> dict:
        # DDP/FSDP call the wrapped module; the loop calls recipe(batch, ctx)
        return self.training_step(batch, ctx)

    def param_groups(self) -> list[dict]:
        """Two groups: weights with weight decay; norms, biases and tokens without."""
        skip = set()
        for mname, m in self.named_modules():
            nwd = getattr(m, "no_weight_decay", None)
            if callable(nwd):
                skip |= {f"{mname}.{n}" if mname else n for n in nwd()}
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or n in skip or n.endswith(".bias") else decay).append(p)
        groups = [{"params": decay, "apply_wd": True}]
        if no_decay:
            groups.append({"params": no_decay, "apply_wd": False, "weight_decay": 0.0})
        return groups

    def fsdp_modules(self) -> list[nn.Module]:
        enc = self.encoder
        return list(getattr(enc, "blocks", [])) or [
            getattr(enc, f"layer{i}") for i in range(1, 5) if hasattr(enc, f"layer{i}")]

    def check_data(self, dataset) -> None:
        """Raise ConfigError if the data cannot serve this recipe (called before training)."""
        if self.needs_color and dataset.channels != 3:
            raise ConfigError(f"recipe {self.name!r} needs colour (3-channel) images, but --data "
                              f"{dataset.name!r} has {dataset.channels} channel(s); try "
                              "--data photos")

    def on_train_start(self, ctx: StepContext) -> None:
        pass

    def on_epoch_start(self, ctx: StepContext) -> None:
        pass

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        pass

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        pass

    def on_epoch_end(self, ctx: StepContext) -> None:
        pass

    def on_train_end(self, ctx: StepContext) -> None:
        pass
