"""``run_eval``: evaluate a checkpoint's encoder with one or more protocols (linear, knn,
fewshot, finetune), print the accuracy table and save it (markdown + json) in the run folder.

Every protocol has a random-init baseline (``random_init=True``): the same architecture and
preprocessing with fresh weights, evaluated identically."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.datasets import DataError, find_fashion_mnist, resolve_data
from ..engine.checkpoint import check_folder, load_checkpoint, make_folder
from ..engine.config import ConfigError, TrainConfig, apply_overrides, config_to_dict
from .features import extract_features, image_view, load_encoder
from .fewshot import fewshot_eval
from .knn import knn_accuracy
from .linear import linear_probe

__all__ = ["PROTOCOLS", "EvalConfig", "markdown_table", "resolve_eval_data", "run_eval"]

PROTOCOLS = {
    "linear": "linear probe on frozen features (standardised; AdamW, cosine)",
    "knn": "weighted k-NN on frozen features (cosine, k=20, T=0.07 as in DINO)",
    "fewshot": "n-way n-shot episodes, nearest prototype (or logistic regression), 95% CI",
    "finetune": "end-to-end fine-tuning with a fraction of the labels",
    "zeroshot": "image-text checkpoints (clip): classify by text prompts, no labelled training",
}


@dataclass
class EvalConfig:
    data: str = ""                 # default: the pretraining data if labelled, else the recipe's
    data_root: str = ""            # torchvision datasets' root (default: the pretraining run's)
    train_subset: int = 0          # >0: fixed random subset of the labelled training split
    test_subset: int = 0
    batch_size: int = 256
    seed: int = 0
    feature: str = ""              # encoder output to read (default: the checkpoint's)
    view: str = ""                 # "image": whole images even for patch-grid checkpoints
    k: int = 20
    temperature: float = 0.07
    probe_epochs: int = 100
    probe_lr: float = 1e-3
    probe_weight_decay: float = 1e-4
    n_way: int = 5
    n_shots: tuple[int, ...] = (1, 5)
    n_query: int = 15
    episodes: int = 500
    fewshot_classifier: str = "prototype"
    label_fraction: float = 0.1
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 128
    progress: bool = True

    def validate(self) -> None:
        for k in ("batch_size", "k", "probe_epochs", "n_way", "n_query", "episodes",
                  "finetune_epochs", "finetune_batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k}={getattr(self, k)}: must be > 0")
        for k in ("temperature", "probe_lr", "finetune_lr"):
            if not 0 < getattr(self, k) < math.inf:
                raise ConfigError(f"{k}={getattr(self, k)}: must be a positive finite number")
        if not 0 <= self.probe_weight_decay < math.inf:
            raise ConfigError(f"probe_weight_decay={self.probe_weight_decay}: must be a finite "
                              "number >= 0")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"label_fraction={self.label_fraction}: must be in (0, 1]")
        if self.view not in ("", "image"):
            raise ConfigError(f"view={self.view!r}: must be '' (the checkpoint's input spec) or "
                              "'image' (whole images, no patch grid)")
        if self.fewshot_classifier not in ("prototype", "logistic"):
            raise ConfigError(f"fewshot_classifier={self.fewshot_classifier!r}: must be "
                              "'prototype' or 'logistic'")
        if any(s <= 0 for s in self.n_shots):
            raise ConfigError(f"n_shots={self.n_shots}: must be positive")


def _input_name(spec: dict) -> str:
    p = spec.get("input", {}).get("patches")
    return f"{p['grid']}x{p['grid']} patches" if p else "image"


def resolve_eval_data(cfg: EvalConfig, meta: dict) -> str:
    if cfg.data:
        return cfg.data
    conf = meta.get("config") or {}
    if conf.get("data", {}).get("num_classes"):
        return conf["train"]["data"]
    from ..recipes import RECIPES

    cls = RECIPES.get(meta.get("recipe") or "")
    name = getattr(cls, "default_eval_data", None) or "digits"
    if name == "fashion-mnist" and find_fashion_mnist() is None:
        warnings.warn("Fashion-MNIST is not installed: evaluating on digits", RuntimeWarning,
                      stacklevel=2)
        name = "digits"
    return name


PERCENT = {"accuracy", "train_accuracy", "ci95", "probe", "knn", "random probe", "random knn"}


def markdown_table(rows: list[dict], columns: list[str], percent=PERCENT) -> str:
    """A markdown table; columns in ``percent`` (accuracies in [0, 1]) are shown in %."""
    def fmt(c, v):
        if isinstance(v, float):
            return f"{100 * v:.2f}" if c in percent else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _write(out: Path, stem: str, result: dict, md: str) -> None:
    make_folder(out)
    for name, text in ((f"{stem}.json", json.dumps(result, indent=2) + "\n"),
                       (f"{stem}.md", md + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def run_eval(protocols, checkpoint, *, random_init: bool = False, out=None, overrides=(),
             verbose: bool = True) -> dict:
    """Evaluate; returns ``{"rows": [...], "data": ..., ...}`` and writes
    ``<out>/eval_<protocols>[_random].{md,json}`` (``out`` defaults to ``<run>/eval``)."""
    if isinstance(protocols, str):
        protocols = [protocols]
    if not protocols:
        raise ConfigError(f"no evaluation protocol given; valid: {', '.join(PROTOCOLS)} "
                          "(several: linear,knn)")
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ConfigError(f"unknown evaluation protocol {bad[0]!r}; valid: {', '.join(PROTOCOLS)}")
    cfg = EvalConfig()
    apply_overrides([cfg], list(overrides) if not isinstance(overrides, dict) else overrides)
    cfg.validate()
    ck = load_checkpoint(checkpoint)
    out_dir = check_folder(Path(out) if out else Path(ck["path"]).parent / "eval")
    encoder, spec, meta = load_encoder(ck, random_init=random_init, seed=cfg.seed)
    if cfg.view == "image":
        spec = image_view(spec)
    data = resolve_eval_data(cfg, meta)
    run = (meta.get("config") or {}).get("train", {})
    # the run's root serves the run's data only (not, e.g., the cache of a recipe's default)
    root = cfg.data_root or (run.get("data_root") if data == run.get("data") else None) or None
    train = resolve_data(data, "train", subset=cfg.train_subset, seed=cfg.seed, root=root)
    test = resolve_data(data, "test", subset=cfg.test_subset, seed=cfg.seed + 1, root=root)
    if not train.num_classes:
        raise DataError(f"--data {data!r} has no labels: evaluation needs a labelled dataset")
    feature = cfg.feature or spec.get("feature", "pooled")
    tag = "random-init" if random_init else "pretrained"
    rows: list[dict] = []
    result = {"checkpoint": ck["path"], "recipe": meta.get("recipe"), "step": meta.get("step"),
              "encoder": tag, "data": data, "train_size": len(train), "test_size": len(test),
              "feature": feature, "input": _input_name(spec), "config": config_to_dict(cfg),
              "rows": rows}
    feats = None
    if any(p in ("linear", "knn", "fewshot") for p in protocols):
        trf, trl = extract_features(encoder, spec, train, cfg.batch_size, feature=feature)
        tef, tel = extract_features(encoder, spec, test, cfg.batch_size, feature=feature)
        feats = (trf, trl, tef, tel)
        result["feature_dim"] = trf.shape[1]
    nc = train.num_classes
    for p in protocols:
        if p == "linear":
            r = linear_probe(*feats, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                             weight_decay=cfg.probe_weight_decay, seed=cfg.seed, num_classes=nc)
            rows.append({"protocol": "linear", "setting": f"{cfg.probe_epochs} epochs",
                         "accuracy": r["test_acc"], "train_accuracy": r["train_acc"]})
        elif p == "knn":
            acc = knn_accuracy(*feats, k=cfg.k, temperature=cfg.temperature, num_classes=nc)
            rows.append({"protocol": "knn", "setting": f"k={cfg.k}, T={cfg.temperature}",
                         "accuracy": acc})
        elif p == "fewshot":
            trf, _, tef, tel = feats
            for shot in cfg.n_shots:
                r = fewshot_eval(tef, tel, cfg.n_way, shot, cfg.n_query, cfg.episodes,
                                 cfg.fewshot_classifier, base_mean=trf.mean(0), seed=cfg.seed)
                rows.append({"protocol": "fewshot",
                             "setting": f"{cfg.n_way}-way {shot}-shot, {cfg.episodes} episodes",
                             "accuracy": r["acc"], "ci95": r["ci95"]})
        elif p == "finetune":
            rows.append(_finetune(ck, spec, random_init, train, test, cfg, out, checkpoint))
        elif p == "zeroshot":
            from .zeroshot import zeroshot_eval

            z = zeroshot_eval(ck, test, random_init=random_init, seed=cfg.seed,
                              batch_size=cfg.batch_size)
            rows.append({"protocol": "zeroshot",
                         "setting": f"{len(z['templates'])} prompt templates, "
                                    f"{len(z['classes'])} classes",
                         "accuracy": z["accuracy"]})
    md = markdown_table([{**r, "encoder": tag} for r in rows],
                        ["protocol", "setting", "encoder", "accuracy"] +
                        (["ci95"] if any("ci95" in r for r in rows) else []))
    title = (f"{meta.get('recipe')} ({tag}, step {meta.get('step')}) on {data}: "
             f"{len(train)} train / {len(test)} test images, input: {_input_name(spec)}; "
             f"accuracy in %")
    md = f"{title}\n\n{md}"
    stem = "eval_" + "_".join(protocols) + ("_random" if random_init else "")
    _write(out_dir, stem, result, md)
    result["table"] = md
    result["out"] = str(out_dir)
    if verbose:
        print(md, flush=True)
    return result


def _finetune(ck, spec, random_init, train, test, cfg: EvalConfig, out, checkpoint) -> dict:
    from ..data.datasets import Subset
    from ..engine.trainer import Trainer
    from .finetune import SupervisedFinetune, balanced_fraction

    sub = Subset(train, indices=balanced_fraction(train.labels(), cfg.label_fraction,
                                                  cfg.seed))
    torch.manual_seed(cfg.seed)
    model = SupervisedFinetune(spec, None if random_init else ck["encoder"]["state_dict"],
                               train.num_classes)
    tcfg = TrainConfig(epochs=cfg.finetune_epochs, batch_size=min(cfg.finetune_batch_size,
                                                                   len(sub)),
                       lr=cfg.finetune_lr, warmup_epochs=min(1.0, cfg.finetune_epochs / 4),
                       seed=cfg.seed, progress=cfg.progress, log_every=10, tensorboard=True)
    run = (Path(out) if out else Path(ck["path"]).parent / "eval") / (
        "finetune" + ("_random" if random_init else ""))
    if (run / "last.pt").exists():
        (run / "last.pt").unlink()
    Trainer(model, sub, tcfg, run, {"train": config_to_dict(tcfg),
                                    "finetune_of": str(checkpoint)}).fit()
    acc = model.accuracy(test, cfg.batch_size)
    return {"protocol": "finetune",
            "setting": f"{100 * cfg.label_fraction:g}% labels ({len(sub)}), "
                       f"{cfg.finetune_epochs} epochs", "accuracy": acc}
