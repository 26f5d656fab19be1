import gzip
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pyssl.data.datasets import (DataError, DigitsDataset, FashionMNIST, ImageFolder, PhotoCrops,
                                 Subset, resolve_data)


def test_digits_splits():
    tr, te, al = DigitsDataset("train"), DigitsDataset("test"), DigitsDataset("all")
    assert (len(tr), len(te), len(al)) == (1297, 500, 1797)
    img, y = tr[0]
    assert img.dtype == torch.uint8 and img.shape == (1, 8, 8) and 0 <= y < 10
    assert int(img.max()) > 200 and tr.num_classes == 10
    with pytest.raises(DataError, match="split='val'"):
        DigitsDataset("val")


def _idx(path, arr, magic_type=0x08):
    header = bytes([0, 0, magic_type, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_in_a_user_folder(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28))
    labels = rng.integers(0, 10, 7)
    for prefix in ("train", "t10k"):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    ds = resolve_data(str(tmp_path), "test")
    assert isinstance(ds, FashionMNIST) and len(ds) == 7 and ds.classes[0] == "T-shirt/top"
    img, y = ds[3]
    assert img.shape == (1, 28, 28) and torch.equal(img[0], torch.from_numpy(imgs[3]).to(torch.uint8))
    assert y == labels[3]
    # a truncated file is reported, not mis-read
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 7, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        FashionMNIST("train", root=tmp_path)
    with pytest.raises(DataError, match="not found"):
        FashionMNIST("train", root=tmp_path / "empty")


def _png(path, value, size=(10, 12)):
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def test_image_folder_skips_and_counts_corrupt_images(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
    _png(tmp_path / "cat" / "a.png", 10)
    (tmp_path / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")      # corrupt
    _png(tmp_path / "dog" / "c.png", 200)
    good = (tmp_path / "dog" / "d.jpg")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:40])                                      # truncated
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        items = [ds[i] for i in range(len(ds))]
    assert len(ds.skipped) == 2
    assert [int(img[0, 0, 0]) for img, _ in items] == [10, 200, 200, 10]
    assert [y for _, y in items] == [0, 1, 1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # warned once per file only
        ds[1]
    with pytest.warns(RuntimeWarning, match="skipping"):
        gray = ImageFolder(tmp_path, channels=1, verify=True)
    assert len(gray) == 2 and gray[0][0].shape == (1, 10, 12)


def test_resolve_data_errors_name_the_argument(tmp_path):
    with pytest.raises(DataError, match="--data '/no/such/dir': no such path"):
        resolve_data("/no/such/dir")
    with pytest.raises(DataError, match="split must be"):
        resolve_data("digits", "val")
    with pytest.raises(DataError, match="torchvision dataset 'cifar10' not found"):
        resolve_data("cifar10", root=str(tmp_path))      # never downloads
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images with extensions"):
        resolve_data(str(tmp_path / "empty"))
    _png(tmp_path / "one.png", 3)
    with pytest.raises(DataError, match="one.png is a file: give an image folder"):
        resolve_data(str(tmp_path / "one.png"))
    with pytest.raises(DataError, match="PYSSL_DATA_ROOT or data_root=<folder>"):
        resolve_data("cifar10", root=str(tmp_path))


def test_subset_and_photos_are_deterministic():
    a, b = Subset(DigitsDataset(), 50, seed=3), Subset(DigitsDataset(), 50, seed=3)
    assert a.indices == b.indices and len(set(a.indices)) == 50
    c = Subset(a, indices=[0, 5])
    assert c.base is a.base and c.indices == [a.indices[0], a.indices[5]]
    p = PhotoCrops(length=10, size=16)
    x1, y1 = p[4]
    x2, _ = PhotoCrops(length=10, size=16)[4]
    assert x1.shape == (3, 16, 16) and y1 == -1 and torch.equal(x1, x2)
    assert not torch.equal(p[4][0], PhotoCrops("test", length=10, size=16)[4][0])


def test_an_image_folder_of_unreadable_files_is_refused_up_front(tmp_path):
    """Refused when the dataset is made, not by a loader worker in the middle of training."""
    (tmp_path / "cat").mkdir()
    for n in ("a.png", "b.jpg"):
        (tmp_path / "cat" / n).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        with pytest.raises(DataError, match=r"no readable image in .* \(2 files with image ext"):
            ImageFolder(tmp_path)


def _folder(root, counts):
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            _png(root / c / f"{i}.png", 10 * i % 256)


def test_an_image_folder_without_splits_is_split_80_20_per_class(tmp_path):
    """Evaluation used to test on the training images of a folder without train/ and val/.
    A file's split comes from a hash of its path: adding images never moves a training image
    into the test split (a seeded permutation per class did, for every later class)."""
    _folder(tmp_path, {"cat": 60, "dog": 5, "owl": 1})

    def split_paths(s):
        ds = resolve_data(str(tmp_path), s)
        return {ds.base.samples[i][0]: ds.base.samples[i][1] for i in ds.indices}

    train, test = split_paths("train"), split_paths("test")
    assert not set(train) & set(test) and len(train) + len(test) == 66
    assert len(resolve_data(str(tmp_path), "all")) == 66
    assert 6 <= sum(y == 0 for y in test.values()) <= 20               # about 20 % of 60
    assert 1 <= sum(y == 1 for y in test.values()) <= 2                # a small class: >= 1
    assert str(tmp_path / "owl" / "0.png") in train                    # one image: train
    assert resolve_data(str(tmp_path), "test", subset=2).indices[0] in \
        resolve_data(str(tmp_path), "test").indices
    for i in range(60, 90):                                            # more images later
        _png(tmp_path / "cat" / f"{i}.png", 1)
    assert set(train) <= set(split_paths("train")) and set(test) <= set(split_paths("test"))


def test_an_image_folder_with_one_split_refuses_the_other(tmp_path):
    _folder(tmp_path / "train", {"cat": 2})
    assert resolve_data(str(tmp_path), "train").classes == ["cat"]   # not ["train"]
    with pytest.raises(DataError, match="has no val/ or test/ sub-folder for the test split"):
        resolve_data(str(tmp_path), "test")
    _folder(tmp_path / "val", {"cat": 1})
    assert len(resolve_data(str(tmp_path), "test")) == 1
    _folder(tmp_path / "only" / "test", {"cat": 1})
    with pytest.raises(DataError, match="has no train/ sub-folder"):
        resolve_data(str(tmp_path / "only"), "train")
    _folder(tmp_path / "tiny", {"cat": 1})
    with pytest.raises(DataError, match="too small to hold out a test split"):
        resolve_data(str(tmp_path / "tiny"), "test")


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert('RGB') clips 16-bit and float pixels to 255: a 16-bit PNG came out almost
    white, a float TIFF in [0, 1] black. They are mapped by their type's range instead, and
    values without one are refused (skipped with a warning, as an unreadable file)."""
    (tmp_path / "a").mkdir()
    u16 = np.array([[0, 65535], [2570, 25700]], np.uint16)
    Image.fromarray(u16).save(tmp_path / "a" / "0.png")
    Image.fromarray(np.array([[0, 0.5], [1, 0.2]], np.float32)).save(tmp_path / "a" / "1.tif")
    Image.fromarray(np.array([[0, 200], [2570, 65535]], np.int32)).save(tmp_path / "a" / "2.tif")
    Image.fromarray(np.array([[0, 1.5], [1, 2]], np.float32)).save(tmp_path / "a" / "3.tif")
    Image.fromarray(np.array([[0, 70000], [1, 2]], np.int32)).save(tmp_path / "a" / "4.tif")
    Image.fromarray(np.array([[0, 200]], np.uint16)).save(tmp_path / "a" / "5.png")
    ds = ImageFolder(tmp_path)
    assert ds[0][0].tolist() == [[[0, 255], [10, 100]]] * 3
    assert ds[1][0][0].tolist() == [[0, 128], [255, 51]]
    assert ImageFolder(tmp_path, channels=1)[2][0].tolist() == [[[0, 1], [10, 255]]]
    # by the type, not by each image's values: a dark 16-bit image stays dark
    assert ds[5][0][0].tolist() == [[0, 1]]
    with pytest.warns(RuntimeWarning, match=r"float images are read as values in \[0, 1\]|"
                                            r"outside the 16-bit range") as caught:
        img, _ = ds[3]                          # 3 and 4 skipped: the next readable image
    assert torch.equal(img, ds[5][0]) and len(caught) == 2
    assert ds.skipped == {str(tmp_path / "a" / f"{i}.tif") for i in (3, 4)}


def test_broken_idx_files_are_refused_with_the_file_named(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (7, 28, 28))

    def write(labels, images=imgs):
        _idx(tmp_path / "train-images-idx3-ubyte.gz", images)
        _idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)

    write(np.arange(6) % 10)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz holds labels of shape \[6\];"
                                        r" train-images-idx3-ubyte.gz has 7 images"):
        FashionMNIST("train", root=tmp_path)
    write(np.array([0, 1, 2, 3, 4, 5, 12]))
    with pytest.raises(DataError, match="holds label 12; Fashion-MNIST labels are 0-9"):
        FashionMNIST("train", root=tmp_path)
    write(np.arange(7), images=rng.integers(0, 256, (7, 784)))
    with pytest.raises(DataError, match=r"shape \[7, 784\], not images"):
        FashionMNIST("train", root=tmp_path)
    write(np.arange(7))
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-50])                       # a cut-off download
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz cannot be read"):
        FashionMNIST("train", root=tmp_path)


def test_a_folder_of_images_without_classes_is_unlabelled_data(tmp_path):
    """SSL pretrains on unlabelled images: a folder of images side by side used to be refused
    ('no class sub-folders'); it is now an unlabelled dataset (label -1), not split."""
    from pyssl.engine.run import pretrain

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        _png(folder / f"{i:02d}.png", 10 * i, size=(20, 20))
    (folder / "notes.txt").write_text("not an image")
    ds = resolve_data(str(folder))
    assert ds.classes == [] and len(ds) == 20 and len(resolve_data(str(folder), "test")) == 20
    img, y = ds[3]
    assert y == -1 and img.shape == (3, 20, 20) and int(img[0, 0, 0]) == 30
    s = pretrain("rotnet", data=str(folder), epochs=1, out=tmp_path / "run",
                 overrides=["progress=false", "tensorboard=false", "batch_size=8",
                            "image_size=16", "backbone_width=4", "max_steps=2"])
    assert s["status"] == "finished" and s["step"] == 2


def test_tool_folders_are_not_classes_and_loose_images_beside_classes_warn(tmp_path):
    """A stray .ipynb_checkpoints or __MACOSX folder made a folder of images a one-class
    dataset (or 'holds no images'); images beside class folders were dropped silently."""
    flat = tmp_path / "flat"
    for d in (".ipynb_checkpoints", "__MACOSX", "@eaDir"):
        (flat / d).mkdir(parents=True)
        _png(flat / d / "x.png", 1)
    for i in range(3):
        _png(flat / f"{i}.png", 1)
    ds = ImageFolder(flat)
    assert ds.classes == [] and len(ds) == 3
    _folder(tmp_path / "mixed", {"cat": 2})
    _png(tmp_path / "mixed" / "stray.png", 1)
    with pytest.warns(RuntimeWarning, match="1 images beside the class folders are not used"):
        assert len(ImageFolder(tmp_path / "mixed")) == 2
