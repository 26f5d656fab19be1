"""Contrastive losses that stay correct under data parallelism: InfoNCE (one direction or
symmetric, CLIP-style) and SimCLR's NT-Xent, with the negatives gathered from every rank and the
gradients flowing back to the rank that produced them.

Why the gather needs gradients. With ``W`` processes each holding ``n`` rows of a global batch
of ``N = W n``, rank ``r`` scores its own queries against all ``N`` keys. A plain
``torch.distributed.all_gather`` returns tensors without a graph, so the other ranks' keys are
constants and rank ``s`` never learns how its keys should move to help rank ``r``'s queries:
the summed gradient is missing every cross-rank term (and, if one then "fixes" it by putting the
local slice back, it is still missing them). :func:`gather_with_grad` is an all-gather whose
backward all-reduces (sums) the gradient of the gathered tensor over the ranks and returns each
rank its own slice. Each rank's loss is the mean over its
own queries; DDP then averages the ranks' gradients, which gives exactly the gradient of the
single-process loss on the global batch (``tests/losses/test_contrastive.py`` checks world size
2 against world size 1 on the same batch).

Rows of a gathered tensor are rank-major: rank ``r`` owns rows ``r*n .. r*n + n - 1``, so local
row ``i`` of rank ``r`` is global row ``r*n + i`` (every rank must hold the same ``n``).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "InfoNCELoss", "NTXentLoss", "gather_with_grad", "info_nce", "nt_xent",
           "rank_and_world"]


def rank_and_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group`` when torch.distributed is initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: the sum over ranks of the gathered tensor's gradient
    (all_reduce), sliced back to this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        rank, world = rank_and_world(group)
        ctx.group, ctx.rows = group, (rank * x.shape[0], (rank + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        a, b = ctx.rows
        return grad[a:b], None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` ``[n, ...]`` from every rank along dim 0 (rank-major; every rank must
    hold the same ``n``), differentiably: the backward pass sends each rank the sum over ranks
    of the gradient of its slice. Identity on a single process."""
    return _gather(x, group, check_rows=True)


def _gather(x: torch.Tensor, group, check_rows: bool) -> torch.Tensor:
    """gather_with_grad; ``check_rows=False`` where an earlier gather of the same call already
    checked that every rank holds the same number of rows (one collective fewer)."""
    _, world = rank_and_world(group)
    if world == 1:
        return x
    if check_rows:
        _check_equal_rows(x, group, world)
    return _GatherWithGrad.apply(x, group)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Compute in float32 at least (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_equal_rows(x: torch.Tensor, group, world: int) -> None:
    """all_gather needs the same number of rows on every rank; with fewer rows on one rank it
    reads garbage or aborts the process. Every rank learns every count (one small collective)
    and all raise the same error together, so none is left waiting."""
    counts = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device),
                    group=group)
    counts = [int(c) for c in counts]
    if len(set(counts)) > 1:
        raise ValueError(f"every rank must hold the same number of rows for the cross-rank "
                         f"gather, got {counts} (use drop_last=True, or equal per-rank batches)")


def _gather_ids(ids: torch.Tensor, group=None) -> torch.Tensor:
    """all_gather of ids with as many rows as a tensor gathered (and checked) before."""
    out = [torch.empty_like(ids) for _ in range(rank_and_world(group)[1])]
    dist.all_gather(out, ids.contiguous(), group=group)
    return torch.cat(out)


