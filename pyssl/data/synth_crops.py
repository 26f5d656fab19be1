"""``synth-crops``: labelled colour crops of the procedural driving world.

Small RGB crops (``size`` x ``size``, default 32) cut from the camera images that
:class:`pyssl.data.synthetic_world.SyntheticWorld` renders, each labelled with the semantic
class of its centre pixel (the world's per-pixel labels). Colour data with labels: the
``colorization`` recipe can pretrain on it and be evaluated (linear probe, k-NN) on the same
kind of images.

How a split is made (deterministic from the parameters):

1. Every world seed of the split (train: 0-3, test: 100-101 by default, so test crops come
   from scenes never seen in training) is rendered at ``frames`` time steps ``frame_stride``
   frames (``frame_stride * 0.1`` s) apart, all 6 cameras, 224 x 448 pixels.
2. A crop is a square window of side ``S`` pixels of a camera image, resized (antialiased) to
   ``size``: ``S = size * f`` with the downscale factor ``f`` drawn from ``scale`` (default
   1 to 3, in 9 steps), so large objects fit in a crop and small ones keep their detail.
3. A window qualifies when it lies inside the image, its centre pixel's class is one of
   ``classes`` (sky / ignore is never one), and at least ``min_share`` (40%) of its pixels
   have that class, so the label describes the crop and not just its centre pixel.
4. Classes are balanced: each class gets ``length // len(classes)`` crops (the remainder goes
   to the first classes); within a class the factor is drawn uniformly among those with
   qualifying windows, then a window uniformly (without replacement) among all qualifying
   windows of that class and factor across the split's images. A class with fewer
   qualifying windows than its share gets all of them (with a warning).

The default classes are seven of the world's nine: road, sidewalk, terrain, building,
vegetation, car, truck. ``pedestrian`` and ``pole`` are left out as too rare: thin objects
that fill 40% of a window only when close and at ``f`` near 1; in the default train split
their qualifying 32 px windows lie in 21 and 11 of the 120 camera images (a handful of distinct
objects for ~2,900 crops each), while trucks, the rarest kept class, have them in 50 images
(train) and 24 of 60 (test). Pass ``classes=`` to include them anyway.

The arrays are cached in ``<root>/synth_crops/`` (``root``: the argument, else
``$PYSSL_DATA_ROOT``; without either ``~/.cache/pyssl/synth_crops/``), one npz per split and
parameter set, written atomically; a second construction with the same parameters loads the
npz and renders nothing. ``meta`` holds, per crop, where it came from (world seed, frame,
camera, centre row/column at full resolution, window side) and its label share.

Measured (2-core shared VM, ``OMP_NUM_THREADS=1``): the default train + test splits generate
in 28 s + 10 s (60 MiB + 12 MiB of npz; a reload takes ~0.1 s). Colour carries class
information: logistic regression on the crop's mean RGB scores 45.5% on test, on its mean gray
value 26.8% (chance 14.3%). Colorization pretrained 3 epochs on the train split (ResNet-10 w16,
5 min) gives 60.7% linear probe / 62.6% k-NN on the test split (4000 / 2000 crops), against
42.3% / 34.1% for the same encoder randomly initialised (both see only lightness L).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import DataError, _ArrayDataset
from .synthetic_world.classes import CLASS_NAMES
from .synthetic_world.config import WorldConfig
from .synthetic_world.world import SyntheticWorld

__all__ = ["SynthCrops", "DEFAULT_CLASSES", "cache_dir"]

DEFAULT_CLASSES = ("road", "sidewalk", "terrain", "building", "vegetation", "car", "truck")
DEFAULT_SEEDS = {"train": (0, 1, 2, 3), "test": (100, 101)}
DEFAULT_LENGTH = {"train": 20000, "test": 4000}
SCALE_STEPS = 9
_FORMAT = 1          # bump when the generation procedure changes (invalidates caches)
_META_KEYS = ("world_seed", "frame", "camera", "row", "col", "side", "share", "world_class")


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the npz files go: ``root/synth_crops``, else ``$PYSSL_DATA_ROOT/synth_crops``,
    else ``~/.cache/pyssl/synth_crops``."""
    root = root or os.environ.get("PYSSL_DATA_ROOT")
    if root:
        return Path(root).expanduser() / "synth_crops"
    return Path.home() / ".cache" / "pyssl" / "synth_crops"


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"synth-crops: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"synth-crops: {name} must be >= {minimum}, got {value}")
    return int(value)


