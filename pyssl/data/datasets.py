"""Datasets that yield ``(image, label)`` with ``image`` a ``uint8`` tensor ``[C, H, W]`` and
``label`` an ``int`` (``-1`` when the data has no labels).

* :class:`ImageFolder`: ImageNet-style ``root/<class>/<image>`` folders (optionally with
  ``train/`` and ``val/`` sub-folders; without them, an 80/20 split per class), or a folder
  of images without classes (unlabelled); unreadable or corrupt images are skipped with one
  warning and counted (``.skipped``), never a crash mid-epoch.
* :class:`DigitsDataset`: scikit-learn's 8x8 digits (1797 images; always available offline).
* :class:`FashionMNIST`: the gzip idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``) or any folder holding them, parsed with numpy.
* :class:`PhotoCrops`: deterministic random crops of the colour photos that ship inside
  scikit-image and scikit-learn (unlabelled; the colour data that colorization needs).
* :class:`~pyssl.data.synth_crops.SynthCrops` (``synth-crops``): labelled colour crops of the
  procedural driving world (generated once, then cached under ``$PYSSL_DATA_ROOT``).
* :class:`TorchvisionDataset`: any torchvision classification dataset already on disk.

:func:`resolve_data` maps a ``--data`` argument (a name or a path) to one of them.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["BUILTIN_DATASETS", "DataError", "DigitsDataset", "FashionMNIST", "ImageDataset",
           "ImageFolder", "PhotoCrops", "Subset", "TorchvisionDataset", "resolve_data",
           "FASHION_MNIST_DIRS"]

FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A ``--data`` argument that cannot be resolved (missing path, unknown name, bad split)."""


class ImageDataset(Dataset):
    """Base class: ``__getitem__`` -> ``(uint8 [C, H, W] tensor, int label)``."""

    channels: int = 3
    classes: list[str] = []
    name: str = "dataset"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels(self) -> list[int]:
        return [int(self[i][1]) for i in range(len(self))]


class _ArrayDataset(ImageDataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str):
        # images: uint8 [N, H, W] or [N, H, W, C]
        if images.ndim == 3:
            images = images[:, None]
        else:
            images = images.transpose(0, 3, 1, 2)
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8, order="C"))
        self.targets = torch.as_tensor(labels, dtype=torch.long)
        self.classes = classes
        self.channels = self.images.shape[1]
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.targets[i])

    def labels(self) -> list[int]:
        return self.targets.tolist()


class DigitsDataset(_ArrayDataset):
    """scikit-learn's handwritten digits (8x8, values 0-16 scaled to 0-255). There is no
    official split: the first 1297 images (fixed shuffle, seed 0) are ``train``, the other 500
    ``test``; ``split="all"`` gives all 1797."""

    def __init__(self, split: str = "train"):
        from sklearn.datasets import load_digits

        d = load_digits()
        imgs = np.clip(d.images * 16, 0, 255).astype(np.uint8)
        order = np.random.default_rng(0).permutation(len(imgs))
        sel = {"train": order[:1297], "test": order[1297:], "all": order}
        if split not in sel:
            raise DataError(f"digits has splits 'train', 'test', 'all'; got split={split!r}")
        idx = np.sort(sel[split])
        super().__init__(imgs[idx], d.target[idx], [str(i) for i in range(10)], "digits")


def _read_idx(path: Path) -> np.ndarray:
    import zlib

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip, unreadable file
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {arr.size} values (truncated?)")
    return arr.reshape(dims)


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding Fashion-MNIST's idx files: ``root`` (or ``root/FashionMNIST/raw``),
    else ``$PYSSL_FASHION_MNIST``, else the Debian package's folder; None if absent."""
    cands = [root] if root is not None else [os.environ.get("PYSSL_FASHION_MNIST"),
                                              *FASHION_MNIST_DIRS]
    for c in cands:
        if not c:
            continue
        for d in (Path(c), Path(c) / "FashionMNIST" / "raw"):
            if any((d / f"train-images-idx3-ubyte{s}").exists() for s in (".gz", "")):
                return d
    return None