def _check_pair(query: torch.Tensor, key: torch.Tensor, qname: str, kname: str) -> None:
    for name, t in ((qname, query), (kname, key)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if query.device != key.device:
        raise ValueError(f"{qname} and {kname} must be on the same device, got {query.device} and "
                         f"{key.device}")
    if query.dim() != 2 or key.dim() != 2:
        raise ValueError(f"{qname} and {kname} must be 2-D [n, D], got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if query.shape != key.shape:
        raise ValueError(f"{qname} and {kname} must have the same shape (row i of one is the "
                         f"positive of row i of the other), got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if query.shape[0] == 0:
        raise ValueError(f"{qname} and {kname} need at least one row, got shape {tuple(query.shape)}")


def _check_temperature(temperature, name: str = "temperature") -> float:
    """A positive finite number (not a bool), as a float."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{name} must be positive and finite, got {temperature}")
    return float(temperature)


def _scale(temperature: float | None, logit_scale: torch.Tensor | None) -> torch.Tensor | float:
    if logit_scale is not None:
        if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
            raise ValueError("logit_scale must be a tensor holding one value, got "
                             + (f"shape {tuple(logit_scale.shape)}" if isinstance(logit_scale, torch.Tensor)
                                else type(logit_scale).__name__))
        return logit_scale.reshape(())
    if temperature is None:
        raise ValueError("temperature must be positive and finite, got None (or pass logit_scale)")
    return 1.0 / _check_temperature(temperature)


def _soft_targets(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Row-normalised equality matrix ``[len(rows), len(cols)]`` (multi-positive targets)."""
    eq = (rows[:, None] == cols[None, :]).float()
    return eq / eq.sum(1, keepdim=True).clamp_min(1)


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float | None = 0.1, *,
             logit_scale: torch.Tensor | None = None, symmetric: bool = False,
             normalize: bool = True, gather: bool = True, group=None,
             positive_ids: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE (van den Oord et al. 2018; CLIP's loss when ``symmetric``).

    ``query`` and ``key`` are ``[n, D]`` on each rank; row ``i`` of ``key`` is the positive of row
    ``i`` of ``query`` and every other key of the global batch (all ranks, when ``gather``) is a
    negative. Logits are ``scale * <q, k>`` with ``scale = 1 / temperature`` or ``logit_scale``
    (a tensor, e.g. CLIP's learnable ``exp(t)``), on L2-normalised rows when ``normalize``.

    * ``symmetric=False``: ``mean_i CE(q_i -> all keys)``.
    * ``symmetric=True``: ``(mean_i CE(q_i -> all keys) + mean_j CE(k_j -> all queries)) / 2``.

    ``positive_ids`` (optional int ``[n]``): rows that share an id are all positives of each other
    (e.g. identical captions); the target of row ``i`` is then uniform over the columns with
    ``i``'s id, instead of one-hot. The result is the loss of this rank's rows (mean over them);
    under DDP the averaged gradients equal those of the single-process loss on the global batch.
    """
    _check_pair(query, key, "query", "key")
    scale = _scale(temperature, logit_scale)
    if normalize:
        query, key = F.normalize(_acc(query), dim=-1), F.normalize(_acc(key), dim=-1)
    rank, world = rank_and_world(group) if gather else (0, 1)
    n = query.shape[0]
    all_k = gather_with_grad(key, group) if world > 1 else key
    if positive_ids is not None:
        if (not isinstance(positive_ids, torch.Tensor) or positive_ids.shape != (n,)
                or positive_ids.is_floating_point() or positive_ids.is_complex()):
            raise ValueError(f"positive_ids must be an integer tensor of shape [n] = [{n}], got "
                             + (f"{positive_ids.dtype} of shape {tuple(positive_ids.shape)}"
                                if isinstance(positive_ids, torch.Tensor) else type(positive_ids).__name__))
        if positive_ids.device != query.device:
            raise ValueError(f"positive_ids must be on query's device {query.device}, got "
                             f"{positive_ids.device}")
        ids = positive_ids.reshape(-1)
        all_ids = _gather_ids(ids, group) if world > 1 else ids
        tgt = _soft_targets(all_ids[rank * n: rank * n + n], all_ids)

        def ce(logits):
            return -(tgt * logits.log_softmax(-1)).sum(-1).mean()
    else:
        labels = torch.arange(rank * n, rank * n + n, device=query.device)

        def ce(logits):
            return F.cross_entropy(logits, labels)
    loss = ce(scale * (query @ all_k.T))                                # [n, N] logits
    if not symmetric:
        return loss
    all_q = _gather(query, group, check_rows=False) if world > 1 else query
    return 0.5 * (loss + ce(scale * (key @ all_q.T)))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *,
            normalize: bool = True, gather: bool = True, group=None) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020): for the ``2N`` views of a global batch of ``N``
    images (``z1[i]`` and ``z2[i]`` are two views of image ``i``), each view's positive is the
    other view of its image and the other ``2N - 2`` views are negatives:
    ``l(a) = -log( exp(s(a, a+)/t) / sum_{b != a} exp(s(a, b)/t) )`` with cosine similarity
    ``s``, averaged over this rank's ``2n`` views (``gather``: negatives from every rank)."""
    _check_pair(z1, z2, "z1", "z2")
    scale = _scale(temperature, None)
    if normalize:
        z1, z2 = F.normalize(_acc(z1), dim=-1), F.normalize(_acc(z2), dim=-1)
    rank, world = rank_and_world(group) if gather else (0, 1)
    n = z1.shape[0]
    g1 = gather_with_grad(z1, group) if world > 1 else z1
    g2 = _gather(z2, group, check_rows=False) if world > 1 else z2
    N = g1.shape[0]
    keys = torch.cat([g1, g2])                                         # [2N, D]
    queries = torch.cat([z1, z2])                                      # [2n, D]
    logits = scale * (queries @ keys.T)                                # [2n, 2N]
    own = torch.arange(rank * n, rank * n + n, device=z1.device)
    self_idx = torch.cat([own, own + N])                               # each query's own column
    pos_idx = torch.cat([own + N, own])                                # the other view
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * n, device=z1.device), self_idx] = True
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), pos_idx)


class InfoNCELoss(nn.Module):
    """:func:`info_nce` as a module with a fixed temperature (``symmetric`` for CLIP-style)."""

    def __init__(self, temperature: float = 0.1, symmetric: bool = False,
                 normalize: bool = True, gather: bool = True, group=None):
        super().__init__()
        self.temperature, self.symmetric = _check_temperature(temperature), bool(symmetric)
        self.normalize, self.gather, self.group = bool(normalize), bool(gather), group

    def forward(self, query, key, positive_ids=None):
        return info_nce(query, key, self.temperature, symmetric=self.symmetric,
                        normalize=self.normalize, gather=self.gather, group=self.group,
                        positive_ids=positive_ids)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}"


