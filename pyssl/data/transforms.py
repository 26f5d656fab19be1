"""Augmentations (torchvision.transforms.v2 on ``uint8 [C, H, W]`` tensors), the multi-crop
transform shared by DINO-style recipes, and the evaluation preprocessing that a checkpoint's
input spec describes.

Input spec (stored in every checkpoint next to the encoder)::

    {"image_size": 32, "channels": 1, "mode": "normalize", "mean": [0.5], "std": [0.5]}
    {"image_size": 32, "channels": 1, "mode": "lab_l"}        # L channel of CIE Lab, L/50 - 1

:func:`preprocess` applies it, so evaluation feeds an encoder exactly what it was trained on.
Patch-based recipes (jigsaw, relative patch location) train their encoder on small patches, not
whole images; their spec adds a patch grid, and evaluation then describes an image by its
encoder's features averaged over the grid's patches (the protocol of Kolesnikov, Zhai & Beyer,
"Revisiting Self-Supervised Visual Representation Learning", CVPR 2019: a 3x3 grid of patches
without jitter, combined by average pooling)::

    {..., "patches": {"grid": 3, "cell": 16, "size": 12, "standardize": true}}

The image is resized to ``grid * cell`` pixels, the ``size`` px patch at the centre of each cell
is cut out (row-major), and with ``standardize`` each patch is normalised to mean 0 and std 1 on
its own (as jigsaw's tiles are in training): :func:`preprocess` then returns
``[grid * grid, C, size, size]``.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

__all__ = ["MultiCropTransform", "input_spec", "match_channels", "multicrop_collate",
           "patch_grid", "preprocess", "ssl_augment", "standardize_patches", "to_float"]


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 [C, H, W] (or [B, C, H, W]) -> float32 in [0, 1]."""
    return img.float() / 255.0 if img.dtype == torch.uint8 else img.float()


def match_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert between 1 (luminance, ITU-R 601) and 3 channels along dim -3."""
    c = img.shape[-3]
    if c == channels:
        return img
    if c == 1 and channels == 3:
        return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, 1, 1)
        y = (to_float(img) * w).sum(-3, keepdim=True)
        return (y * 255).round().clamp(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else y
    raise ValueError(f"cannot convert {c} channels to {channels}")


def input_spec(image_size: int, channels: int, mode: str = "normalize",
               mean: float = 0.5, std: float = 0.5, patches: dict | None = None) -> dict:
    if mode not in ("normalize", "lab_l"):
        raise ValueError(f"mode must be 'normalize' or 'lab_l', got {mode!r}")
    spec = {"image_size": int(image_size), "channels": int(channels), "mode": mode}
    if mode == "normalize":
        spec.update(mean=[float(mean)] * channels, std=[float(std)] * channels)
    if patches is not None:
        p = {"grid": int(patches.get("grid", 3)), "cell": int(patches["cell"]),
             "size": int(patches["size"]), "standardize": bool(patches.get("standardize", False))}
        if p["grid"] < 1 or not 1 <= p["size"] <= p["cell"]:
            raise ValueError(f"patches: need grid >= 1 and 1 <= size <= cell, got {p}")
        spec["patches"] = p
    return spec


def patch_grid(x: torch.Tensor, grid: int, cell: int, size: int,
               standardize: bool = False) -> torch.Tensor:
    """``x`` ``[C, grid*cell, grid*cell]`` -> ``[grid*grid, C, size, size]``: the ``size`` px
    patch at the centre of each cell, row-major; with ``standardize`` each patch is shifted and
    scaled to mean 0, std 1 on its own (std floored at 0.01 for flat patches)."""
    if tuple(x.shape[-2:]) != (grid * cell, grid * cell):
        raise ValueError(f"patch_grid: expected a {grid * cell}x{grid * cell} image, got "
                         f"{tuple(x.shape[-2:])}")
    o = (cell - size) // 2
    out = torch.stack([x[..., r * cell + o:r * cell + o + size, c * cell + o:c * cell + o + size]
                       for r in range(grid) for c in range(grid)])
    return standardize_patches(out) if standardize else out


def standardize_patches(patches: torch.Tensor) -> torch.Tensor:
    """``[P, C, h, w]`` -> each patch shifted and scaled to mean 0, std 1 on its own (std floored
    at 0.01 for flat patches): jigsaw's per-tile normalisation, in training and evaluation."""
    mean = patches.mean(dim=(1, 2, 3), keepdim=True)
    std = patches.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-2)
    return (patches - mean) / std