class FashionMNIST(_ArrayDataset):
    """Fashion-MNIST (Xiao et al. 2017): 60k train / 10k test, 28x28 grayscale, 10 classes."""

    CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None):
        d = find_fashion_mnist(root)
        if d is None:
            where = str(root) if root else " or ".join(FASHION_MNIST_DIRS)
            raise DataError(f"Fashion-MNIST idx files not found in {where}; install them with "
                            "`apt-get install dataset-fashion-mnist` or pass --data <folder "
                            "holding train-images-idx3-ubyte.gz>")
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise DataError(f"fashion-mnist has splits 'train' and 'test'; got split={split!r}")

        def f(kind):
            p = d / f"{prefix}-{kind}"
            return p.with_name(p.name + ".gz") if p.with_name(p.name + ".gz").exists() else p

        ip, lp = f("images-idx3-ubyte"), f("labels-idx1-ubyte")
        imgs, labels = _read_idx(ip), _read_idx(lp)
        if imgs.ndim != 3:
            raise DataError(f"{ip} holds an array of shape {list(imgs.shape)}, not images [N, H, W]")
        if labels.ndim != 1 or len(labels) != len(imgs):
            raise DataError(f"{lp} holds labels of shape {list(labels.shape)}; {ip.name} has "
                            f"{len(imgs)} images, so [{len(imgs)}] was expected")
        if len(labels) and labels.max() >= len(self.CLASSES):
            raise DataError(f"{lp} holds label {int(labels.max())}; Fashion-MNIST labels are 0-9")
        super().__init__(imgs, labels.astype(np.int64), list(self.CLASSES), "fashion-mnist")


def _load_photos() -> list[tuple[str, np.ndarray]]:
    out = []
    try:
        import skimage.data as sd

        for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                  "retina", "hubble_deep_field"):
            try:
                im = getattr(sd, n)()
                if im.ndim == 3 and im.shape[2] == 3:
                    out.append((n, im))
            except Exception:  # noqa: BLE001  (an image that needs a download is skipped)
                pass
        try:
            left, right, _ = sd.stereo_motorcycle()
            out += [("motorcycle_left", left), ("motorcycle_right", right)]
        except Exception:  # noqa: BLE001
            pass
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        s = load_sample_images()
        out += list(zip([Path(f).stem for f in s.filenames], s.images))
    except Exception:  # noqa: BLE001
        pass
    return out


class PhotoCrops(ImageDataset):
    """``length`` colour crops (``size`` x ``size``) of the photos shipped with scikit-image and
    scikit-learn; crop ``i`` is a fixed function of ``(seed, i)``: a random photo, a random
    square of 1/16 to 1/2 of its shorter side, resized. Unlabelled (label ``-1``). The
    ``test`` split uses another seed."""

    def __init__(self, split: str = "train", length: int = 20000, size: int = 32,
                 seed: int = 0):
        photos = _load_photos()
        if not photos:
            raise DataError("no colour photos found (needs scikit-image or scikit-learn)")
        self.photos = [torch.from_numpy(np.array(p, dtype=np.uint8)).permute(2, 0, 1)
                       for _, p in photos]
        self.photo_names = [n for n, _ in photos]
        self.length, self.size = length, size
        self.seed = seed + (0 if split == "train" else 1_000_003)
        self.channels, self.classes, self.name = 3, [], "photos"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        import torchvision.transforms.v2.functional as TF

        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        p = self.photos[rng.integers(len(self.photos))]
        h, w = p.shape[1:]
        s = int(min(h, w) * rng.uniform(1 / 16, 1 / 2))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = p[:, y:y + s, x:x + s]
        return TF.resize(crop, [self.size, self.size], antialias=True), -1


