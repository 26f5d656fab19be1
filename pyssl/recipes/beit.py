"""BEiT: masked image modelling by predicting the discrete visual tokens of masked patches.

Paper: Bao, Dong, Piao, Wei, "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022. As in
the paper: an image tokenizer turns the image into a grid of discrete tokens, one per ViT patch;
BEiT's block-wise masking (:func:`pyssl.ops.block_masking`, ~40% of the patches in blocks of at
least ``min_block`` patches) chooses the patches to corrupt; their patch embeddings are replaced
by a learnable mask token (the ViT's ``mask_token``) before the position embeddings are added;
the ViT encodes the corrupted image, a linear head predicts each masked patch's token, and the
loss is the cross-entropy over the masked patches only. Views: random resized crop + flip.

The tokenizer (``tokenizer=``):

* ``auto`` (default): a :mod:`vq_tokenizer <pyssl.recipes.tokenizer>` VQ-VAE is first trained
  on the same data through the engine, into ``<run>/tokenizer`` (kept and reused when the run
  is resumed), so BEiT runs end to end offline;
* a path: a ``vq_tokenizer`` checkpoint (``.../last.pt``), a TorchScript file or a pickled
  ``nn.Module`` (``torch.save(module)``; loaded with ``weights_only=False``, so only files you
  trust), e.g. DALL-E's dVAE encoder or BEiT v2's VQ-KD tokenizer exported to a file;
* from Python, any module: ``BEiT(cfg, channels, tokenizer=module)``.

A tokenizer module provides ``tokenize(x) -> int [B, h, w]`` (or ``[B, h*w]``) — or its
``forward`` returns logits ``[B, V, h, w]`` — and ``vocab_size`` (or ``num_tokens``/``n_embed``,
or set ``vocab_size=``). Its input is the view in [-1, 1] (``tokenizer_pixels=unit``: [0, 1]),
resized to ``tokenizer_image_size`` when that is set; its grid must equal the ViT's patch grid.
The tokenizer is frozen and not stored in BEiT's checkpoints.

Small-scale differences: a 4-block, 128-d ViT with 4 px patches at 28 px (paper ViT-B/16 at
224 px), a VQ-VAE with 512 codes trained here instead of DALL-E's 8192-token dVAE, 19 of 49
patches masked (paper 75 of 196), no relative position bias or layer scale, a few epochs;
evaluation reads the mean of the patch tokens (as BEiT's linear probe).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.multicrop import TensorAugment
from ..data.transforms import match_channels
from ..engine.config import ConfigError
from ..engine.distributed import barrier
from ..ops import block_masking
from .common import normalize_pixels
from .modern import ModernRecipe, ViTConfig, check_range

__all__ = ["BEiT", "BEiTConfig", "TokenizerAdapter", "load_tokenizer"]


class TokenizerAdapter(nn.Module):
    """Uniform face of any tokenizer: ``forward(x) -> int64 [B, L]`` codes, ``vocab_size``."""

    def __init__(self, module: nn.Module, vocab_size: int = 0, pixels: str = "same",
                 image_size: int = 0):
        super().__init__()
        if pixels not in ("same", "unit"):
            raise ConfigError(f"tokenizer_pixels={pixels!r}: must be 'same' or 'unit'")
        self.module, self.pixels, self.image_size = module, pixels, int(image_size)
        v = vocab_size or next((getattr(module, a) for a in ("vocab_size", "num_tokens",
                                                              "n_embed", "num_codes")
                                if isinstance(getattr(module, a, None), int)), 0)
        if not v:
            raise ConfigError("the tokenizer has no vocab_size (or num_tokens / n_embed) "
                              "attribute: set vocab_size=")
        self.vocab_size = int(v)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.module.eval()            # always frozen, in inference mode
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixels == "unit":
            x = x * 0.5 + 0.5
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        tok = getattr(self.module, "tokenize", None)
        out = tok(x) if callable(tok) else self.module(x)
        if out.is_floating_point():
            if out.dim() != 4:
                raise ValueError(f"a tokenizer's forward must return logits [B, V, h, w], got "
                                 f"shape {tuple(out.shape)}")
            out = out.argmax(1)
        codes = out.reshape(out.shape[0], -1).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"tokenizer codes must lie in [0, {self.vocab_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes


def load_tokenizer(path: str | Path) -> nn.Module:
    """A tokenizer module from a file: a ``vq_tokenizer`` checkpoint (pyssl), a TorchScript
    archive, or a pickled ``nn.Module`` (``weights_only=False``: trusted files only)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise ConfigError(f"tokenizer={str(path)!r}: no such file (give a vq_tokenizer run "
                          "folder or checkpoint, a TorchScript file or a saved module; or "
                          "tokenizer=auto)")
    from ..models.text import load_module_file

    try:
        obj = load_module_file(p)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"tokenizer={str(path)!r}: cannot load ({type(e).__name__}: {e})") \
            from None
    if isinstance(obj, (nn.Module, torch.jit.ScriptModule)):
        return obj
    if isinstance(obj, dict) and obj.get("recipe") == "vq_tokenizer":
        from ..engine.config import config_from_dict
        from .tokenizer import VQTokenizerConfig, VQTokenizerRecipe

        cfg = config_from_dict(VQTokenizerConfig, obj["config"]["recipe_config"])
        cfg.knn_every, cfg.figures = 0, False
        ch = obj["encoder"]["spec"]["backbone"]["in_chans"]
        rec = VQTokenizerRecipe(cfg, ch)
        rec.load_state_dict(obj["model"])
        return rec.tokenizer.eval()
    raise ConfigError(f"tokenizer={str(path)!r}: neither a vq_tokenizer checkpoint nor a saved "
                      f"module (got {type(obj).__name__})")


