"""Typed configuration: dataclasses overridden by ``key=value`` strings from the command line.

Values are converted to the field's annotated type (``int``, ``float``, ``bool``, ``str``,
``tuple[float, ...]``, ``list[int]``, optional types); an unknown key or a value of the wrong
type raises :class:`ConfigError` naming the key and listing the valid keys, before anything
is trained."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, fields

__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "config_to_dict", "convert_value",
           "parse_overrides"]


class ConfigError(ValueError):
    """A configuration key or value that is not valid (raised before training starts)."""


@dataclass
class TrainConfig:
    """What the engine needs; every recipe shares these keys (recipes change defaults)."""

    data: str = "digits"              # dataset name or path (see `pyssl data`/resolve_data)
    data_root: str = ""               # root for torchvision datasets
    data_subset: int = 0              # >0: train on a fixed random subset of this many images
    epochs: int = 10
    max_steps: int = 0                # >0: stop after this many optimizer steps
    batch_size: int = 128             # global batch (split evenly across processes)
    optimizer: str = "adamw"          # adamw | sgd
    lr: float = 1e-3                  # peak learning rate (after warm-up)
    min_lr: float = 1e-6              # final learning rate of the cosine schedule
    warmup_epochs: float = 1.0        # linear warm-up from 0 (per step)
    weight_decay: float = 0.05
    final_weight_decay: float = -1.0  # <0: constant weight decay; else cosine to this value
    momentum: float = 0.9             # SGD momentum (AdamW: beta1)
    clip_grad: float = 0.0            # >0: clip the global gradient norm to this value
    precision: str = "fp32"           # fp32 | bf16 | fp16 (fp16 needs CUDA) | auto
    device: str = "auto"              # auto | cpu | cuda
    seed: int = 0
    num_workers: int = 0
    distributed: str = "ddp"          # ddp | fsdp (used when launched with torchrun)
    checkpoint_every: int = 0         # >0: also write last.pt every N steps
    keep_every_epochs: int = 0        # >0: keep checkpoint_epochNNNN.pt every N epochs
    log_every: int = 10               # steps between metrics.jsonl/TensorBoard records
    progress: bool = True             # tqdm progress bar
    tensorboard: bool = True

    def validate(self) -> None:
        choices = {"optimizer": ("adamw", "sgd"), "precision": ("fp32", "bf16", "fp16", "auto"),
                   "device": ("auto", "cpu", "cuda"), "distributed": ("ddp", "fsdp")}
        for k, ok in choices.items():
            if getattr(self, k) not in ok:
                raise ConfigError(f"{k}={getattr(self, k)!r}: must be one of {', '.join(ok)}")
        positive = ("epochs", "batch_size", "log_every")
        for k in positive:
            if not getattr(self, k) > 0:
                raise ConfigError(f"{k}={getattr(self, k)}: must be > 0")
        # (written "not >= 0" so that NaN fails too)
        for k in ("lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad", "max_steps",
                  "data_subset", "num_workers", "checkpoint_every", "keep_every_epochs"):
            if not getattr(self, k) >= 0:
                raise ConfigError(f"{k}={getattr(self, k)}: must be >= 0")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name}={v}: must be a finite number")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum}: must be in [0, 1) (SGD momentum, AdamW "
                              "beta1)")


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def convert_value(key: str, text: str, tp):
    """Convert the string ``text`` to type ``tp`` (a resolved annotation) or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(key, text, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {text!r}")
    if origin in (tuple, list):
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        elem = args[0] if args else str
        vals = [convert_value(key, p.strip(), elem) for p in parts]
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(vals):
            raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values")
        return tuple(vals) if origin is tuple else vals
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}={text!r}: expected a finite number")
        return value
    if tp is str:
        return text
    raise ConfigError(f"{key}: unsupported config type {tp}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override {it!r} is not of the form key=value")
        k, v = it.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise ConfigError(f"override {it!r} has an empty key")
        out[k] = v  # a key given twice: the last value wins (base overrides + specific ones)
    return out


def apply_overrides(configs: list, overrides: dict[str, str] | list[str]) -> list[str]:
    """Set ``key=value`` overrides on whichever of ``configs`` (dataclass instances, searched in
    order) has the key. Returns the keys set. Unknown keys raise a ConfigError listing every
    valid key."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    hints = [typing.get_type_hints(type(c)) for c in configs]
    done = []
    for k, v in overrides.items():
        for c, h in zip(configs, hints):
            if k in {f.name for f in fields(c)}:
                setattr(c, k, convert_value(k, v, h[k]) if isinstance(v, str) else v)
                done.append(k)
                break
        else:
            valid = sorted({f.name for c in configs for f in fields(c)})
            raise ConfigError(f"unknown config key {k!r}; valid keys: {', '.join(valid)}")
    return done


def config_to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d, default=list))


def config_from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        if k in names:
            kw[k] = tuple(v) if typing.get_origin(hints[k]) is tuple and v is not None else v
    return cls(**kw)


