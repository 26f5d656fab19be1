"""What the modern recipes (SimCLR, CLIP-style, DINO/DINOv2, MAE, BEiT) share: config keys for
a configurable ViT, the per-epoch k-NN monitor and figure writing, and config checks.

ViT keys: ``backbone=vit_tiny`` with ``backbone_width`` (embedding dim), ``vit_depth``,
``vit_heads``, ``vit_pool`` (``cls`` | ``mean``: the feature evaluation reads), ``patch_size``
(0: the backbone's default, 4 px up to 64 px images) and ``drop_path``. A ResNet backbone ignores
them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..engine.config import ConfigError
from ..engine.recipe import Recipe, RecipeConfig, StepContext

__all__ = ["ModernConfig", "ModernRecipe", "ViTConfig", "check_range"]


def check_range(cfg, key: str, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    """Raise a ConfigError naming ``key`` unless ``lo <(=) cfg.key <(=) hi``."""
    v = getattr(cfg, key)
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or \
          (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"{key}={v!r}: must be in {lb}{'-inf' if lo is None else lo}, "
                          f"{'inf' if hi is None else hi}{rb}")


@dataclass
class ModernConfig(RecipeConfig):
    vit_depth: int = 0          # 0: the named ViT's depth
    vit_heads: int = 0          # 0: the named ViT's heads
    vit_pool: str = "cls"       # cls | mean (the pooled feature)
    patch_size: int = 0         # 0: 4 px for images <= 64 px, else 16
    drop_path: float = 0.0
    knn_every: int = 1          # k-NN monitor every N epochs (0: off); written to knn.jsonl
    knn_data: str = ""          # labelled data for the monitor (default: the training data)
    knn_train: int = 2000
    knn_test: int = 1000
    figures: bool = True        # write the recipe's figures into <run>/figures

    def backbone_kwargs(self) -> dict:
        kw = super().backbone_kwargs()
        if self.backbone.startswith("vit"):
            if self.vit_depth:
                kw["depth"] = self.vit_depth
            if self.vit_heads:
                kw["num_heads"] = self.vit_heads
            if self.patch_size:
                kw["patch_size"] = self.patch_size
            if self.drop_path:
                kw["drop_path"] = self.drop_path
            kw["pool"] = self.vit_pool
        return kw


@dataclass
class ViTConfig(ModernConfig):
    """The ViT the ViT recipes (dino, dinov2, mae, beit) default to at small scale: 4 blocks,
    128 wide, 4 heads (4 px patches at 28 px)."""
    backbone: str = "vit_tiny"
    backbone_width: int = 128
    vit_depth: int = 4
    vit_heads: int = 4


class ModernRecipe(Recipe):
    """Base of the modern recipes: config checks, the k-NN monitor, figure hooks.

    Subclasses call ``self.check_config()`` in ``__init__`` and may override
    ``write_figures(ctx, epoch)``; ``monitor_encoder()`` is what the monitor evaluates (default
    :attr:`encoder`)."""

    needs_vit: bool = False     # figures / masking need a ViT backbone

    def check_config(self) -> None:
        cfg = self.cfg
        if cfg.vit_pool not in ("cls", "mean"):
            raise ConfigError(f"vit_pool={cfg.vit_pool!r}: must be 'cls' or 'mean'")
        for k in ("vit_depth", "vit_heads", "patch_size", "knn_every", "knn_train", "knn_test"):
            check_range(cfg, k, 0)
        check_range(cfg, "drop_path", 0, 1, hi_open=True)
        if self.needs_vit and not cfg.backbone.startswith("vit"):
            raise ConfigError(f"recipe {self.name!r} needs a ViT backbone (backbone=vit_tiny, "
                              f"vit_small, ...), got backbone={cfg.backbone!r}")

    # ------------------------------------------------------------------ monitor and figures
    def monitor_encoder(self):
        return self.encoder

    @staticmethod
    def _sharded(ctx: StepContext) -> bool:
        """FSDP over several processes: the model's forward is a collective, so the k-NN
        monitor and the figures run on every rank (rank 0 alone writes them)."""
        tc = getattr(ctx, "train_config", None)
        return ctx.world_size > 1 and getattr(tc, "distributed", "ddp") == "fsdp"

    def _runs_model_work(self, ctx: StepContext) -> bool:
        return ctx.rank == 0 or self._sharded(ctx)

    def _monitor(self, ctx: StepContext):
        if getattr(self, "_knn", None) is None and self.cfg.knn_every > 0 \
                and self._runs_model_work(ctx) and getattr(ctx, "trainer", None) is not None:
            from ..eval.monitor import KNNMonitor

            tc = ctx.train_config
            data = self.cfg.knn_data or tc.data
            self._knn = KNNMonitor(ctx.trainer.out, data, self.cfg.knn_train, self.cfg.knn_test,
                                   seed=tc.seed, root=tc.data_root or None)
        return getattr(self, "_knn", None)

    @contextlib.contextmanager
    def _whole_parameters(self, ctx: StepContext, needed: bool = True):
        """Sharded: sub-modules (the encoder) are called outside the recipe's own forward, whose
        hook would gather the parameters the recipe's FSDP group holds; gather them here, on
        every rank, while ``needed`` (the blocks sharded on their own gather in their forward)."""
        if needed and self._sharded(ctx) and hasattr(self, "unshard"):
            self.unshard()
            try:
                yield
            finally:
                self.reshard()
        else:
            yield

    def on_train_start(self, ctx: StepContext) -> None:
        mon = self._monitor(ctx)
        trainer = getattr(ctx, "trainer", None)
        # (sharded: every rank must take the same decision, so no per-rank file check)
        if mon is not None and ctx.step == 0 and getattr(trainer, "resume", None) is None and \
                (self._sharded(ctx) or not mon.has(0)):
            with self._whole_parameters(ctx):
                mon.evaluate(self.monitor_encoder(), self.encoder_spec(), 0)

    def on_epoch_end(self, ctx: StepContext) -> None:
        ep = ctx.epoch + 1
        mon = self._monitor(ctx)
        knn = mon is not None and (ep % self.cfg.knn_every == 0 or ep == ctx.train_config.epochs)
        figures = self.cfg.figures and self._runs_model_work(ctx) and \
            getattr(ctx, "trainer", None) is not None
        with self._whole_parameters(ctx, knn or figures):
            if knn:
                acc = mon.evaluate(self.monitor_encoder(), self.encoder_spec(), ep)
                if acc is not None and ctx.rank == 0 and \
                        getattr(ctx.train_config, "progress", False):
                    print(f"\n[pyssl] epoch {ep}: k-NN {100 * acc:.2f}%", flush=True)
            if figures:
                self.write_figures(ctx, ep)
                self._figures_at = ctx.trainer.step

    def on_train_end(self, ctx: StepContext) -> None:
        # a run stopped part-way through an epoch (max_steps, a signal) still gets its figures
        trainer = getattr(ctx, "trainer", None)
        if self.cfg.figures and self._runs_model_work(ctx) and trainer is not None and \
                getattr(self, "_figures_at", -1) != trainer.step:
            with self._whole_parameters(ctx):
                self.write_figures(ctx, trainer.epoch)

    def write_figures(self, ctx: StepContext, epoch: int) -> None:
        pass
