"""DINO and DINOv2: self-distillation with a momentum teacher over multi-crop views.

Papers: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(DINO); Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024
(DINOv2), with iBOT's masked-patch objective (Zhou et al., ICLR 2022).

As in DINO: 2 global + N local crops (crop-major batches, :class:`pyssl.data.multicrop.
FastMultiCrop`, with DINO's asymmetric blur/solarisation); student and teacher share the
architecture (backbone + :class:`pyssl.models.heads.DINOHead`: MLP, bottleneck, L2 norm,
weight-normalised prototype layer of ``out_dim`` = K prototypes); the teacher sees the global
crops only and is an exponential moving average of the student with a cosine momentum schedule
(``momentum_teacher`` -> 1); the loss is :class:`pyssl.losses.DINOLoss` over the fused kernel
(teacher centering + sharpening, cross-entropy over every (teacher crop, other student crop)
pair, EMA centre all-reduced across processes), with a linear teacher-temperature warm-up
(``warmup_teacher_temp`` -> ``teacher_temp`` over ``warmup_teacher_temp_epochs``); the
prototype layer is frozen during the first ``freeze_last_layer`` epochs (its gradients are
dropped before the optimizer step); gradient clipping and a cosine weight-decay schedule
(0.04 -> 0.4) come from the engine. Evaluation reads the teacher's backbone (``eval_teacher``),
as DINO reports.

DINOv2 options (all on in the ``dinov2`` recipe): ``ibot=true`` masks a share
(``mask_probability``) of the student's global crops with BEiT block masks
(:func:`pyssl.ops.block_masking`, per-image ratio spread over ``mask_ratio_min..max``), the
masked patch tokens are replaced by the ViT's learnable mask token, and
:class:`pyssl.losses.IBOTPatchLoss` matches their (separate-head) prototypes to the teacher's on
the unmasked crop; ``koleo_weight`` adds the KoLeo regulariser on the student's CLS features of
each global crop (:func:`pyssl.losses.koleo_loss`); ``centering=sinkhorn_knopp`` replaces the
EMA centre by Sinkhorn-Knopp targets (:func:`pyssl.ops.sinkhorn_knopp_center`).

Figures (``figures=true``, into ``<run>/figures``): ``attention.png`` — the CLS token's
self-attention over the patches in the teacher's last block, per head, for a few training
images; ``knn.png`` (+ ``knn.jsonl``) — k-NN accuracy after every epoch (epoch 0 = before
training).

Small-scale differences: a 4-block, 128-d ViT with 4 px patches at 28 px (paper: ViT-S/16 at
224 px); local crops of 12 px (paper 96 px at 224: the same ratio); K = 4096 prototypes
(paper 65536; ``out_dim=65536`` works: see the README's memory comparison), head hidden 512 and
bottleneck 128 (paper 2048 / 256); teacher momentum 0.99 (paper 0.996, for ~100x more steps);
a few epochs; batch 128. For runs of a few hundred steps (the README's recipes table: 400 steps
of batch 64, 2 + 4 crops, K = 1024) set ``head_batch_norm=true`` (BatchNorm in the head's MLP,
an option of the paper's code): without it the teacher's outputs stay near uniform that long
(teacher entropy ~ log K, a handful of prototypes used) and the features end below a random
encoder's; with it DINO beats random init in the table. ``vit_pool`` picks the feature the head
is trained on and the evaluation reads: ``cls`` (the paper) or ``mean`` (the mean patch token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.multicrop import FastMultiCrop
from ..data.transforms import input_spec, multicrop_collate
from ..engine.config import ConfigError
from ..engine.distributed import initialized
from ..engine.ema import MomentumTeacher
from ..losses.dino import CENTERINGS, DINOLoss, IBOTPatchLoss
from ..losses.koleo import koleo_loss
from ..models.heads import DINOHead
from ..ops import block_masking
from .modern import ModernRecipe, ViTConfig, check_range

__all__ = ["DINO", "DINOConfig", "DINOv2", "DINOv2Config", "sample_ibot_masks"]


def prototypes_used(probs: torch.Tensor) -> float:
    """How many prototypes are the argmax of at least one teacher row ``probs`` [rows, K], over
    the global batch: under torch.distributed the ranks' sets are merged (an all-reduce, so every
    rank must call it), so the logged value does not depend on the number of processes."""
    used = torch.zeros(probs.shape[-1], dtype=torch.int32, device=probs.device)
    used[probs.argmax(-1)] = 1
    if initialized():
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
    return float(used.sum())


def sample_ibot_masks(n: int, h: int, w: int, ratio_min: float = 0.1, ratio_max: float = 0.5,
                      probability: float = 0.5, min_num_patches: int = 4,
                      device=None) -> torch.Tensor:
    """DINOv2-style masks for ``n`` images on an ``h x w`` patch grid: ``round(n *
    probability)`` randomly chosen images get BEiT block masks
    (:func:`pyssl.ops.block_masking`) whose ratios are spread evenly over
    ``[ratio_min, ratio_max]`` (image ``i`` of them draws from the ``i``-th of equal
    sub-intervals), the others none. Returns bool ``[n, h*w]`` (True = masked). Randomness:
    torch's global RNG."""
    L = h * w
    masks = torch.zeros(n, L, dtype=torch.bool)
    k = int(round(n * probability))
    if k > 0:
        edges = torch.linspace(ratio_min, ratio_max, k + 1)
        ratios = edges[:-1] + torch.rand(k) * (edges[1:] - edges[:-1])
        counts = (ratios * L).long().clamp(0, L)
        rows = torch.randperm(n)[:k]
        for c in counts.unique().tolist():
            sel = rows[counts == c]
            if c > 0:
                m = block_masking(len(sel), h, w, int(c), min_num_patches=min(min_num_patches, c))
                masks[sel] = m.reshape(len(sel), L)
    return masks.to(device) if device is not None else masks