def _wide_gray_to_uint8(a: np.ndarray) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grayscale image to 8 bits, by the range its type
    implies, the same for every image of a dataset (a scale guessed from each image's values
    would make a dark image brighter than a lighter one): 16-bit and 32-bit integers are
    16-bit data (/257), floats are in [0, 1] (x255). Values outside that range are refused."""
    if a.dtype.kind in "ui":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return np.round(a / 257).astype(np.uint8)
        raise ValueError(f"{a.dtype} pixel values in [{lo}, {hi}]: outside the 16-bit range "
                         "[0, 65535] that integer images wider than 8 bits are read with")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError("float pixel values that are NaN or infinite")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            return np.round(a * 255).astype(np.uint8)
        raise ValueError(f"float pixel values in [{lo:g}, {hi:g}]: float images are read as "
                         "values in [0, 1]")
    raise ValueError(f"pixels of dtype {a.dtype}: not an image type PIL gives")


class ImageFolder(ImageDataset):
    """``root/<class>/**/<image>`` (ImageNet layout), or ``root/<image>`` for unlabelled
    images (no classes, label ``-1``). Images are decoded with PIL on access
    and converted to RGB (``channels=3``) or L (``channels=1``). Unreadable files are skipped:
    ``__getitem__`` returns the next readable image, warns once per file, and counts them in
    ``skipped`` (a set of paths). ``verify=True`` checks every file up front instead."""

    def __init__(self, root: str | os.PathLike, channels: int = 3, verify: bool = False):
        root = Path(root)
        if root.is_file():
            raise DataError(f"{root} is a file: give an image folder (root/<class>/<image>), a "
                            "captions file (.jsonl, .csv, .tsv) or a dataset name")
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        # not classes: hidden folders and those that tools leave (.ipynb_checkpoints, __MACOSX,
        # a NAS's @eaDir)
        classes = sorted(d.name for d in root.iterdir()
                         if d.is_dir() and not d.name.startswith((".", "__", "@")))
        self.samples: list[tuple[str, int]] = []
        for ci, c in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(root / c)):
                for fn in sorted(files):
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, fn), ci))
        loose = [str(f) for f in sorted(root.iterdir())
                 if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples and loose:  # images side by side: unlabelled (label -1)
            classes, self.samples = [], [(f, -1) for f in loose]
        elif loose:
            warnings.warn(f"{root}: {len(loose)} images beside the class folders are not used "
                          "(they have no class)", RuntimeWarning, stacklevel=2)
        if not self.samples:
            raise DataError(f"{root} holds no images with extensions {IMAGE_EXTENSIONS} "
                            "(expected root/<class>/<image>, or unlabelled root/<image>)")
        self.root, self.classes, self.channels, self.name = root, classes, channels, root.name
        self.skipped: set[str] = set()
        if verify:
            self.samples = [s for s in self.samples if self._load(s[0]) is not None]
        elif not any(self._load(s[0]) is not None for s in self.samples):
            self.samples = []  # stops at the first readable image: usually the first file
        if not self.samples:  # refused here, not in a loader worker in the middle of training
            raise DataError(f"no readable image in {root} ({len(self.skipped)} files with "
                            f"image extensions, none of which could be read)")

    def _load(self, path: str) -> torch.Tensor | None:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if im.mode.startswith(("I", "F")):  # 16/32-bit: convert() would clip to 255
                    arr = _wide_gray_to_uint8(np.asarray(im))
                    arr = np.repeat(arr[..., None], 3, -1) if self.channels == 3 else arr
                else:
                    im = im.convert("RGB" if self.channels == 3 else "L")
                    arr = np.asarray(im, dtype=np.uint8).copy()
        except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
            if path not in self.skipped:
                self.skipped.add(path)
                warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e} "
                              f"({len(self.skipped)} skipped so far)", RuntimeWarning,
                              stacklevel=3)
            return None
        t = torch.from_numpy(arr)
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(i + k) % n]
            img = self._load(path)
            if img is not None:
                return img, label
        raise DataError(f"no readable image in {self.root}")

    def labels(self) -> list[int]:
        return [s[1] for s in self.samples]


class TorchvisionDataset(ImageDataset):
    """A torchvision dataset already on disk under ``root`` (``download=False`` unless
    ``download=True`` is passed; machines without internet cannot download)."""

    NAMES = {"mnist": "MNIST", "kmnist": "KMNIST", "cifar10": "CIFAR10",
             "cifar100": "CIFAR100", "stl10": "STL10", "svhn": "SVHN"}

    def __init__(self, name: str, split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = False):
        import torchvision.datasets as tvd

        root = root or os.environ.get("PYSSL_DATA_ROOT", "data")
        cls = getattr(tvd, self.NAMES[name])
        kw = ({"split": {"train": "train", "test": "test"}[split]} if name in ("stl10", "svhn")
              else {"train": split == "train"})
        try:
            self.ds = cls(root=str(root), download=download, **kw)
        except (RuntimeError, OSError) as e:
            raise DataError(f"torchvision dataset {name!r} not found under {root} ({e}); set "
                            "PYSSL_DATA_ROOT or data_root=<folder>") from None
        self.classes = list(getattr(self.ds, "classes", []))
        first = self._convert(self.ds[0][0])
        self.channels, self.name = first.shape[0], name

    @staticmethod
    def _convert(img) -> torch.Tensor:
        a = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(a.copy())
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, label = self.ds[i]
        return self._convert(img), int(label)


class Subset(ImageDataset):
    """The first ``n`` items of a fixed (seeded) permutation of ``base`` (in index order), or
    the given ``indices``. A subset of a subset indexes the original dataset."""

    def __init__(self, base: ImageDataset, n: int = 0, seed: int = 0,
                 indices: list[int] | None = None):
        if indices is None:
            if n <= 0:
                raise DataError(f"subset size must be positive, got {n}")
            g = torch.Generator().manual_seed(seed)
            indices = torch.randperm(len(base), generator=g)[:n].sort().values.tolist()
        if isinstance(base, Subset):
            indices = [base.indices[i] for i in indices]
            base = base.base
        self.base = base
        self.indices = list(indices)
        self.channels, self.classes, self.name = base.channels, base.classes, base.name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def labels(self) -> list[int]:
        if hasattr(self.base, "targets"):
            return self.base.targets[self.indices].tolist()
        if isinstance(self.base, ImageFolder):  # labels without decoding the images
            return [self.base.samples[i][1] for i in self.indices]
        return super().labels()


HELD_OUT_FRACTION = 0.2   # of each class, for an image folder without train/ and val/ (test/)


def _image_folder_split(path: Path, split: str) -> ImageDataset:
    """``path/train`` and ``path/val`` (or ``path/test``) for the splits when present. A folder
    without them is split per class: a file is in the test split when a number drawn from its
    path relative to ``path`` (a hash) is below ``HELD_OUT_FRACTION``, and a class of two
    images or more with none drawn keeps its lowest one out. A file's split depends on its own
    path alone, so adding images does not move a training image into the test split, and
    evaluation does not test on images a run was pretrained on."""
    held = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
    train = path / "train" if (path / "train").is_dir() else None
    if train is not None or held is not None:
        if split == "all":
            raise DataError(f"{path} has train/ and val/ (or test/) splits: choose one")
        folder = train if split == "train" else held
        if folder is None:
            missing = "train/" if split == "train" else "val/ or test/"
            raise DataError(f"image folder {path} has no {missing} sub-folder for the {split} "
                            "split (give a folder with both, or one with the class folders "
                            "alone, which is split 80/20)")
        return ImageFolder(folder)
    ds = ImageFolder(path)
    if split == "all" or not ds.classes:  # unlabelled: nothing to evaluate, pretrain on all
        return ds
    import hashlib

    def draw(i: int) -> float:  # a fixed number in [0, 1) per file, from its relative path
        rel = os.path.relpath(ds.samples[i][0], path).replace(os.sep, "/")
        return int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big") / 2 ** 64

    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(ds.samples):
        by_class.setdefault(label, []).append(i)
    keep = []
    for _, idx in sorted(by_class.items()):
        u = {i: draw(i) for i in idx}
        test = {i for i in idx if u[i] < HELD_OUT_FRACTION}
        if not test and len(idx) >= 2:  # a small class keeps one image out all the same
            test = {min(idx, key=u.__getitem__)}
        keep += [i for i in idx if (i in test) == (split == "test")]
    if not keep:
        raise DataError(f"image folder {path} is too small to hold out a test split (a class "
                        "needs two images or more)")
    return Subset(ds, indices=sorted(keep))


BUILTIN_DATASETS = {
    "digits": "scikit-learn handwritten digits, 8x8 grayscale, 10 classes (always available)",
    "fashion-mnist": "Fashion-MNIST, 28x28 grayscale, 10 classes (Debian dataset-fashion-mnist)",
    "photos": "colour crops of the photos shipped with scikit-image/scikit-learn (unlabelled)",
    "synth-crops": "32x32 colour crops of the synthetic driving world, 7 classes (road, ..., "
                   "truck); train/test from different scenes; rendered once (~40 s), cached",
    **{k: f"torchvision {v} (if on disk under PYSSL_DATA_ROOT)"
       for k, v in TorchvisionDataset.NAMES.items()},
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "fmnist": "fashion-mnist", "synth_crops": "synth-crops", "synthcrops": "synth-crops"}


def resolve_data(data: str, split: str = "train", *, subset: int = 0, seed: int = 0,
                 root: str | None = None, image_size: int = 32) -> ImageDataset:
    """``data``: a built-in name (see ``BUILTIN_DATASETS``) or a path: a folder with
    Fashion-MNIST idx files, a captions file (``.jsonl``/``.csv``/``.tsv``, see
    :mod:`pyssl.data.captions`), or an image folder (``<path>/train`` and ``<path>/val`` are used
    for the splits when present; a folder without them is split 80/20 per class, see
    :func:`_image_folder_split`). ``subset`` > 0 keeps a fixed random subset of that size."""
    if not isinstance(data, str) or not data:
        raise DataError(f"--data must be a dataset name or a path, got {data!r}")
    if split not in ("train", "test", "all"):
        raise DataError(f"split must be 'train', 'test' or 'all', got {split!r}")
    key = _ALIASES.get(data.lower(), data.lower())
    if key == "digits":
        ds: ImageDataset = DigitsDataset(split)
    elif key == "fashion-mnist":
        ds = FashionMNIST("test" if split == "test" else "train")
    elif key == "photos":
        ds = PhotoCrops(split, size=image_size, seed=seed)
    elif key == "synth-crops":
        from .synth_crops import SynthCrops

        ds = SynthCrops("test" if split == "test" else "train", size=image_size, root=root)
    elif key in TorchvisionDataset.NAMES:
        ds = TorchvisionDataset(key, "test" if split == "test" else "train", root)
    else:
        p = Path(data).expanduser()
        if not p.exists():
            raise DataError(f"--data {data!r}: no such path and not a built-in dataset "
                            f"(built-in: {', '.join(BUILTIN_DATASETS)})")
        if p.is_file() and p.suffix.lower() in (".jsonl", ".csv", ".tsv"):
            from .captions import ImageTextDataset   # images with captions (image-text recipes)

            ds = ImageTextDataset(p)
        elif find_fashion_mnist(p) is not None:
            ds = FashionMNIST("test" if split == "test" else "train", root=p)
        else:
            ds = _image_folder_split(p, split)
    if subset and subset < len(ds):
        ds = Subset(ds, subset, seed)
    return ds