class SynthCrops(_ArrayDataset):
    """Labelled ``size`` x ``size`` RGB crops of the synthetic driving world (see the module
    docstring). ``__getitem__`` -> ``(uint8 [3, size, size], label)`` with ``label`` indexing
    ``classes``. ``length`` defaults to 20000 (train) / 4000 (test), ``seeds`` (world seeds)
    to 0-3 (train) / 100-101 (test); ``seed`` seeds the choice of crops."""

    def __init__(self, split: str = "train", *, size: int = 32, length: int | None = None,
                 seeds: tuple[int, ...] | list[int] | None = None, frames: int = 5,
                 frame_stride: int = 10, min_share: float = 0.4,
                 scale: tuple[float, float] = (1.0, 3.0),
                 classes: tuple[str, ...] | list[str] = DEFAULT_CLASSES,
                 camera_height: int = 224, camera_width: int = 448, seed: int = 0,
                 root: str | os.PathLike | None = None, progress: bool | None = None):
        if split not in DEFAULT_SEEDS:
            raise DataError(f"synth-crops has splits 'train' and 'test'; got split={split!r}")
        size = _check_int("size", size, 1)
        length = _check_int("length", DEFAULT_LENGTH[split] if length is None else length, 1)
        frames = _check_int("frames", frames, 1)
        frame_stride = _check_int("frame_stride", frame_stride, 1)
        seed = _check_int("seed", seed, 0)
        camera_height = _check_int("camera_height", camera_height, 1)
        camera_width = _check_int("camera_width", camera_width, 1)
        seeds = DEFAULT_SEEDS[split] if seeds is None else seeds
        if isinstance(seeds, (int, np.integer)):
            seeds = (seeds,)
        seeds = tuple(_check_int("seeds", s, 0) for s in seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise DataError(f"synth-crops: seeds must be distinct world seeds, got {seeds!r}")
        if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) \
                or not 0.0 < min_share <= 1.0:
            raise DataError(f"synth-crops: min_share must be in (0, 1], got {min_share!r}")
        try:
            lo, hi = (float(s) for s in scale)
        except (TypeError, ValueError):
            raise DataError(f"synth-crops: scale must be (low, high), got {scale!r}") from None
        if not 1.0 <= lo <= hi:
            raise DataError(f"synth-crops: scale must satisfy 1 <= low <= high, got {scale!r}")
        if isinstance(classes, str):
            classes = (classes,)
        classes = tuple(classes)
        bad = [c for c in classes if c not in CLASS_NAMES or c == "ignore"]
        if not classes or bad or len(set(classes)) != len(classes):
            raise DataError(f"synth-crops: classes must be distinct names among "
                            f"{list(CLASS_NAMES[1:])}, got {list(classes)!r}")
        sides = sorted({int(round(size * f)) for f in np.linspace(lo, hi, SCALE_STEPS)})
        sides = [s for s in sides if s <= min(camera_height, camera_width)]
        if not sides:
            raise DataError(f"synth-crops: size {size} x scale {lo} = {round(size * lo)} px "
                            f"does not fit in a {camera_height} x {camera_width} camera image")

        self.split, self.size, self.seeds, self.sides = split, size, seeds, sides
        self.params = {
            "format": _FORMAT, "split": split, "size": size, "length": length,
            "seeds": list(seeds), "frames": frames, "frame_stride": frame_stride,
            "min_share": float(min_share), "sides": sides, "classes": list(classes),
            "camera_height": camera_height, "camera_width": camera_width, "seed": seed,
        }
        key = hashlib.sha1(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:16]
        self.cache_path = cache_dir(root) / f"{split}-{size}px-{length}-{key}.npz"
        self.from_cache = self.cache_path.exists()
        if self.from_cache:
            try:
                with np.load(self.cache_path) as z:
                    images, labels = z["images"], z["labels"]
                    meta = {k: z[k] for k in _META_KEYS}
            except Exception as e:  # noqa: BLE001  (corrupt cache: regenerate)
                warnings.warn(f"synth-crops: unreadable cache {self.cache_path} ({e}); "
                              "regenerating", RuntimeWarning, stacklevel=2)
                self.from_cache = False
        if not self.from_cache:
            _check_cache_folder(self.cache_path.parent)  # before the rendering, not after
            images, labels, meta = _generate(self.params, progress)
            _save_atomic(self.cache_path, images=images, labels=labels,
                         params=np.array(json.dumps(self.params)), **meta)
        self.meta = meta
        super().__init__(images, labels, list(classes), "synth-crops")

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.targets.numpy(), minlength=len(self.classes))
        return dict(zip(self.classes, counts.tolist()))


