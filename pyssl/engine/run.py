"""``pretrain(...)``: everything between a command line and the loop — resolve the recipe and
its typed config (defaults < recipe defaults < overrides), check the data, create the run folder
and save the resolved config, build the recipe, train (or resume) with the engine.

A run folder holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``figures/``,
``last.pt`` (and ``checkpoint_epochNNNN.pt`` when ``keep_every_epochs`` is set)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..data.datasets import resolve_data
from .checkpoint import load_checkpoint
from .config import (ConfigError, TrainConfig, apply_overrides, config_from_dict,
                     config_to_dict, parse_overrides)
from .distributed import init_distributed, shutdown_distributed
from .trainer import Trainer

__all__ = ["build_configs", "default_run_dir", "pretrain"]


def build_configs(recipe: str, overrides=(), data: str | None = None,
                  epochs: int | None = None):
    """(recipe class, TrainConfig, recipe config) with every override applied and checked."""
    from ..recipes import get_recipe

    cls = get_recipe(recipe)
    train = TrainConfig()
    for k, v in cls.train_defaults.items():
        setattr(train, k, v)
    rcfg = cls.Config()
    ov = parse_overrides(list(overrides)) if not isinstance(overrides, dict) else dict(overrides)
    apply_overrides([train, rcfg], ov)
    if data is not None:
        train.data = data
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
            raise ConfigError(f"--epochs must be a positive integer, got {epochs!r}")
        train.epochs = epochs
    train.validate()
    if not isinstance(rcfg.image_size, int) or rcfg.image_size < 4:
        raise ConfigError(f"image_size={rcfg.image_size}: must be an integer >= 4")
    return cls, train, rcfg


def default_run_dir(recipe: str, data: str) -> Path:
    tag = Path(data).name if os.sep in data else data
    return Path("runs") / f"{recipe}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def pretrain(recipe: str, *, data: str | None = None, epochs: int | None = None,
             out: str | Path | None = None, overrides=(), resume: bool = False) -> dict:
    """Pretrain ``recipe``; returns the trainer's summary (status, step, loss, run_dir...).
    ``resume=True`` continues the run in ``out`` from its ``last.pt`` with its saved config
    (``overrides`` may still change keys such as ``epochs``)."""
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run folder to continue)")
        ck_path = Path(out) / "last.pt"
        if not ck_path.exists():
            raise FileNotFoundError(f"--resume: {ck_path} does not exist")
        ck = load_checkpoint(ck_path)
        saved = ck["config"]
        recipe = saved["recipe"] if recipe is None else recipe
        if recipe.replace("-", "_") != saved["recipe"]:
            raise ConfigError(f"--resume: {out} is a {saved['recipe']!r} run, not {recipe!r}")
        from ..recipes import get_recipe

        cls = get_recipe(recipe)
        train = config_from_dict(TrainConfig, saved["train"])
        rcfg = config_from_dict(cls.Config, saved["recipe_config"])
        apply_overrides([train, rcfg], list(overrides) if not isinstance(overrides, dict)
                        else overrides)
        if data is not None and data != train.data:
            raise ConfigError(f"--resume: the run used --data {train.data!r}, not {data!r}")
        if epochs is not None:
            train.epochs = epochs
        train.validate()
        del ck
    else:
        cls, train, rcfg = build_configs(recipe, overrides, data, epochs)

    info = init_distributed(train.device)
    if out is None:
        run_dir = [str(default_run_dir(cls.name, train.data))]
        if info.enabled:
            torch.distributed.broadcast_object_list(run_dir, src=0)
        out = run_dir[0]
    out = Path(out)
    if not resume and (out / "last.pt").exists():
        raise ConfigError(f"--out {out} already holds a run (last.pt); pass --resume to continue "
                          "it or choose another --out")
    dataset = resolve_data(train.data, "train", subset=train.data_subset, seed=train.seed,
                           root=train.data_root or None, image_size=rcfg.image_size)
    torch.manual_seed(train.seed)
    model = cls(rcfg, dataset.channels)
    model.check_data(dataset)
    record = {"recipe": cls.name, "paper": cls.paper, "small_scale": cls.small_scale,
              "train": config_to_dict(train), "recipe_config": config_to_dict(rcfg),
              "data": {"name": dataset.name, "size": len(dataset),
                       "channels": dataset.channels, "num_classes": dataset.num_classes},
              "world_size": info.world_size, "torch": torch.__version__}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", record)
        print(f"[pyssl] {cls.name} on {dataset.name} ({len(dataset)} images), "
              f"{train.epochs} epochs, batch {train.batch_size} x {info.world_size} process(es) "
              f"-> {out}", flush=True)
    trainer = Trainer(model, dataset, train, out, record,
                      resume=out / "last.pt" if resume else None, dist_info=info)
    summary = trainer.fit()
    summary["history"] = trainer.history
    shutdown_distributed(info)
    return summary
