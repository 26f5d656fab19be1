"""Fast SSL augmentations for small images: the same random resized crop, flip, colour jitter,
grayscale, Gaussian blur and solarisation as the torchvision pipelines in
:mod:`pyssl.data.transforms` (``ssl_augment`` / ``MultiCropTransform``), written as a handful of
plain tensor operations per view.

torchvision.transforms.v2 spends ~1 ms of Python per transform call, which dominates at 28-32 px:
DINO's 2 + 6 crops cost ~28 ms per image there (more than the model on a small CPU), against
~2 ms here. Randomness comes from torch's global RNG, so the engine's per-sample seeding makes
views reproducible.

Semantics (per view): crop box as torchvision's ``RandomResizedCrop`` (area fraction uniform
in ``scale``, log-uniform aspect ratio in ``ratio``, 10 attempts then a centre crop with the
ratio clamped), bilinear resize with antialiasing, horizontal flip (p=0.5); with probability
``jitter_p`` brightness, contrast (and, for colour, saturation and hue) factors in
``[1 - s, 1 + s]`` applied in random order, clamped to [0, 1]; grayscale with ``gray_p`` (colour
only); Gaussian blur with ``blur_p`` (sigma uniform in ``blur_sigma`` pixels, kernel
``2 * ceil(3 sigma) + 1``, reflect padding); solarisation (``x >= 0.5 -> 1 - x``) with
``solarize_p``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .transforms import input_spec, match_channels, normalize, to_float

__all__ = ["FastMultiCrop", "TensorAugment", "random_resized_crop_box"]


class _Uniforms:
    """Uniform [0, 1) numbers drawn from torch's global RNG in one call (one draw per view
    instead of dozens of tiny ``torch.rand`` calls)."""

    def __init__(self, n: int = 48):
        self.vals, self.i = torch.rand(n, dtype=torch.float64).tolist(), 0

    def __call__(self) -> float:
        if self.i == len(self.vals):
            self.vals, self.i = torch.rand(len(self.vals), dtype=torch.float64).tolist(), 0
        self.i += 1
        return self.vals[self.i - 1]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self()

    def integer(self, n: int) -> int:
        """Uniform in ``0 .. n-1``."""
        return min(int(self() * n), n - 1)

    def permutation(self, n: int) -> list[int]:
        keys = [self() for _ in range(n)]
        return sorted(range(n), key=keys.__getitem__)


def random_resized_crop_box(h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            rng: _Uniforms | None = None) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop covering a fraction of the area uniform
    in ``scale`` with a log-uniform aspect ratio in ``ratio`` (torchvision's algorithm)."""
    rng = rng or _Uniforms()
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.integer(h - ch + 1)
            left = rng.integer(w - cw + 1)
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 1:
        return x
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def _blend(a: torch.Tensor, b, f: float) -> torch.Tensor:
    if isinstance(b, float) and b == 0.0:
        return (a * f).clamp_(0, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def _hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of an RGB image by ``shift`` turns (in [-0.5, 0.5]) via HSV."""
    r, g, b = x[0], x[1], x[2]
    maxc, _ = x.max(0)
    minc, _ = x.min(0)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    hh = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hh = torch.where(delta > 0, (hh / 6.0) % 1.0, torch.zeros_like(hh))
    hh = (hh + shift) % 1.0
    i = torch.floor(hh * 6.0)
    f = hh * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    sel = [torch.stack(c) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                    (v, p, q))]
    out = torch.zeros_like(x)
    for k in range(6):
        out = torch.where((i == k)[None], sel[k], out)
    return out


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, (min(x.shape[-2:]) - 1))
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return y[0]


class TensorAugment:
    """One SSL view: ``uint8/float [C, H, W] -> float [C, size, size]`` in [0, 1]
    (see the module docstring for the exact operations)."""

    def __init__(self, size: int, channels: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                 flip: bool = True, jitter: float = 0.4, jitter_p: float = 0.8,
                 gray_p: float = 0.2, blur_p: float = 0.0, blur_sigma=(0.1, 2.0),
                 solarize_p: float = 0.0):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size, self.channels = int(size), int(channels)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
        self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p
        self.blur_p, self.blur_sigma, self.solarize_p = blur_p, tuple(blur_sigma), solarize_p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = to_float(img)
        rng = _Uniforms()
        H, W = x.shape[-2:]
        top, left, ch, cw = random_resized_crop_box(H, W, self.scale, self.ratio, rng)
        x = x[:, top:top + ch, left:left + cw]
        if (ch, cw) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=ch > self.size or cw > self.size
                              )[0].clamp(0, 1)
        if self.flip and rng() < 0.5:
            x = x.flip(-1)
        s = self.jitter
        if s > 0 and rng() < self.jitter_p:
            colour = x.shape[0] == 3
            ops = [0, 1, 2, 3] if colour else [0, 1]
            for k in rng.permutation(len(ops)):
                op = ops[k]
                if op == 0:
                    x = _blend(x, 0.0, rng.uniform(max(0.0, 1 - s), 1 + s))
                elif op == 1:
                    x = _blend(x, _gray(x).mean(), rng.uniform(max(0.0, 1 - s), 1 + s))
                elif op == 2:
                    x = _blend(x, _gray(x), rng.uniform(max(0.0, 1 - s), 1 + s))
                else:
                    x = _hue(x, rng.uniform(-s / 4, s / 4))
        if x.shape[0] == 3 and self.gray_p > 0 and rng() < self.gray_p:
            x = _gray(x).expand(3, -1, -1).contiguous()
        if self.blur_p > 0 and rng() < self.blur_p:
            x = _blur(x, rng.uniform(*self.blur_sigma))
        if self.solarize_p > 0 and rng() < self.solarize_p:
            x = torch.where(x >= 0.5, 1.0 - x, x)
        return x


class FastMultiCrop:
    """DINO's multi-crop with :class:`TensorAugment`: ``n_global`` crops at ``global_size``
    and ``n_local`` at ``local_size``, normalised by ``spec`` (global first). DINO's asymmetric
    blur/solarisation: global crop 1 always blurred, global crop 2 blurred with p=0.1 and
    solarised with p=0.2, local crops blurred with p=0.5. ``blur_sigma`` is in pixels of the
    output crop (DINO: 0.1-2 px at 224 px)."""

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 6,
                 channels: int = 3, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
                 n_global: int = 2, spec: dict | None = None, blur_sigma=(0.1, 2.0),
                 jitter: float = 0.4):
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        self.n_global, self.n_local = n_global, n_local
        self.spec = spec or input_spec(global_size, channels)
        common = dict(channels=channels, jitter=jitter, blur_sigma=blur_sigma)
        self.global_aug = [TensorAugment(global_size, scale=global_scale, blur_p=1.0, **common),
                           TensorAugment(global_size, scale=global_scale, blur_p=0.1,
                                         solarize_p=0.2, **common)]
        self.local_aug = TensorAugment(local_size, scale=local_scale, blur_p=0.5, **common)
        if self.spec["mode"] == "normalize":
            self._mean = torch.tensor(self.spec["mean"]).view(-1, 1, 1)
            self._std = torch.tensor(self.spec["std"]).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        img = match_channels(img, self.spec["channels"])
        crops = [self.global_aug[min(i, 1)](img) for i in range(self.n_global)]
        crops += [self.local_aug(img) for _ in range(self.n_local)]
        if self.spec["mode"] != "normalize":
            return [normalize(c, self.spec) for c in crops]
        return [(c - self._mean) / self._std for c in crops]