def _is_log_step(ctx) -> bool:
    """Whether the engine writes this step's metrics (``log_every``, and the last step)."""
    every = max(1, int(getattr(ctx.train_config, "log_every", 1) or 1))
    return (ctx.step + 1) % every == 0 or ctx.step + 1 >= ctx.total_steps


class _DINONet(nn.Module):
    """Backbone + DINO head (+ a separate iBOT patch head)."""

    def __init__(self, backbone: nn.Module, head: DINOHead, patch_head: DINOHead | None):
        super().__init__()
        self.backbone, self.head, self.patch_head = backbone, head, patch_head

    def last_layers(self) -> list[nn.Module]:
        return [h.last_layer for h in (self.head, self.patch_head) if h is not None]


@dataclass
class DINOConfig(ViTConfig):
    out_dim: int = 4096              # K prototypes (paper 65536)
    head_hidden: int = 512
    head_bottleneck: int = 128
    head_layers: int = 3
    head_batch_norm: bool = False
    norm_last_layer: bool = True
    freeze_last_layer: float = 1.0   # epochs with the prototype layer frozen
    n_global_crops: int = 2
    n_local_crops: int = 6
    local_size: int = 12
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    blur_sigma: tuple[float, float] = (0.1, 1.0)   # px of the crop (paper 0.1-2 px at 224)
    jitter: float = 0.4
    momentum_teacher: float = 0.99
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: str = "center"        # center | sinkhorn_knopp (DINOv2)
    ibot: bool = False               # DINOv2: masked-patch loss on block-masked global crops
    ibot_weight: float = 1.0
    ibot_separate_head: bool = True
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    mask_probability: float = 0.5
    koleo_weight: float = 0.0        # DINOv2: 0.1
    eval_teacher: bool = True
    compile: bool = False            # torch.compile the networks' forward (fullgraph)