def _check_cache_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError as e:
        raise DataError(f"synth-crops: cannot create the cache folder {folder} "
                        f"({e.strerror or e}); give a writable root (data_root=, or "
                        "PYSSL_DATA_ROOT)") from None
    if not writable:
        raise DataError(f"synth-crops: the cache folder {folder} is not writable; give a "
                        "writable root (data_root=, or PYSSL_DATA_ROOT)")


def _save_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes it 0600; a cache is shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _render(params: dict, progress: bool | None):
    """All camera images of the split: uint8 images [N, 3, H, W], labels [N, H, W] and
    (world seed, frame, camera) per image."""
    from tqdm import tqdm

    frames, stride = params["frames"], params["frame_stride"]
    total = len(params["seeds"]) * frames
    images, labels, origin = [], [], []
    with tqdm(total=total, desc=f"synth-crops {params['split']}: rendering frames",
              unit="frame", disable=(None if progress is None else not progress),
              leave=False) as bar:
        for ws in params["seeds"]:
            # LiDAR is not used: one beam, 8 firings (the cameras do not depend on it)
            cfg = WorldConfig(seed=ws, frames=(frames - 1) * stride + 1,
                              height=params["camera_height"], width=params["camera_width"],
                              lidar_beams=1, lidar_azimuths=8)
            world = SyntheticWorld(cfg)
            for k in range(frames):
                s = world.render(k * stride)
                images.append(s["images"].numpy())
                labels.append(s["labels"].to(torch.uint8).numpy())
                origin += [(ws, k * stride, c) for c in range(s["images"].shape[0])]
                bar.update(1)
    return np.concatenate(images), np.concatenate(labels), np.array(origin, dtype=np.int64)


def _windows(label: torch.Tensor, integral: torch.Tensor, side: int, keep: torch.Tensor,
             min_share: float):
    """For windows of ``side`` px over one label map: the centre class [H-S+1, W-S+1] (window
    top-left indexed), the share of the window with that class, and whether it qualifies."""
    h, w = label.shape
    n_r, n_c = h - side + 1, w - side + 1
    ii = integral
    box = (ii[:, side:, side:] - ii[:, :n_r, side:] - ii[:, side:, :n_c] + ii[:, :n_r, :n_c])
    h0 = side // 2
    centre = label[h0:h0 + n_r, h0:h0 + n_c].long()
    own = box.gather(0, centre[None])[0]
    share = own.float() / (side * side)
    ok = keep[centre] & (own >= min_share * side * side - 1e-6)
    return centre, share, ok


def _integral(label: torch.Tensor, n: int) -> torch.Tensor:
    onehot = F.one_hot(label.long(), n).permute(2, 0, 1).to(torch.int32)
    ii = torch.zeros(n, label.shape[0] + 1, label.shape[1] + 1, dtype=torch.int32)
    ii[:, 1:, 1:] = onehot.cumsum(1).cumsum(2)
    return ii


