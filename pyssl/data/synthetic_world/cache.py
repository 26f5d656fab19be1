"""Caching generated sequences to disk: one directory per sequence.

Layout::

    DIR/meta.json          format version, the WorldConfig, camera names, classes, frames,
                           "complete": true once every frame is written
    DIR/frame_000000.npz   one frame: the sample's arrays (labels / point_labels stored as
                           uint8), plus flow_fw + flow_fw_valid (to the next frame; absent
                           in the last frame) and flow_bw + flow_bw_valid (to the previous
                           frame; absent in the first)

Files are written atomically (temporary name, then rename); meta.json is rewritten with
``"complete": true`` last, so a half-written sequence is never read as a dataset.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .classes import class_table
from .config import WorldConfig

FORMAT_VERSION = 1
_UINT8_KEYS = ("labels", "point_labels")
_INT64_KEYS = ("labels", "point_labels", "timestamp", "frame")


def frame_path(root, frame: int) -> Path:
    return Path(root) / f"frame_{frame:06d}.npz"


def _write_npz(path: Path, arrays: dict, compress: bool):
    tmp = path.with_name(path.name + ".tmp.npz")
    (np.savez_compressed if compress else np.savez)(tmp, **arrays)
    os.replace(tmp, path)


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _to_numpy(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        a = v.numpy()
        if k in _UINT8_KEYS:
            a = a.astype(np.uint8)
        out[k] = a
    return out


def read_sequence_meta(root) -> dict:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no synthetic-world sequence at {root} (missing meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); regenerate the "
                         "sequence (pyssl data synth --overwrite)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a synthetic-world meta.json; regenerate the sequence")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}; regenerate the sequence")
    return meta


def generate_sequence(config: WorldConfig, out_dir, overwrite: bool = False,
                      compress: bool = True, progress=None, world=None) -> Path:
    """Renders every frame of ``config``'s sequence with flows and writes them to ``out_dir``.

    A complete sequence with the same config already there is a cache hit (returned as is);
    one with a different config raises FileExistsError unless ``overwrite``. ``progress``,
    if given, is called as ``progress(frame, frames, seconds_for_frame)``. Returns the path.
    """
    from .world import SyntheticWorld, make_pair

    out = Path(out_dir)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            if not overwrite:
                raise FileExistsError(f"{meta_path} cannot be read ({type(e).__name__}); pass "
                                      "overwrite=True (--overwrite) to regenerate the sequence"
                                      ) from None
            old = {}
        old = old if isinstance(old, dict) else {}
        same = old.get("config") == config.to_dict() and old.get("format_version") == FORMAT_VERSION
        if same and old.get("complete") and _frames_intact(out, config.frames):
            return out
        if not same and not overwrite:
            raise FileExistsError(f"{out} holds a different synthetic sequence; pass "
                                  f"overwrite=True (--overwrite) to replace it")
        # the same sequence, unfinished or with a frame file missing or cut off: rendered again
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("frame_*.npz"):
        stale.unlink()
    world = world if world is not None else SyntheticWorld(config)
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(),
            "camera_names": world.camera_names, "classes": class_table(),
            "frames": config.frames, "image_size": [config.height, config.width],
            "complete": False}
    _write_json(meta_path, meta)
    prev, prev_arrays = None, None
    for k in range(config.frames):
        t0 = time.perf_counter()
        cur = world.render(k, internals=True)
        arrays = _to_numpy(cur.sample)
        if prev is not None:
            pair = make_pair(world, prev, cur)
            prev_arrays["flow_fw"] = pair["flow_fw"].numpy()
            prev_arrays["flow_fw_valid"] = pair["flow_fw_valid"].numpy()
            arrays["flow_bw"] = pair["flow_bw"].numpy()
            arrays["flow_bw_valid"] = pair["flow_bw_valid"].numpy()
            _write_npz(frame_path(out, k - 1), prev_arrays, compress)
        prev, prev_arrays = cur, arrays
        if progress is not None:
            progress(k, config.frames, time.perf_counter() - t0)
    _write_npz(frame_path(out, config.frames - 1), prev_arrays, compress)
    meta["complete"] = True
    _write_json(meta_path, meta)
    return out


def _frames_intact(root: Path, frames: int) -> bool:
    """Every frame file is there and its zip directory reads (a file cut off by a crash or a
    full disk loses the directory at its end). The contents are not decompressed."""
    import zipfile

    for k in range(frames):
        try:
            with zipfile.ZipFile(frame_path(root, k)) as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile):
            return False
    return True


def load_frame(root, frame: int) -> dict:
    """One cached frame as a dict of tensors (the sample's keys and dtypes, plus whichever of
    flow_fw / flow_fw_valid / flow_bw / flow_bw_valid the frame has)."""
    import zipfile
    import zlib

    path = frame_path(root, frame)
    try:
        with np.load(path) as z:
            out = {}
            for k in z.files:
                t = torch.from_numpy(np.array(z[k]))
                if k in _INT64_KEYS:
                    t = t.to(torch.int64)
                out[k] = t
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); regenerate the "
                         "sequence (pyssl data synth --out ... --overwrite)") from None
    return out