class DINO(ModernRecipe):
    name = "dino"
    description = ("DINO: multi-crop self-distillation, momentum teacher, fused DINO loss "
                   "(options: iBOT, KoLeo, Sinkhorn-Knopp)")
    paper = "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021"
    small_scale = ("ViT 4x128 (4 px patches) at 28 px, local crops 12 px, K=4096 prototypes, "
                   "head 512/128, teacher momentum 0.99, batch 128, a few epochs")
    Config = DINOConfig
    train_defaults = {"lr": 1e-3, "weight_decay": 0.04, "final_weight_decay": 0.4,
                      "batch_size": 128, "epochs": 10, "warmup_epochs": 1.0, "clip_grad": 3.0}

    def __init__(self, cfg: DINOConfig, channels: int):
        super().__init__(cfg, channels)
        self.check_config()
        self._check(cfg)
        backbone = self.build_encoder()
        d = backbone.num_features

        def head():
            return DINOHead(d, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck,
                            cfg.head_layers, cfg.head_batch_norm, cfg.norm_last_layer)

        patch_head = head() if cfg.ibot and cfg.ibot_separate_head else None
        self.student = _DINONet(backbone, head(), patch_head)
        self.teacher = MomentumTeacher(self.student, cfg.momentum_teacher, 1.0)
        kw = dict(teacher_temp=cfg.teacher_temp, warmup_teacher_temp=cfg.warmup_teacher_temp,
                  warmup_epochs=cfg.warmup_teacher_temp_epochs, student_temp=cfg.student_temp,
                  center_momentum=cfg.center_momentum, centering=cfg.centering)
        self.dino_loss = DINOLoss(cfg.out_dim, n_teacher_crops=cfg.n_global_crops, **kw)
        self.ibot_loss = IBOTPatchLoss(cfg.out_dim, **kw) if cfg.ibot else None
        self.multicrop = FastMultiCrop(cfg.image_size, cfg.local_size, cfg.n_local_crops,
                                       channels, cfg.global_scale, cfg.local_scale,
                                       cfg.n_global_crops, input_spec(cfg.image_size, channels),
                                       blur_sigma=cfg.blur_sigma, jitter=cfg.jitter)
        self._networks = (torch.compile(self.forward_networks, fullgraph=True) if cfg.compile
                          else self.forward_networks)

    def _check(self, cfg: DINOConfig) -> None:
        for k in ("out_dim", "head_hidden", "head_bottleneck", "head_layers", "local_size"):
            check_range(cfg, k, 1)
        check_range(cfg, "n_global_crops", 1, 2)
        check_range(cfg, "n_local_crops", 0)
        check_range(cfg, "freeze_last_layer", 0)
        check_range(cfg, "momentum_teacher", 0, 1)
        check_range(cfg, "center_momentum", 0, 1)
        for k in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            check_range(cfg, k, 0, lo_open=True)
        check_range(cfg, "warmup_teacher_temp_epochs", 0)
        for k in ("ibot_weight", "koleo_weight"):
            check_range(cfg, k, 0)
        check_range(cfg, "mask_ratio_min", 0, 1)
        check_range(cfg, "mask_ratio_max", cfg.mask_ratio_min, 1)
        check_range(cfg, "mask_probability", 0, 1)
        check_range(cfg, "jitter", 0)
        if not 0 < cfg.blur_sigma[0] <= cfg.blur_sigma[1]:
            raise ConfigError(f"blur_sigma={cfg.blur_sigma}: need 0 < min <= max")
        for k in ("global_scale", "local_scale"):
            lo, hi = getattr(cfg, k)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{k}={getattr(cfg, k)}: need 0 < min <= max <= 1")
        if cfg.centering not in CENTERINGS:
            raise ConfigError(f"centering={cfg.centering!r}: must be one of "
                              f"{', '.join(CENTERINGS)}")
        if cfg.ibot and not cfg.backbone.startswith("vit"):
            raise ConfigError("ibot=true needs a ViT backbone (masked patch tokens)")
        if cfg.koleo_weight > 0 and cfg.n_global_crops < 1:
            raise ConfigError("koleo_weight > 0 needs global crops")

    # ------------------------------------------------------------------ interface
    @property
    def encoder(self):
        return self.teacher.module.backbone if self.cfg.eval_teacher else self.student.backbone

    def fsdp_modules(self):
        return list(getattr(self.student.backbone, "blocks", []))

    def views(self, image, label):
        return self.multicrop(image)

    def collate(self, samples):
        return multicrop_collate(samples)

    def on_train_start(self, ctx):
        self.teacher.set_total_steps(ctx.total_steps)
        super().on_train_start(ctx)

    def on_before_optimizer_step(self, ctx):
        # DINO: the prototype layer does not move during the first epoch(s)
        if ctx.step < self.cfg.freeze_last_layer * ctx.steps_per_epoch:
            for layer in self.student.last_layers():
                for p in layer.parameters():
                    p.grad = None

    def on_after_optimizer_step(self, ctx):
        self.teacher.update(self.student, ctx.step)

    # ------------------------------------------------------------------ step
    def _features(self, net: _DINONet, x, mask=None):
        f = net.backbone.forward_features(x, mask) if mask is not None else \
            net.backbone.forward_features(x)
        # "pooled": the CLS token (vit_pool=cls, the paper) or the mean patch token (mean)
        return f["pooled"], f.get("patch")

    def forward_networks(self, glob: torch.Tensor, loc: torch.Tensor | None,
                         masks: torch.Tensor | None):
        """Teacher on the global crops, student on all crops (masked global crops for iBOT):
        ``(student logits [S*B, K], teacher logits [T*B, K], student global CLS features,
        student patch tokens, teacher patch tokens)``. This is the part ``compile=true``
        compiles (``fullgraph``)."""
        with torch.no_grad():
            t_cls, t_patch = self._features(self.teacher.module, glob)
            t_out = self.teacher.module.head(t_cls)
        s_cls, s_patch = self._features(self.student, glob, masks)
        cls_all = s_cls
        if loc is not None:
            l_cls, _ = self._features(self.student, loc)
            cls_all = torch.cat([s_cls, l_cls])
        return self.student.head(cls_all), t_out, s_cls, s_patch, t_patch

    def _losses(self, glob: torch.Tensor, loc: torch.Tensor | None, masks: torch.Tensor | None,
                epoch: int):
        cfg = self.cfg
        s_out, t_out, s_cls, s_patch, t_patch = self._networks(glob, loc, masks)
        # The losses run eagerly (compile=true compiles the networks): iBOT selects the masked
        # patch tokens with a boolean mask (a data-dependent shape) and KoLeo is cheap. The loss
        # modules themselves compile (tests/losses/test_dino.py: compiled == eager).
        out = {}
        loss = self.dino_loss(s_out, t_out, epoch)
        out["dino_loss"] = loss.detach()
        if self.ibot_loss is not None:
            phead_s = self.student.patch_head or self.student.head
            phead_t = self.teacher.module.patch_head or self.teacher.module.head
            with torch.no_grad():
                tp = phead_t(t_patch[masks])
            sp = phead_s(s_patch[masks])
            ib = self.ibot_loss(sp, tp, masks, epoch)
            loss = loss + cfg.ibot_weight * ib
            out["ibot_loss"] = ib.detach()
        if cfg.koleo_weight > 0:
            B = glob.shape[0] // cfg.n_global_crops
            ko = sum(koleo_loss(s_cls[c * B:(c + 1) * B]) for c in range(cfg.n_global_crops))
            loss = loss + cfg.koleo_weight * ko
            out["koleo"] = ko.detach()
        out["loss"] = loss
        return out, t_out

    def training_step(self, batch, ctx):
        cfg = self.cfg
        crops = list(batch)
        glob = torch.cat(crops[:cfg.n_global_crops])
        loc = torch.cat(crops[cfg.n_global_crops:]) if len(crops) > cfg.n_global_crops else None
        masks = None
        if self.ibot_loss is not None:
            bb = self.student.backbone
            gh, gw = glob.shape[-2] // bb.patch_size, glob.shape[-1] // bb.patch_size
            masks = sample_ibot_masks(glob.shape[0], gh, gw, cfg.mask_ratio_min,
                                      cfg.mask_ratio_max, cfg.mask_probability,
                                      device=glob.device)
        out, t_out = self._losses(glob, loc, masks, int(ctx.epoch))
        if _is_log_step(ctx):
            # teacher entropy / prototype usage: collapse diagnostics, only on the steps the
            # engine logs (they build the [rows, K] probabilities the fused loss avoids)
            with torch.no_grad():
                # the centre after this step's update, as on one process (under
                # torch.distributed the update waits in flight until flushed)
                self.dino_loss.flush()
                probs = torch.softmax((t_out.float() - self.dino_loss.center) /
                                      self.dino_loss.teacher_temperature(ctx.epoch), -1)
                out["teacher_entropy"] = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
                out["prototypes_used"] = prototypes_used(probs)
        out["teacher_temp"] = self.dino_loss.teacher_temperature(ctx.epoch)
        out["momentum"] = self.teacher.momentum(ctx.step)
        return out

    # ------------------------------------------------------------------ figures
    def _figure_images(self, ctx, n: int = 6):
        base = ctx.dataset.base if hasattr(ctx.dataset, "base") else ctx.dataset
        picked, seen = [], set()
        labels = base.labels() if getattr(base, "classes", None) else [-1] * len(base)
        for i, y in enumerate(labels):
            if y not in seen or y == -1:
                seen.add(y)
                picked.append(i)
            if len(picked) == n:
                break
        return [base[i][0] for i in picked]

    def write_figures(self, ctx, epoch):
        if not self.cfg.backbone.startswith("vit"):
            return
        from ..eval.figures import attention_figure

        enc = self.encoder
        attention_figure(enc, self._figure_images(ctx), self.input_spec(),
                         ctx.trainer.out / "figures" / "attention.png",
                         title=f"{self.name}: CLS self-attention, last block "
                               f"({'teacher' if self.cfg.eval_teacher else 'student'}), "
                               f"epoch {epoch}")


@dataclass
class DINOv2Config(DINOConfig):
    ibot: bool = True
    koleo_weight: float = 0.1
    centering: str = "sinkhorn_knopp"


class DINOv2(DINO):
    name = "dinov2"
    description = ("DINOv2: DINO + iBOT masked-patch loss (block masks) + KoLeo + "
                   "Sinkhorn-Knopp centering")
    paper = ("Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, "
             "TMLR 2024")
    small_scale = ("as dino (ViT 4x128 at 28 px, K=4096, head 512/128, momentum 0.99), "
                   "separate iBOT head with the same K, masks on half the global crops "
                   "(ratios 0.1-0.5), KoLeo 0.1, Sinkhorn-Knopp (3 iterations)")
    Config = DINOv2Config
