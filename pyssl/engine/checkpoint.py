"""Checkpoints written atomically: ``torch.save`` to a temporary file in the same folder,
``fsync``, then ``os.replace`` onto the final name. A crash or kill at any moment leaves either
the previous complete file or the new complete file, never a half-written one.

Checkpoint format (a dict, ``format == "pyssl.checkpoint/1"``)::

    recipe        recipe name                  config        {"train": {...}, "recipe": {...}}
    model         recipe.state_dict()          optimizer     optimizer.state_dict()
    scaler        GradScaler state or None     step, epoch, batch_in_epoch (progress counters)
    rng           {"torch", "cuda", "numpy", "python"} states of rank 0
    encoder       {"spec": {"backbone": {name, in_chans, image_size, kwargs},
                            "input": {image_size, channels, mode, ...}, "feature": "pooled"},
                   "state_dict": encoder weights}     <- all that evaluation reads
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["FORMAT", "atomic_save", "load_checkpoint", "rng_state", "set_rng_state"]

FORMAT = "pyssl.checkpoint/1"


def atomic_save(obj, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a pyssl checkpoint (or a folder holding ``last.pt``); clear errors for a missing
    or foreign file."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        ck = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {p} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{p} is not a pyssl checkpoint (expected format {FORMAT})")
    ck["path"] = str(p)
    return ck


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
         "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
