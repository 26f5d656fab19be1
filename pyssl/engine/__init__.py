"""The one training loop (precision, schedules, EMA, checkpoints, DDP/FSDP, logs) and the recipe
interface. Import submodules directly or use the names re-exported here."""

from .checkpoint import atomic_save, load_checkpoint
from .config import ConfigError, TrainConfig, apply_overrides
from .ema import MomentumTeacher, ema_update
from .recipe import Recipe, RecipeConfig, StepContext
from .schedules import Schedule, cosine_schedule, momentum_schedule

__all__ = ["ConfigError", "MomentumTeacher", "Recipe", "RecipeConfig", "Schedule", "StepContext",
           "TrainConfig", "apply_overrides", "atomic_save", "cosine_schedule", "ema_update",
           "load_checkpoint", "momentum_schedule"]