def _generate(params: dict, progress: bool | None):
    images, labels, origin = _render(params, progress)
    n_world = len(CLASS_NAMES)
    class_ids = [CLASS_NAMES.index(c) for c in params["classes"]]
    keep = torch.zeros(n_world, dtype=torch.bool)
    keep[class_ids] = True
    sides, min_share = params["sides"], params["min_share"]
    n_img = len(images)

    # pass 1: qualifying windows per (image, side, class)
    counts = np.zeros((n_img, len(sides), n_world), dtype=np.int64)
    lab_t = torch.from_numpy(labels)
    for i in range(n_img):
        ii = _integral(lab_t[i], n_world)
        for si, s in enumerate(sides):
            centre, _, ok = _windows(lab_t[i], ii, s, keep, min_share)
            counts[i, si] = torch.bincount(centre[ok], minlength=n_world).numpy()

    # allocation: balanced classes, factor uniform among the viable ones
    rng = np.random.default_rng([params["seed"], 0x5C0, int(params["split"] == "test")])
    n_cls = len(class_ids)
    want = [params["length"] // n_cls + (k < params["length"] % n_cls) for k in range(n_cls)]
    picks: dict[tuple[int, int], list[int]] = {}       # (image, side idx) -> [(class, rank)]
    pool_tot = counts.sum(0)                          # [sides, classes]
    for k, c in enumerate(class_ids):
        pool = pool_tot[:, c]
        if pool.sum() == 0:
            raise DataError(f"synth-crops: no {params['classes'][k]!r} windows with >= "
                            f"{min_share:.0%} of that class in the {params['split']} split's "
                            "images; drop it from classes or render more frames")
        n = want[k]
        if pool.sum() < n:
            warnings.warn(f"synth-crops: only {pool.sum()} qualifying {params['classes'][k]!r} "
                          f"windows in the {params['split']} split for {n} wanted; taking all",
                          RuntimeWarning, stacklevel=3)
            n = int(pool.sum())
        viable = np.flatnonzero(pool > 0)
        alloc = np.bincount(rng.integers(len(viable), size=n), minlength=len(viable))
        alloc = np.minimum(alloc, pool[viable])
        while alloc.sum() < n:                         # overflow to sides with spare windows
            spare = np.flatnonzero(alloc < pool[viable])
            extra = np.bincount(rng.choice(spare, n - alloc.sum()), minlength=len(viable))
            alloc = np.minimum(alloc + extra, pool[viable])
        for si, m in zip(viable, alloc):
            if m == 0:
                continue
            ranks = np.sort(rng.choice(pool[si], size=m, replace=False))
            starts = np.cumsum(counts[:, si, c]) - counts[:, si, c]
            img_of = np.searchsorted(starts, ranks, side="right") - 1
            for r, img in zip(ranks, img_of):
                picks.setdefault((int(img), int(si)), []).append((c, int(r - starts[img])))

    # pass 2: cut the chosen windows
    out_img, out_lab = [], []
    meta = {k: [] for k in _META_KEYS}
    remap = {c: k for k, c in enumerate(class_ids)}
    size = params["size"]
    for img in sorted({i for i, _ in picks}):
        ii = _integral(lab_t[img], n_world)
        picture = torch.from_numpy(images[img])
        for si, s in enumerate(sides):
            sel = picks.get((img, si))
            if not sel:
                continue
            centre, share, ok = _windows(lab_t[img], ii, s, keep, min_share)
            crops, where = [], {}
            for c, r in sel:
                if c not in where:
                    where[c] = torch.nonzero(ok & (centre == c))
                y, x = (int(v) for v in where[c][r])
                crops.append(picture[:, y:y + s, x:x + s])
                out_lab.append(remap[c])
                for k, v in zip(_META_KEYS, (origin[img][0], origin[img][1], origin[img][2],
                                             y + s // 2, x + s // 2, s, float(share[y, x]), c)):
                    meta[k].append(v)
            batch = torch.stack(crops)
            if s != size:
                batch = F.interpolate(batch.float(), size=(size, size), mode="bilinear",
                                      antialias=True, align_corners=False)
                batch = batch.round().clamp(0, 255).to(torch.uint8)
            out_img.append(batch.permute(0, 2, 3, 1).numpy())
    images_out = np.concatenate(out_img)
    labels_out = np.array(out_lab, dtype=np.int64)
    order = rng.permutation(len(labels_out))
    meta_out = {k: np.asarray(v, dtype=np.float32 if k == "share" else np.int64)[order]
                for k, v in meta.items()}
    return np.ascontiguousarray(images_out[order]), labels_out[order], meta_out