def normalize(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """float [.., C, H, W] in [0, 1] -> the encoder's input (per the spec's mode)."""
    if spec["mode"] == "lab_l":
        from .color import rgb_to_lab

        rgb = x if x.shape[-3] == 3 else x.expand(*x.shape[:-3], 3, *x.shape[-2:])
        return rgb_to_lab(rgb)[..., :1, :, :] / 50.0 - 1.0
    mean = torch.tensor(spec["mean"], dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(spec["std"], dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def preprocess(img: torch.Tensor, spec: dict) -> torch.Tensor:
    """uint8 [C, H, W] -> the encoder's input at evaluation (resize, channels, normalise):
    ``[C, S, S]``, or ``[grid * grid, C, size, size]`` when the spec has a patch grid."""
    p = spec.get("patches")
    s = p["grid"] * p["cell"] if p else spec["image_size"]
    if img.shape[-2:] != (s, s):
        img = TF.resize(img, [s, s], antialias=True)
    if spec["mode"] == "normalize":
        img = match_channels(img, spec["channels"])
    x = normalize(to_float(img), spec)
    return patch_grid(x, p["grid"], p["cell"], p["size"], p["standardize"]) if p else x


def ssl_augment(size: int, channels: int, scale: tuple[float, float] = (0.2, 1.0),
                jitter: float = 0.4, jitter_p: float = 0.8, gray_p: float = 0.2,
                blur_p: float = 0.0, solarize_p: float = 0.0, flip: bool = True) -> T.Compose:
    """SimCLR/BYOL/DINO-style augmentation on uint8 tensors (returns uint8): random resized
    crop, horizontal flip, colour jitter and grayscale (colour images only), Gaussian blur,
    solarisation."""
    ops: list = [T.RandomResizedCrop(size, scale=scale, antialias=True)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    if channels == 3:
        ops += [T.RandomApply([T.ColorJitter(jitter, jitter, jitter / 2, jitter / 4)],
                              p=jitter_p), T.RandomGrayscale(gray_p)]
    else:
        ops.append(T.RandomApply([T.ColorJitter(jitter, jitter)], p=jitter_p))
    if blur_p > 0:
        k = max(3, (size // 10) | 1)
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=solarize_p))
    return T.Compose(ops)


class MultiCropTransform:
    """DINO's multi-crop (Caron et al. 2021): ``n_global`` crops at ``global_size`` from
    ``global_scale`` of the image and ``n_local`` crops at ``local_size`` from ``local_scale``.
    Returns a list of ``n_global + n_local`` float tensors ``[C, h, w]`` normalised by
    ``spec`` (global crops first). DINO's asymmetric blur/solarisation: global crop 1 always
    blurred, global crop 2 blurred with p=0.1 and solarised with p=0.2, local crops blurred with
    p=0.5."""

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 6,
                 channels: int = 3, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
                 n_global: int = 2, spec: dict | None = None):
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        self.n_global, self.n_local = n_global, n_local
        self.spec = spec or input_spec(global_size, channels)
        self.global_aug = [ssl_augment(global_size, channels, global_scale, blur_p=1.0),
                           ssl_augment(global_size, channels, global_scale, blur_p=0.1,
                                       solarize_p=0.2)]
        self.local_aug = ssl_augment(local_size, channels, local_scale, blur_p=0.5)

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        img = match_channels(img, self.spec["channels"])
        crops = [self.global_aug[min(i, 1)](img) for i in range(self.n_global)]
        crops += [self.local_aug(img) for _ in range(self.n_local)]
        return [normalize(to_float(c), self.spec) for c in crops]


def multicrop_collate(batch: list) -> list[torch.Tensor]:
    """Collate a batch of crop lists into one ``[B, C, h, w]`` tensor per crop (crop-major;
    ``torch.cat(result)`` gives rows ``c*B ... c*B+B-1`` for crop ``c``)."""
    crops = [b[0] if isinstance(b, tuple) else b for b in batch]
    return [torch.stack([c[i] for c in crops]) for i in range(len(crops[0]))]
