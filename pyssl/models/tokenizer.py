"""A discrete image tokenizer for BEiT: a small VQ-VAE (van den Oord et al., "Neural Discrete
Representation Learning", NeurIPS 2017) that maps an image to a grid of codebook indices, one
per ViT patch.

* :class:`VQEncoder`: ``log2(downsample)`` stride-2 convolutions, two residual blocks and a 1x1
  projection to ``code_dim`` (a registered backbone, ``vq_encoder``, so its continuous features
  can be evaluated like any encoder).
* :class:`VectorQuantizer`: nearest code (cosine distance on L2-normalised vectors by default,
  which keeps the codebook well used), straight-through gradients, commitment loss; the
  codebook is updated by exponential moving averages of the assigned vectors (VQ-VAE's appendix,
  as in VQ-VAE-2), initialised from encoder outputs of the first batch, and codes left unused
  (EMA of the per-step assignment count below ``dead_threshold``) are restarted at random
  encoder outputs of the current batch. Statistics are all-reduced across ranks and restarts
  are broadcast from rank 0, so every process keeps the same codebook.
* :class:`VQTokenizer`: encoder + quantizer + a mirrored decoder. ``tokenize(x)`` returns the
  ``[B, h, w]`` int64 codes BEiT predicts; ``vocab_size`` is the codebook size.

Any other tokenizer can stand in for it in BEiT (see :func:`pyssl.recipes.beit.load_tokenizer`):
a module with ``tokenize(x) -> [B, h, w]`` (or ``[B, h*w]``) indices and ``vocab_size``, or one
whose forward returns logits ``[B, V, h, w]`` (e.g. DALL-E's dVAE encoder).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["VQEncoder", "VQTokenizer", "VectorQuantizer", "codebook_stats"]


class _ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(),
                                 nn.Conv2d(c, c, 1))

    def forward(self, x):
        return x + self.net(x)


def _num_down(downsample: int) -> int:
    n = int(round(math.log2(downsample))) if downsample > 0 else -1
    if n < 1 or 2 ** n != downsample:
        raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
    return n


class VQEncoder(nn.Module):
    """Convolutional encoder ``[B, C, H, W] -> [B, code_dim, H/downsample, W/downsample]``.
    ``forward_features`` returns the backbone dict (``pooled``, ``patch``, ``map``)."""

    def __init__(self, in_chans: int = 3, width: int = 64, code_dim: int = 32,
                 downsample: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, n = in_chans, _num_down(downsample)
        for i in range(n):
            c = width if i == n - 1 else max(16, width // 2)
            layers += [nn.Conv2d(c_in, c, 4, 2, 1), nn.ReLU()]
            c_in = c
        layers += [nn.Conv2d(c_in, width, 3, 1, 1), _ResBlock(width), _ResBlock(width),
                   nn.ReLU(), nn.Conv2d(width, code_dim, 1)]
        self.net = nn.Sequential(*layers)
        self.downsample, self.code_dim = downsample, code_dim
        self.num_features = code_dim

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.net(x)
        return {"pooled": m.mean((2, 3)), "patch": m.flatten(2).transpose(1, 2), "map": m}

    def forward(self, x):
        return self.forward_features(x)["pooled"]


class VQDecoder(nn.Module):
    def __init__(self, out_chans: int = 3, width: int = 64, code_dim: int = 32,
                 downsample: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(code_dim, width, 3, 1, 1), _ResBlock(width),
                                   _ResBlock(width), nn.ReLU()]
        c_in = width
        n = _num_down(downsample)
        for i in range(n):
            c = out_chans if i == n - 1 else max(16, width // 2)
            layers.append(nn.ConvTranspose2d(c_in, c, 4, 2, 1))
            if i < n - 1:
                layers.append(nn.ReLU())
            c_in = c
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _broadcast_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, 0)
    return t


def codebook_stats(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Usage of a codebook by a set of codes: fraction of codes used at least once and the
    perplexity ``exp(entropy)`` of the code histogram (``vocab_size`` when uniform)."""
    counts = torch.bincount(codes.reshape(-1), minlength=vocab_size).double()
    p = counts / counts.sum().clamp_min(1)
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(ent.exp())}


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with an EMA-updated codebook (see the module docstring).

    ``forward(z [B, D, h, w])`` returns ``(quantized [B, D, h, w]`` with straight-through
    gradients, ``codes [B, h, w]`` int64, ``commitment loss`` ``||z - sg(e)||^2``, ``stats``
    dict of floats)``. Call :meth:`lookup` to turn codes back into vectors."""

    def __init__(self, num_codes: int = 512, dim: int = 32, decay: float = 0.99,
                 cosine: bool = True, dead_threshold: float = 0.5, eps: float = 1e-5):
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {num_codes}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.num_codes, self.dim, self.decay, self.cosine = num_codes, dim, decay, cosine
        self.dead_threshold, self.eps = dead_threshold, eps
        emb = torch.randn(num_codes, dim)
        self.register_buffer("embedding", F.normalize(emb, dim=1) if cosine else emb)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def _prep(self, flat: torch.Tensor) -> torch.Tensor:
        return F.normalize(flat, dim=1) if self.cosine else flat

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` ``[M, D]``."""
        e = self.embedding
        if self.cosine:
            return (flat @ e.T).argmax(1)
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, h, w]`` -> vectors ``[B, D, h, w]``."""
        return self.embedding[codes].permute(0, 3, 1, 2)

    @torch.no_grad()
    def _random_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[idx] + (0 if self.cosine else 1e-3 * torch.randn_like(flat[idx]))
        return _broadcast_(self._prep(rows).contiguous())

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> int:
        onehot_counts = torch.bincount(codes, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device, dtype=flat.dtype)
        sums.index_add_(0, codes, flat)
        stats = _all_reduce_(torch.cat([onehot_counts[:, None], sums], 1))
        self.cluster_size.mul_(self.decay).add_(stats[:, 0], alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(stats[:, 1:], alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        emb = self.embed_sum / size[:, None]
        self.embedding.copy_(self._prep(emb))
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            new = self._random_rows(flat, n_dead)
            self.embedding[dead] = new
            self.embed_sum[dead] = new
            self.cluster_size[dead] = 1.0
        return n_dead

    def forward(self, z: torch.Tensor):
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
        flat_n = self._prep(flat)
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.embedding.copy_(self._random_rows(flat_n.detach(), self.num_codes))
                self.embed_sum.copy_(self.embedding)
                self.cluster_size.fill_(1.0)
                self.initialized.fill_(True)
        codes = self.assign(flat_n.detach())
        restarted = 0
        if self.training:
            restarted = self._ema_update(flat_n.detach(), codes)
            codes = self.assign(flat_n.detach()) if restarted else codes
        q = self.embedding[codes]                                        # [M, D]
        commit = F.mse_loss(flat_n, q.detach())
        q_st = flat_n + (q - flat_n).detach()                           # straight-through
        quantized = q_st.reshape(B, h, w, D).permute(0, 3, 1, 2).to(z.dtype)
        codes = codes.reshape(B, h, w)
        stats = codebook_stats(codes, self.num_codes)
        stats["restarted"] = float(restarted)
        return quantized, codes, commit, stats


class VQTokenizer(nn.Module):
    """VQ-VAE image tokenizer: ``tokenize(x) -> codes [B, H/downsample, W/downsample]``;
    ``forward(x) -> (reconstruction, codes, commitment loss, stats)``."""

    def __init__(self, in_chans: int = 3, num_codes: int = 512, code_dim: int = 32,
                 width: int = 64, downsample: int = 4, cosine: bool = True, decay: float = 0.99,
                 dead_threshold: float = 0.5):
        super().__init__()
        self.encoder = VQEncoder(in_chans, width, code_dim, downsample)
        self.quantizer = VectorQuantizer(num_codes, code_dim, decay, cosine, dead_threshold)
        self.decoder = VQDecoder(in_chans, width, code_dim, downsample)
        self.vocab_size, self.downsample = num_codes, downsample

    def forward(self, x: torch.Tensor):
        z = self.encoder.forward_map(x)
        q, codes, commit, stats = self.quantizer(z)
        return self.decoder(q), codes, commit, stats

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder.forward_map(x)
        B, D, h, w = z.shape
        flat = self.quantizer._prep(z.permute(0, 2, 3, 1).reshape(-1, D).float())
        return self.quantizer.assign(flat).reshape(B, h, w)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.lookup(codes))
