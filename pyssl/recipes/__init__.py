"""Training recipes, one module per method (its views, model, loss and schedule).

``RECIPES`` maps a recipe name to its class; ``get_recipe(name)`` raises a ValueError listing
the valid names. See :mod:`pyssl.engine.recipe` for the interface a recipe implements."""

from __future__ import annotations

from .beit import BEiT
from .clip import CLIP
from .colorization import Colorization
from .dino import DINO, DINOv2
from .inpainting import Inpainting
from .jigsaw import Jigsaw
from .mae import MAE
from .relative_patch import RelativePatch
from .rotnet import RotNet
from .simclr import SimCLR
from .tokenizer import VQTokenizerRecipe

RECIPES = {cls.name: cls for cls in (RotNet, RelativePatch, Jigsaw, Inpainting, Colorization)}
# modern recipes (issue 7): contrastive, image-text, DINO/DINOv2, MAE, BEiT and its tokenizer
RECIPES.update({cls.name: cls for cls in (SimCLR, CLIP, DINO, DINOv2, MAE, BEiT,
                                          VQTokenizerRecipe)})

__all__ = ["RECIPES", "get_recipe", "register_recipe"]


def get_recipe(name: str):
    key = name.replace("-", "_")
    if key not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[key]


def register_recipe(cls):
    """Add a recipe class (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    RECIPES[cls.name] = cls
    return cls
