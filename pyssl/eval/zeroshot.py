"""Zero-shot classification by text prompts (CLIP's evaluation): each class name is written into
prompt templates, the text tower embeds them, the normalised embeddings averaged over the
templates form a linear classifier, and a test image is assigned the class of highest cosine
similarity with its image embedding. No labelled training data is used.

A zero-shot checkpoint comes from an image-text recipe (``clip``): unlike the other protocols,
which read only the checkpoint's ``encoder`` entry, this one rebuilds the recipe from the
checkpoint (its config and weights) to get both towers and their projections. A recipe
supports it by implementing ``encode_image(x) -> [B, E]`` (normalised) and
``zeroshot_classifier(class_names, templates) -> [C, E]``.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..data.transforms import preprocess
from ..engine.checkpoint import load_checkpoint
from ..engine.config import ConfigError, config_from_dict

__all__ = ["load_image_text_model", "zeroshot_accuracy", "zeroshot_eval"]


def zeroshot_accuracy(image_emb: torch.Tensor, classifier: torch.Tensor,
                      labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``argmax_c <image_emb, classifier[c]>``."""
    if image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(f"image embeddings ({image_emb.shape[1]}-d) and class embeddings "
                         f"({classifier.shape[1]}-d) differ in size")
    pred = (image_emb.float() @ classifier.float().T).argmax(1)
    return float((pred == labels).float().mean())


def load_image_text_model(checkpoint, random_init: bool = False, text_encoder=None, seed: int = 0):
    """Rebuild an image-text recipe (e.g. ``clip``) from a checkpoint, in eval mode.
    ``random_init=True``: the same architecture with fresh weights (the baseline)."""
    from ..recipes import get_recipe

    ck = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    cls = get_recipe(ck.get("recipe") or "")
    if not hasattr(cls, "zeroshot_classifier"):
        raise ConfigError(f"zero-shot evaluation needs an image-text checkpoint (clip); "
                          f"{ck.get('path', 'this checkpoint')} is a {ck.get('recipe')!r} run")
    conf = ck["config"]
    cfg = config_from_dict(cls.Config, conf["recipe_config"])
    channels = ck["encoder"]["spec"]["backbone"]["in_chans"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kw = {"text_encoder": text_encoder} if text_encoder is not None else {}
        model = cls(cfg, channels, **kw)
    if not random_init:
        model.load_state_dict(ck["model"])
    return model.eval(), ck


@torch.no_grad()
def zeroshot_eval(checkpoint, data: str = "fashion-mnist", *, test_subset: int = 0,
                  templates=None, random_init: bool = False, batch_size: int = 256,
                  seed: int = 0, text_encoder=None, class_names=None) -> dict:
    """Zero-shot top-1 accuracy on the test split of ``data`` (a ``--data`` name or path, or a
    labelled dataset object used as it is) with prompt ensembling over
    ``templates`` (default: the recipe's) and with the first template alone.
    Returns ``{"accuracy", "single_prompt_accuracy", "templates", "classes", "test_size"}``."""
    from ..data.datasets import DataError, resolve_data

    model, ck = load_image_text_model(checkpoint, random_init, text_encoder, seed)
    test = resolve_data(data, "test", subset=test_subset, seed=seed + 1) \
        if isinstance(data, str) else data
    names = list(class_names or test.classes)
    if not names:
        raise DataError(f"--data {data!r} has no class names: zero-shot needs them")
    spec = ck["encoder"]["spec"]["input"]
    templates = tuple(templates or model.templates)
    classifier = model.zeroshot_classifier(names, templates)
    single = model.zeroshot_classifier(names, templates[:1])
    embs, labels = [], []
    loader = DataLoader(test, batch_size=batch_size, shuffle=False)
    for img, y in loader:
        x = torch.stack([preprocess(i, spec) for i in img])
        embs.append(model.encode_image(x))
        labels.append(torch.as_tensor(y))
    e, y = torch.cat(embs), torch.cat(labels)
    return {"accuracy": zeroshot_accuracy(e, classifier, y),
            "single_prompt_accuracy": zeroshot_accuracy(e, single, y),
            "templates": list(templates), "classes": names, "test_size": len(test),
            "data": data if isinstance(data, str) else getattr(data, "name", "dataset"),
            "encoder": "random-init" if random_init else "pretrained"}
