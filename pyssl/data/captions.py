"""Text for image-text (CLIP-style) training: prompt templates that turn class names into
captions, and a dataset of images with their own captions.

* :data:`TEMPLATES`: prompt templates (``"a photo of a {}."`` ...), used both to caption labelled
  images during training and, averaged, as zero-shot classifiers (CLIP's prompt ensembling).
* :func:`class_phrase`: a readable phrase for a class name (``"T-shirt/top"`` ->
  ``"t-shirt or top"``, ``"7"`` -> ``"the digit seven"``).
* :class:`ImageTextDataset`: a captions file (JSON lines ``{"image": path, "caption": text or
  [texts]}``, or CSV/TSV with ``image`` and ``caption`` columns; paths relative to the file) ->
  ``(uint8 [C, H, W], caption)``; ``--data captions.jsonl`` resolves to it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch

from .datasets import DataError, ImageDataset

__all__ = ["CAPTION_SUFFIXES", "TEMPLATES", "ImageTextDataset", "class_captions", "class_phrase"]

TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a small picture of the {}.",
    "a product photo of a {}.",
    "a grayscale image of a {}.",
    "a cropped photo of the {}.",
    "a blurry photo of a {}.",
)

CAPTION_SUFFIXES = (".jsonl", ".csv", ".tsv")

_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def class_phrase(name: str) -> str:
    """A readable noun phrase for a class name."""
    n = str(name).strip()
    if n.isdigit() and len(n) == 1:
        return f"the digit {_DIGITS[int(n)]}"
    return n.replace("_", " ").replace("/", " or ").lower()


def class_captions(class_names, templates=TEMPLATES) -> list[list[str]]:
    """``captions[c][t] = templates[t].format(class_phrase(class_names[c]))``."""
    if not templates:
        raise ValueError("need at least one prompt template")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' for the class name")
    return [[t.format(class_phrase(c)) for t in templates] for c in class_names]


class ImageTextDataset(ImageDataset):
    """Images with captions from a captions file (see the module docstring). ``__getitem__``
    returns ``(uint8 [C, H, W], caption)`` where caption is a string or a list of strings (the
    recipe picks one per view). Unreadable images are skipped like
    :class:`pyssl.data.datasets.ImageFolder` does."""

    def __init__(self, path: str | os.PathLike, channels: int = 3):
        from .datasets import ImageFolder

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"captions file {self.path} does not exist")
        suffix = self.path.suffix.lower()
        if suffix not in CAPTION_SUFFIXES:
            raise DataError(f"captions file must end in {', '.join(CAPTION_SUFFIXES)}, got "
                            f"{self.path.name}")
        rows = self._read(suffix)
        if not rows:
            raise DataError(f"{self.path} holds no (image, caption) rows")
        base = self.path.parent
        self.samples = [(str(base / r[0]) if not os.path.isabs(r[0]) else r[0], r[1])
                        for r in rows]
        self.channels, self.classes, self.name = channels, [], self.path.stem
        self._loader = ImageFolder.__new__(ImageFolder)     # reuse its PIL loading + skipping
        self._loader.channels, self._loader.skipped = channels, set()
        self.skipped = self._loader.skipped

    def _read(self, suffix: str) -> list[tuple[str, object]]:
        rows: list[tuple[str, object]] = []
        if suffix == ".jsonl":
            for i, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    rows.append((str(rec["image"]), rec["caption"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{self.path}:{i}: expected a JSON object with 'image' and "
                                    f"'caption' ({type(e).__name__}: {e})") from None
        else:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                    raise DataError(f"{self.path}: needs a header with 'image' and 'caption' "
                                    f"columns, got {reader.fieldnames}")
                rows = [(r["image"], r["caption"]) for r in reader]
        for img, cap in rows:
            ok = isinstance(cap, str) or (isinstance(cap, list) and cap and
                                          all(isinstance(c, str) for c in cap))
            if not ok:
                raise DataError(f"{self.path}: the caption of {img} must be a string or a list "
                                f"of strings, got {cap!r}")
        return rows

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        n = len(self.samples)
        for k in range(n):
            path, caption = self.samples[(i + k) % n]
            img = self._loader._load(path)
            if img is not None:
                return img, caption
        raise DataError(f"no readable image in {self.path}")

    def labels(self) -> list[int]:
        return [-1] * len(self)


def write_captions_file(path: str | os.PathLike, images: list, captions: list,
                        folder: str = "images") -> Path:
    """Write ``images`` (uint8 ``[C, H, W]`` tensors or arrays) as PNGs under ``folder`` next to
    ``path`` and a JSON-lines captions file at ``path`` (used by tests and examples)."""
    from PIL import Image

    path = Path(path)
    (path.parent / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, cap) in enumerate(zip(images, captions)):
        a = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
        rel = f"{folder}/{i:05d}.png"
        Image.fromarray(a.astype(np.uint8)).save(path.parent / rel)
        lines.append(json.dumps({"image": rel, "caption": cap}))
    path.write_text("\n".join(lines) + "\n")
    return path