@dataclass
class BEiTConfig(ViTConfig):
    vit_pool: str = "mean"
    tokenizer: str = "auto"          # auto | vq_tokenizer run/checkpoint | saved module file
    tokenizer_epochs: int = 5        # tokenizer=auto: epochs of vq_tokenizer training
    tokenizer_codes: int = 512       # tokenizer=auto: codebook size
    tokenizer_subset: int = -1       # tokenizer=auto: images it trains on (-1: data_subset)
    tokenizer_pixels: str = "same"   # same ([-1, 1]) | unit ([0, 1])
    tokenizer_image_size: int = 0    # >0: resize the view for the tokenizer
    vocab_size: int = 0              # 0: from the tokenizer
    mask_ratio: float = 0.4          # share of patches masked (BEiT: 75/196)
    min_block: int = 4               # smallest masking block (patches)
    crop_scale_min: float = 0.2


class BEiT(ModernRecipe):
    name = "beit"
    description = ("BEiT: block-masked patches (block_masking) + mask token, cross-entropy "
                   "over the visual tokens of a VQ tokenizer (trained here or given)")
    paper = "Bao et al., BEiT: BERT Pre-Training of Image Transformers, ICLR 2022"
    small_scale = ("ViT 4x128 (4 px patches) at 28 px, own VQ-VAE tokenizer (512 codes) "
                   "instead of DALL-E's dVAE, 19/49 patches masked, a few epochs, mean-pooled "
                   "patch features for evaluation")
    Config = BEiTConfig
    train_defaults = {"lr": 1.5e-3, "weight_decay": 0.05, "batch_size": 128, "epochs": 10,
                      "warmup_epochs": 1.0, "clip_grad": 3.0}
    needs_vit = True
    find_unused_parameters = False

    def __init__(self, cfg: BEiTConfig, channels: int, tokenizer: nn.Module | None = None):
        super().__init__(cfg, channels)
        self.check_config()
        check_range(cfg, "mask_ratio", 0, 1, lo_open=True, hi_open=True)
        check_range(cfg, "min_block", 1)
        check_range(cfg, "tokenizer_epochs", 1)
        check_range(cfg, "tokenizer_codes", 2)
        check_range(cfg, "tokenizer_subset", -1)
        check_range(cfg, "vocab_size", 0)
        check_range(cfg, "tokenizer_image_size", 0)
        check_range(cfg, "crop_scale_min", 0, 1, lo_open=True)
        if cfg.tokenizer_pixels not in ("same", "unit"):
            raise ConfigError(f"tokenizer_pixels={cfg.tokenizer_pixels!r}: must be 'same' or "
                              "'unit'")
        self.backbone = self.build_encoder()
        g = self.backbone.grid
        self.num_masked = max(1, int(round(cfg.mask_ratio * g * g)))
        self.aug = TensorAugment(cfg.image_size, channels, (cfg.crop_scale_min, 1.0),
                                 jitter=0.0, gray_p=0.0)
        module = tokenizer
        if module is None and cfg.tokenizer != "auto":
            module = load_tokenizer(cfg.tokenizer)
        self._tok = None
        vocab = cfg.vocab_size or (cfg.tokenizer_codes if module is None else 0)
        if module is not None:
            self._set_tokenizer(module)
            vocab = self._tok.vocab_size
        self.lm_head = nn.Linear(self.backbone.num_features, vocab)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def _set_tokenizer(self, module: nn.Module) -> None:
        adapter = TokenizerAdapter(module, self.cfg.vocab_size, self.cfg.tokenizer_pixels,
                                   self.cfg.tokenizer_image_size)
        object.__setattr__(self, "_tok", adapter)   # frozen; not part of the state dict
        if hasattr(self, "lm_head") and self.lm_head.out_features != adapter.vocab_size:
            raise ConfigError(f"the tokenizer has {adapter.vocab_size} tokens but the head "
                              f"predicts {self.lm_head.out_features}")

    @property
    def tokenizer(self) -> TokenizerAdapter | None:
        return self._tok

    @property
    def encoder(self):
        return self.backbone

    # ------------------------------------------------------------------ tokenizer=auto
    def _train_tokenizer(self, ctx) -> nn.Module:
        from ..engine.checkpoint import load_checkpoint
        from ..engine.run import pretrain

        run = Path(ctx.trainer.out) / "tokenizer"
        if not (run / "last.pt").exists() or \
                load_checkpoint(run / "last.pt").get("epoch", 0) < self.cfg.tokenizer_epochs:
            tc = ctx.train_config
            ov = {"image_size": str(self.cfg.image_size), "num_codes":
                  str(self.cfg.tokenizer_codes), "downsample": str(self.backbone.patch_size),
                  "data_subset": str(tc.data_subset if self.cfg.tokenizer_subset < 0
                                     else self.cfg.tokenizer_subset), "seed": str(tc.seed),
                  "progress": str(tc.progress), "tensorboard": str(tc.tensorboard),
                  "data_root": tc.data_root, "device": tc.device, "log_every": str(tc.log_every),
                  "num_workers": str(tc.num_workers), "batch_size": str(tc.batch_size),
                  "precision": tc.precision}
            if ctx.rank == 0:
                print(f"[pyssl] beit: training the tokenizer (vq_tokenizer, "
                      f"{self.cfg.tokenizer_epochs} epochs) into {run}", flush=True)
            barrier()  # every rank sees the same run folder before deciding to resume
            resume = (run / "last.pt").exists()
            pretrain("vq_tokenizer", data=tc.data, epochs=self.cfg.tokenizer_epochs, out=run,
                     overrides=ov, resume=resume)
            barrier()  # rank 0 writes last.pt: the others wait for the finished file
        return load_tokenizer(run / "last.pt")

    def on_train_start(self, ctx):
        if self._tok is None:
            if getattr(ctx, "trainer", None) is None:
                raise ConfigError("beit with tokenizer=auto trains its tokenizer through the "
                                  "engine; outside it pass tokenizer=<file> or a module")
            self._set_tokenizer(self._train_tokenizer(ctx))
        self._tok.to(ctx.device)
        self._check_grid(ctx.device)
        super().on_train_start(ctx)

    def _check_grid(self, device) -> None:
        s = self.cfg.image_size
        codes = self._tok(torch.zeros(1, self.channels, s, s, device=device))
        L = self.backbone.grid ** 2
        if codes.shape[1] != L:
            raise ConfigError(f"the tokenizer gives {codes.shape[1]} tokens per {s} px image but "
                              f"the ViT has {L} patches ({self.backbone.grid}x"
                              f"{self.backbone.grid}); set tokenizer_image_size or patch_size")

    # ------------------------------------------------------------------ step
    def views(self, image, label):
        return normalize_pixels(self.aug(match_channels(image, self.channels)))

    def sample_masks(self, batch: int, device=None) -> torch.Tensor:
        g = self.backbone.grid
        m = block_masking(batch, g, g, self.num_masked,
                          min_num_patches=min(self.cfg.min_block, self.num_masked))
        return m.reshape(batch, g * g).to(device)

    def training_step(self, batch, ctx):
        if self._tok is None:
            raise RuntimeError("beit has no tokenizer yet (train through the engine, or pass "
                               "tokenizer=)")
        x = batch
        with torch.no_grad():
            codes = self._tok(x)                                         # [B, L]
        masks = self.sample_masks(x.shape[0], x.device)                 # [B, L] True = masked
        patch = self.backbone.forward_features(x, mask=masks)["patch"]   # [B, L, D]
        logits = self.lm_head(patch[masks])                              # [M, V]
        target = codes[masks]
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "token_acc": acc}
