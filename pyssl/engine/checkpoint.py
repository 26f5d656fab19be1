"""Checkpoints written atomically: ``torch.save`` to a temporary file in the same folder,
``fsync``, then ``os.replace`` onto the final name. A crash or kill at any moment leaves either
the previous complete file or the new complete file, never a half-written one.

Checkpoint format (a dict, ``format == "pyssl.checkpoint/1"``)::

    recipe        recipe name                  config        {"train": {...}, "recipe": {...}}
    model         recipe.state_dict()          optimizer     optimizer.state_dict()
    scaler        GradScaler state or None     step, epoch, batch_in_epoch (progress counters)
    rng           {"torch", "cuda", "numpy", "python"} states of rank 0 (numpy's as a tuple
                  with a tensor of keys, so that the file holds only tensors and containers)
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

__all__ = ["FORMAT", "atomic_save", "check_folder", "load_checkpoint", "make_folder", "rng_state",
           "set_rng_state"]

FORMAT = "pyssl.checkpoint/1"


def check_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check, before any work is done, that the output folder ``path`` can be created or written
    (nothing is created yet): a ConfigError naming ``option`` for a file in the way or a folder
    without write permission."""
    from .config import ConfigError

    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise ConfigError(f"{option} {path}: is not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable")
    return path


def make_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path.mkdir(parents=True, exist_ok=True)``, with a ConfigError naming ``option`` where
    the system refuses (a read-only file system, a permission check_folder cannot see)."""
    from .config import ConfigError

    path = check_folder(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot create the folder ({e.strerror or e})") from None
    return path


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


TRUST_ENV = "PYSSL_TRUSTED_CHECKPOINTS"


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a pyssl checkpoint (or a folder holding ``last.pt``); clear errors for a missing
    or foreign file.

    Loaded with ``torch.load(weights_only=True)``: tensors and plain containers only, so that a
    crafted file cannot run code (a pickle can). Checkpoints of older pyssl versions, which
    held numpy's RNG state as an array, load too (numpy arrays are rebuilt without running
    code). A file that needs anything else is refused with a message; set
    ``PYSSL_TRUSTED_CHECKPOINTS=1`` to load such files you trust in full."""
    import pickle

    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    trusted = _trusted()
    try:
        try:
            ck = torch.load(p, map_location=map_location, weights_only=not trusted)
        except pickle.UnpicklingError as e:
            if ("Unsupported global" not in str(e) or "numpy" not in str(e)
                    or not hasattr(torch.serialization, "safe_globals")):  # torch < 2.5
                raise
            try:
                with torch.serialization.safe_globals(_numpy_array_globals()):
                    ck = torch.load(p, map_location=map_location, weights_only=True)
            except (AttributeError, TypeError):  # torch 2.5: no (object, name) entries
                raise e from None
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class or function to import and call
            raise ValueError(
                f"checkpoint {p} holds Python objects other than tensors and containers, which "
                f"could run code when loaded; if you trust the file, set {TRUST_ENV}=1 to load "
                "it") from None
        raise ValueError(f"checkpoint {p} cannot be read ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {p} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{p} is not a pyssl checkpoint (expected format {FORMAT})")
    ck["path"] = str(p)
    return ck


def _trusted() -> bool:
    value = os.environ.get(TRUST_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on") or value.isdigit():  # "2" too, as before
        return True
    raise ValueError(f"{TRUST_ENV}={os.environ[TRUST_ENV]!r}: set it to 1 to load trusted "
                     "checkpoints in full, or to 0 (or leave it unset)")


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs, under the names numpy 1 and 2 pickle it with: the
    array rebuilder, ndarray, dtype and the dtype classes. None of them runs code of the
    file's choosing."""
    allowed: list = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((np.ndarray.__reduce__(np.zeros(1))[0], f"{module}._reconstruct"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"torch": torch.get_rng_state(),
         "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                   float(cached)),
         "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, *rest = s["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, *rest))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
