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
from .checkpoint import check_folder, load_checkpoint, make_folder
from .config import (ConfigError, TrainConfig, apply_overrides, config_from_dict,
                     config_to_dict, parse_overrides)
from .distributed import init_distributed, shutdown_distributed
from .trainer import Trainer, TrainingDiverged

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
    _set_epochs(train, epochs)
    train.validate()
    check_recipe_config(rcfg)
    return cls, train, rcfg


def _set_epochs(train: TrainConfig, epochs) -> None:
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
            raise ConfigError(f"--epochs must be a positive integer, got {epochs!r}")
        train.epochs = epochs


def check_recipe_config(rcfg) -> None:
    """The keys every recipe config has (recipes check their own keys when built)."""
    if not isinstance(rcfg.image_size, int) or rcfg.image_size < 4:
        raise ConfigError(f"image_size={rcfg.image_size}: must be an integer >= 4")
    if not isinstance(rcfg.backbone_width, int) or rcfg.backbone_width < 0:
        raise ConfigError(f"backbone_width={rcfg.backbone_width}: must be an integer >= 0 (0: the "
                          "backbone's default width)")


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
        try:
            ck = load_checkpoint(ck_path)
        except ValueError as e:
            kept = sorted(Path(out).glob("checkpoint_epoch*.pt"))
            hint = (f"; the run folder also holds {kept[-1].name}: copy it to last.pt to resume "
                    "from it" if kept else "")
            raise ValueError(f"--resume: {e}{hint}") from None
        saved = ck.get("config")
        if not (isinstance(saved, dict) and all(k in saved for k in ("recipe", "train",
                                                                    "recipe_config"))):
            raise ConfigError(f"--resume: {ck_path} holds no run configuration (a checkpoint "
                              "written by Trainer without pyssl pretrain's config record?)")
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
        _set_epochs(train, epochs)
        train.validate()
        check_recipe_config(rcfg)
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
    if info.is_main:
        check_folder(out)
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
              "world_size": info.world_size, "torch": str(torch.__version__)}
    if info.is_main:
        make_folder(out)
        print(f"[pyssl] {cls.name} on {dataset.name} ({len(dataset)} images), "
              f"{train.epochs} epochs, batch {train.batch_size} x {info.world_size} process(es) "
              f"-> {out}", flush=True)

    def on_start():  # every check passed, the checkpoint loaded: config.json says what runs now
        if info.is_main:
            _write_json(out / "config.json", record)

    trainer = Trainer(model, dataset, train, out, record,
                      resume=out / "last.pt" if resume else None, dist_info=info,
                      on_start=on_start)
    try:
        summary = trainer.fit()
    except TrainingDiverged:  # every rank saw the same (all-reduced) loss: all are here
        shutdown_distributed(info)
        raise
    summary["history"] = trainer.history
    shutdown_distributed(info)
    return summary
