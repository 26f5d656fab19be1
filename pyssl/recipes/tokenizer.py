"""The discrete image tokenizer BEiT predicts: a VQ-VAE trained here, offline.

Paper: van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS
2017 (VQ-VAE; BEiT used DALL-E's dVAE, Ramesh et al. 2021, in its place). As in VQ-VAE: a
convolutional encoder, nearest-neighbour quantisation against a codebook with straight-through
gradients, a convolutional decoder, the loss = reconstruction MSE + ``commitment`` x
``||z - sg(e)||^2``, and the codebook updated by exponential moving averages (the paper's
appendix). See :mod:`pyssl.models.tokenizer` for the quantiser (cosine codes, data
initialisation and dead-code restarts keep the codebook in use).

Codebook-usage monitoring: every step logs the share of codes used in the batch
(``codes_used``), the perplexity of the batch's code histogram and the number of codes
restarted; every epoch appends the epoch's usage over all its images to ``codebook.jsonl``
and writes ``figures/codebook.png`` (code frequencies by rank) and
``figures/tokenizer_reconstruction.png`` (images decoded from their codes vs originals).

Small-scale differences: 512 codes of 32-d (BEiT's dVAE: 8192), one code per 4x4 patch at
28 px (a 7x7 grid, matching a ViT with 4 px patches), a two-stride encoder of width 64, a few
epochs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.multicrop import TensorAugment
from ..data.transforms import match_channels
from ..engine.config import ConfigError
from ..models.tokenizer import VQTokenizer, codebook_stats
from .common import normalize_pixels
from .modern import ModernConfig, ModernRecipe, check_range

__all__ = ["VQTokenizerConfig", "VQTokenizerRecipe"]


@dataclass
class VQTokenizerConfig(ModernConfig):
    backbone: str = "vq_encoder"
    num_codes: int = 512
    code_dim: int = 32
    width: int = 64
    downsample: int = 4              # = the patch size of the ViT that predicts the codes
    cosine: bool = True
    decay: float = 0.99
    dead_threshold: float = 0.5      # EMA of per-step assignments below this -> restart
    commitment: float = 0.25
    crop_scale_min: float = 0.5
    knn_every: int = 0

    def backbone_kwargs(self) -> dict:
        return {"width": self.width, "code_dim": self.code_dim, "downsample": self.downsample}


class VQTokenizerRecipe(ModernRecipe):
    name = "vq_tokenizer"
    description = ("VQ-VAE image tokenizer for BEiT (EMA codebook, dead-code restarts, "
                   "codebook-usage monitoring)")
    paper = ("van den Oord et al., Neural Discrete Representation Learning, NeurIPS 2017 "
             "(stands in for BEiT's DALL-E dVAE)")
    small_scale = ("512 codes x 32-d (dVAE: 8192), 7x7 codes at 28 px (4 px per code), encoder "
                   "width 64, a few epochs")
    Config = VQTokenizerConfig
    train_defaults = {"lr": 2e-3, "weight_decay": 0.0, "batch_size": 128, "epochs": 5,
                      "warmup_epochs": 0.5}
    find_unused_parameters = False

    def __init__(self, cfg: VQTokenizerConfig, channels: int):
        super().__init__(cfg, channels)
        self.check_config()
        check_range(cfg, "num_codes", 2)
        check_range(cfg, "code_dim", 1)
        check_range(cfg, "width", 1)
        check_range(cfg, "decay", 0, 1, lo_open=True, hi_open=True)
        check_range(cfg, "commitment", 0)
        check_range(cfg, "dead_threshold", 0)
        check_range(cfg, "crop_scale_min", 0, 1, lo_open=True)
        if cfg.backbone != "vq_encoder":
            raise ConfigError(f"vq_tokenizer trains its own encoder (backbone=vq_encoder), got "
                              f"backbone={cfg.backbone!r}")
        d = cfg.downsample
        if d < 2 or d & (d - 1):
            raise ConfigError(f"downsample={d}: must be a power of two >= 2")
        if cfg.image_size % cfg.downsample:
            raise ConfigError(f"image_size={cfg.image_size} must be a multiple of "
                              f"downsample={cfg.downsample}")
        try:
            self.tokenizer = VQTokenizer(channels, cfg.num_codes, cfg.code_dim, cfg.width,
                                         cfg.downsample, cfg.cosine, cfg.decay,
                                         cfg.dead_threshold)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.tokenizer.encoder = self.build_encoder()
        self.aug = TensorAugment(cfg.image_size, channels, (cfg.crop_scale_min, 1.0),
                                 jitter=0.0, gray_p=0.0)
        # Per-rank code counts of the epoch: a plain attribute, not a buffer, which DDP would
        # overwrite with rank 0's copy at every forward (broadcast_buffers).
        self.epoch_counts: torch.Tensor | None = None

    @property
    def encoder(self):
        return self.tokenizer.encoder

    def views(self, image, label):
        return normalize_pixels(self.aug(match_channels(image, self.channels)))

    def training_step(self, batch, ctx):
        x = batch
        recon, codes, commit, stats = self.tokenizer(x)
        rec = F.mse_loss(recon.float(), x.float())
        with torch.no_grad():
            counts = torch.bincount(codes.reshape(-1), minlength=self.cfg.num_codes).float()
            self.epoch_counts = counts if self.epoch_counts is None else self.epoch_counts + counts
        return {"loss": rec + self.cfg.commitment * commit, "rec_loss": rec.detach(),
                "commitment": commit.detach(), "codes_used": stats["usage"],
                "perplexity": stats["perplexity"], "restarted": stats["restarted"]}

    def on_epoch_start(self, ctx):
        self.epoch_counts = None

    def on_epoch_end(self, ctx):
        counts = (self.epoch_counts.clone() if self.epoch_counts is not None else
                  torch.zeros(self.cfg.num_codes, device=ctx.device))
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(counts)
        trainer = getattr(ctx, "trainer", None)
        if ctx.rank == 0 and trainer is not None:
            c = counts.long()
            usage = {"epoch": ctx.epoch + 1, "codes": self.cfg.num_codes,
                     "images": int(c.sum()) // max(1, self._grid() ** 2),
                     **codebook_stats(torch.repeat_interleave(torch.arange(len(c)), c),
                                      self.cfg.num_codes)}
            path = trainer.out / "codebook.jsonl"
            with open(path, "a") as f:
                f.write(json.dumps(usage) + "\n")
            if self.cfg.figures:
                from ..eval.figures import codebook_figure

                codebook_figure(counts, trainer.out / "figures" / "codebook.png",
                                title=f"vq_tokenizer epoch {ctx.epoch + 1}: "
                                      f"{100 * usage['usage']:.0f}% of {self.cfg.num_codes} "
                                      f"codes used, perplexity {usage['perplexity']:.0f}")
        super().on_epoch_end(ctx)

    def _grid(self) -> int:
        return self.cfg.image_size // self.cfg.downsample

    @torch.no_grad()
    def write_figures(self, ctx, epoch):
        from ..data.transforms import preprocess
        from ..eval.figures import image_grid_figure

        base = ctx.dataset.base if hasattr(ctx.dataset, "base") else ctx.dataset
        n = min(8, len(base))
        x = torch.stack([preprocess(base[i][0], self.input_spec()) for i in range(n)])
        was = self.training
        self.eval()
        try:
            dev = next(self.parameters()).device
            codes = self.tokenizer.tokenize(x.to(dev))
            rec = self.tokenizer.decode_codes(codes).cpu()
        finally:
            self.train(was)
        rows = [[x[i] * 0.5 + 0.5, rec[i] * 0.5 + 0.5] for i in range(n)]
        g = codes.shape[-1]
        image_grid_figure(rows, ["original", f"from {g}x{g} codes"],
                          ctx.trainer.out / "figures" / "tokenizer_reconstruction.png",
                          title=f"vq_tokenizer, epoch {epoch}")