class NTXentLoss(nn.Module):
    """:func:`nt_xent` as a module (SimCLR)."""

    def __init__(self, temperature: float = 0.5, normalize: bool = True, gather: bool = True,
                 group=None):
        super().__init__()
        self.temperature, self.normalize, self.gather, self.group = (
            _check_temperature(temperature), bool(normalize), bool(gather), group)

    def forward(self, z1, z2):
        return nt_xent(z1, z2, self.temperature, normalize=self.normalize, gather=self.gather,
                       group=self.group)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE with a learnable temperature (Radford et al. 2021): the
    parameter ``log_scale`` starts at ``log(1 / init_temperature)`` and the logit scale
    ``exp(log_scale)`` is clamped to at most ``max_scale`` (CLIP: 0.07 and 100)."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0,
                 learnable: bool = True, gather: bool = True, group=None):
        super().__init__()
        init_temperature = _check_temperature(init_temperature, "init_temperature")
        if isinstance(max_scale, bool) or not isinstance(max_scale, numbers.Real) or math.isnan(max_scale):
            raise TypeError(f"max_scale must be a number, got {max_scale!r}")
        if not max_scale >= 1 / init_temperature:
            raise ValueError(f"max_scale ({max_scale}) must be >= 1 / init_temperature "
                             f"({1 / init_temperature:.4g})")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)),
                                      requires_grad=learnable)
        self.max_log_scale = math.log(max_scale)
        self.gather, self.group = bool(gather), group

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, image_emb, text_emb, positive_ids=None):
        return info_nce(image_emb, text_emb, None, logit_scale=self.logit_scale(),
                        symmetric=True, gather=self.gather, group=self.group,
                        positive_ids=positive_ids)

    def no_weight_decay(self) -> set[str]:
        return {"log_scale"}
