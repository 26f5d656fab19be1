"""Patch masking for masked image modelling: MAE random masking, MAE's decoder restore
(token unshuffle) and BEiT block masking.

Each public function documents its contract; ``pyssl.ops.reference`` holds a plain-PyTorch
implementation of the same contract (the test oracle, and the fallback on devices without a
compiled kernel). Masks use ``True`` = masked (hidden from the encoder).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import reference
from ._dispatch import (check_generator, check_int, check_real, check_tensor, fake_check, has_kernel,
                        same_device_fake)

__all__ = ["MaskingResult", "block_masking", "random_masking", "unshuffle_tokens"]

_ops = torch.ops.pyssl


class MaskingResult(NamedTuple):
    """Output of :func:`random_masking`."""

    visible: torch.Tensor  # [N, K, D] kept tokens, in ascending noise order
    mask: torch.Tensor  # [N, L] bool, True = removed, in the original token order
    ids_keep: torch.Tensor  # [N, K] int64, indices (into L) of the kept tokens
    ids_restore: torch.Tensor  # [N, L] int64, inverse of the shuffle (for unshuffle_tokens)


# --------------------------------------------------------------------------------------------
# random_masking
# --------------------------------------------------------------------------------------------


def random_masking(x: torch.Tensor, mask_ratio: float, *, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> MaskingResult:
    """MAE's per-sample random masking (He et al., "Masked Autoencoders Are Scalable Vision
    Learners", 2022), fused into one kernel.

    Args:
        x: tokens ``[N, L, D]`` (fp32, fp16, bf16 or fp64; any layout).
        mask_ratio: fraction of tokens removed, in ``[0, 1)``. ``K = int(L * (1 - mask_ratio))``
            tokens are kept (MAE's formula).
        noise: optional ``[N, L]`` floating tensor on ``x``'s device. The result then equals
            MAE's algorithm exactly: ``ids_shuffle = argsort(noise, dim=1, stable=True)``
            (ascending, ties by index, NaN last, -0.0 == +0.0), keep ``ids_shuffle[:, :K]``,
            ``ids_restore = argsort(ids_shuffle)``, ``mask`` = True at removed tokens in the
            original order.
        generator: without ``noise``, noise is drawn by ``torch.rand`` from this generator
            (default: the device's default generator); the same generator state gives the
            same result whatever the number of threads.

    Returns:
        :class:`MaskingResult` ``(visible [N, K, D], mask bool [N, L], ids_keep int64 [N, K],
        ids_restore int64 [N, L])``.

    Gradient: to ``x`` only: ``grad_visible`` scattered back to the kept positions (zeros at
    removed tokens), computed as a gather through ``ids_restore`` without atomics. Only
    ``ids_restore`` is saved for backward (``N * L`` int64), not the ``[N, K, D]`` index that
    ``torch.gather`` saves.
    """
    check_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor [N, L, D], got shape {tuple(x.shape)}")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    N, L, _ = x.shape
    len_keep = int(L * (1 - float(mask_ratio)))
    check_generator(generator)
    if noise is None:
        gen_device = generator.device if generator is not None else x.device
        noise = torch.rand(N, L, generator=generator, device=gen_device).to(x.device)
    else:
        check_tensor(noise, "noise")
        if tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must have shape [N, L] = [{N}, {L}], got {tuple(noise.shape)}")
        if noise.device != x.device:
            raise RuntimeError(f"noise is on {noise.device} but x is on {x.device}")
    if has_kernel(x.device):
        return MaskingResult(*_ops.random_masking(x, noise, len_keep))
    return MaskingResult(*reference.random_masking(x, mask_ratio, noise))


@torch.library.register_fake("pyssl::random_masking")
@same_device_fake
def _random_masking_fake(x, noise, len_keep):
    fake_check(x.dim() == 3, lambda: f"x must be [N, L, D], got shape {tuple(x.shape)}")
    N, L, D = x.shape
    fake_check(noise.dim() == 2, lambda: f"noise must be [N, L], got shape {tuple(noise.shape)}")
    fake_check(noise.shape[0] == N, lambda: f"noise must have shape [N, L] = [{N}, {L}], got {tuple(noise.shape)}")
    fake_check(noise.shape[1] == L, lambda: f"noise must have shape [N, L] = [{N}, {L}], got {tuple(noise.shape)}")
    fake_check(0 <= len_keep, lambda: f"len_keep must be in [0, L={L}], got {len_keep}")
    fake_check(len_keep <= L, lambda: f"len_keep must be in [0, L={L}], got {len_keep}")
    return (
        x.new_empty(N, len_keep, D),
        x.new_empty(N, L, dtype=torch.bool),
        x.new_empty(N, len_keep, dtype=torch.long),
        x.new_empty(N, L, dtype=torch.long),
    )


def _random_masking_setup(ctx, inputs, output):
    x, _, len_keep = inputs
    ctx.save_for_backward(output[3])
    ctx.dim = x.shape[2]


def _random_masking_backward(ctx, grad_visible, _grad_mask, _grad_keep, _grad_restore):
    (ids_restore,) = ctx.saved_tensors
    zero = grad_visible.new_zeros(ctx.dim)
    grad_x = _ops.unshuffle_tokens(grad_visible, ids_restore, zero, validate=False)
    return grad_x, None, None


torch.library.register_autograd("pyssl::random_masking", _random_masking_backward,
                                setup_context=_random_masking_setup)


# --------------------------------------------------------------------------------------------
# unshuffle_tokens
# --------------------------------------------------------------------------------------------


def unshuffle_tokens(visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                     *, validate: bool = True) -> torch.Tensor:
    """MAE's decoder restore: put the encoded visible tokens back in their original positions
    and fill the removed ones with a mask token, in one pass.

    Args:
        visible: ``[N, K, D]`` (e.g. decoder-embedded visible tokens).
        ids_restore: ``[N, L]`` int64, each row a permutation of ``0..L-1`` (as returned by
            :func:`random_masking`).
        mask_token: ``[D]``, same dtype and device as ``visible``.
        validate: check that every row of ``ids_restore`` is a permutation (a ValueError
            otherwise). On CUDA this costs one host synchronisation; pass ``False`` in a hot
            loop when ``ids_restore`` comes from :func:`random_masking`.

    Returns:
        ``[N, L, D]``: position ``l`` holds ``visible[ids_restore[l]]`` if
        ``ids_restore[l] < K`` else ``mask_token``; equal to MAE's
        ``gather(cat([visible, mask_tokens]), ids_restore)``.

    Gradients: to ``visible`` (a gather through the inverse permutation, no atomics) and to
    ``mask_token`` (the sum over filled positions, reduced in a fixed order: bitwise
    repeatable).
    """
    check_tensor(visible, "visible")
    check_tensor(ids_restore, "ids_restore")
    check_tensor(mask_token, "mask_token")
    if has_kernel(visible.device):
        return _ops.unshuffle_tokens(visible, ids_restore, mask_token, validate=validate)
    if validate:
        L = ids_restore.shape[-1]
        expected = torch.arange(L, device=ids_restore.device)
        if not torch.equal(ids_restore.sort(dim=-1).values, expected.expand_as(ids_restore)):
            raise ValueError("ids_restore must hold a permutation of 0..L-1 in every row")
    return reference.unshuffle_tokens(visible, ids_restore, mask_token)


@torch.library.register_fake("pyssl::unshuffle_tokens")
@same_device_fake
def _unshuffle_fake(visible, ids_restore, mask_token, validate=True):
    fake_check(visible.dim() == 3, lambda: f"visible must be [N, K, D], got shape {tuple(visible.shape)}")
    fake_check(ids_restore.dim() == 2, lambda: f"ids_restore must be [N, L], got shape {tuple(ids_restore.shape)}")
    fake_check(mask_token.dim() == 1, lambda: f"mask_token must be [D], got shape {tuple(mask_token.shape)}")
    torch._check_type(ids_restore.dtype == torch.long, lambda: f"ids_restore must be int64, got {ids_restore.dtype}")
    N, K, D = visible.shape
    fake_check(ids_restore.shape[0] == N, lambda: f"ids_restore.shape[0] must be the batch N={N} of visible, "
                                                  f"got {ids_restore.shape[0]}")
    fake_check(ids_restore.shape[1] >= K, lambda: f"ids_restore.shape[1] (L={ids_restore.shape[1]}) must be >= "
                                                  f"the number of visible tokens K={K}")
    fake_check(mask_token.shape[0] == D, lambda: f"mask_token.shape[0] must be D={D} of visible, got "
                                                 f"{mask_token.shape[0]}")
    return visible.new_empty(N, ids_restore.shape[1], D)


def _unshuffle_setup(ctx, inputs, output):
    visible, ids_restore, _, _ = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_visible = visible.shape[1]


def _unshuffle_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    grad_visible, grad_token = _ops.unshuffle_tokens_backward(
        grad, ids_restore, ctx.num_visible, ctx.needs_input_grad[2])
    return grad_visible, None, (grad_token if ctx.needs_input_grad[2] else None), None


torch.library.register_autograd("pyssl::unshuffle_tokens", _unshuffle_backward,
                                setup_context=_unshuffle_setup)


@torch.library.register_fake("pyssl::unshuffle_tokens_backward")
@same_device_fake
def _unshuffle_backward_fake(grad_output, ids_restore, num_visible, mask_token_grad):
    N, _, D = grad_output.shape
    return (grad_output.new_empty(N, num_visible, D),
            grad_output.new_empty(D if mask_token_grad else 0))


def _unshuffle_bw_setup(ctx, inputs, output):
    grad_output, ids_restore, _, mask_token_grad = inputs
    ctx.save_for_backward(ids_restore)
    ctx.dim = grad_output.shape[2]
    ctx.mask_token_grad = mask_token_grad


def _unshuffle_bw_backward(ctx, gg_visible, gg_token):
    # The backward is linear in grad_output; its adjoint is the forward op.
    (ids_restore,) = ctx.saved_tensors
    if not ctx.mask_token_grad or gg_token is None or gg_token.numel() == 0:
        gg_token = gg_visible.new_zeros(ctx.dim)
    return _ops.unshuffle_tokens(gg_visible, ids_restore, gg_token, validate=False), None, None, None


torch.library.register_autograd("pyssl::unshuffle_tokens_backward", _unshuffle_bw_backward,
                                setup_context=_unshuffle_bw_setup)


# --------------------------------------------------------------------------------------------
# block_masking
# --------------------------------------------------------------------------------------------


def block_masking(batch_size: int, height: int, width: int, num_masking_patches: int, *,
                  min_num_patches: int = 4, max_num_patches: int | None = None,
                  min_aspect: float = 0.3, max_aspect: float | None = None, exact: bool = True,
                  generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """BEiT's block-wise masking (Bao et al., "BEiT: BERT Pre-Training of Image Transformers",
    2022, Algorithm 1), for a whole batch in one kernel on the output's device.

    Per sample, repeatedly place a random rectangle: target area uniform in
    ``[min_num_patches, budget]``, aspect ratio log-uniform in ``[min_aspect, max_aspect]``,
    ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))`` (accepted only if
    ``h < height`` and ``w < width``), uniform position; it counts only newly masked patches
    and is accepted when those are between 1 and the budget
    (``budget = min(remaining, max_num_patches)``). Each round makes up to 10 attempts; the
    process ends when ``num_masking_patches`` are masked or a round makes no progress. With
    ``exact=True`` the remaining patches are then drawn uniformly among the unmasked ones, so
    every mask has exactly ``num_masking_patches`` True entries and masks batch without
    padding.

    Randomness: one 64-bit seed per sample is drawn from ``generator`` (or the default
    generator of ``generator.device`` / ``device``); each sample's stream (SplitMix64) depends
    on its seed only, so results do not depend on the number of threads, and CPU and CUDA
    kernels run the same streams (``pyssl.ops.reference.block_masking`` reproduces them in
    Python).

    Args:
        batch_size, height, width: output shape ``[batch_size, height, width]`` (patch grid).
        num_masking_patches: patches to mask per sample, ``0 <= n <= height * width``.
        min_num_patches: smallest block area (default 4, as BEiT).
        max_num_patches: largest block area (default ``num_masking_patches``).
        min_aspect, max_aspect: aspect-ratio range (default 0.3 and ``1 / min_aspect``).
        exact: top up to exactly ``num_masking_patches`` (default True).
        generator, device: randomness source and output device.

    Returns:
        bool ``[batch_size, height, width]``, True = masked.
    """
    batch_size = check_int(batch_size, "batch_size", minimum=0)
    height = check_int(height, "height", minimum=0)
    width = check_int(width, "width", minimum=0)
    num_masking_patches = check_int(num_masking_patches, "num_masking_patches", minimum=0)
    if height * width >= 2**31:
        raise ValueError(f"height*width must be < 2**31 patches, got {height}*{width}")
    if num_masking_patches > height * width:
        raise ValueError(f"num_masking_patches ({num_masking_patches}) must be <= height*width "
                         f"({height}*{width} = {height * width})")
    min_num_patches = check_int(min_num_patches, "min_num_patches", minimum=0)
    if max_num_patches is None:  # (a default below min_num_patches only makes blocks rare)
        max_num_patches = max(num_masking_patches, 1)
    else:
        max_num_patches = check_int(max_num_patches, "max_num_patches", minimum=1)
        if max_num_patches < min_num_patches:
            raise ValueError(f"max_num_patches ({max_num_patches}) must be >= min_num_patches "
                             f"({min_num_patches})")
    min_aspect = check_real(min_aspect, "min_aspect")
    if not 0 < min_aspect < math.inf:
        raise ValueError(f"min_aspect must be a positive finite number, got {min_aspect}")
    if max_aspect is None:
        if min_aspect > 1:
            raise ValueError(f"min_aspect ({min_aspect}) > 1 needs an explicit max_aspect >= "
                             f"min_aspect: the default max_aspect = 1/min_aspect is smaller")
        max_aspect = 1.0 / min_aspect
    max_aspect = check_real(max_aspect, "max_aspect")
    if not min_aspect <= max_aspect < math.inf:
        raise ValueError(f"max_aspect must be finite and >= min_aspect ({min_aspect}), "
                         f"got {max_aspect}")
    check_generator(generator)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    seeds = torch.randint(-(2**63), 2**63 - 1, (batch_size,), dtype=torch.int64,
                          generator=generator, device=gen_device).to(device)
    args = (height, width, num_masking_patches, min_num_patches, max_num_patches,
            float(min_aspect), float(max_aspect), bool(exact))
    if has_kernel(device):
        return _ops.block_masking(seeds, *args)
    return reference.block_masking(seeds, *args)


@torch.library.register_fake("pyssl::block_masking")
@same_device_fake
def _block_masking_fake(seeds, height, width, num_masking_patches, min_num_patches,
                        max_num_patches, min_aspect, max_aspect, exact):
    return seeds.new_empty(seeds.shape[0], height, width, dtype=torch.bool)
