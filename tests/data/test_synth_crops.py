"""synth-crops: labelled colour crops of the synthetic driving world (tiny configurations:
64 x 128 camera images, 2 frames of one world seed per split, a few dozen crops)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyssl.data import synth_crops as sc
from pyssl.data.datasets import DataError, Subset, resolve_data
from pyssl.data.synthetic_world import SyntheticWorld, WorldConfig
from pyssl.data.synthetic_world.classes import CLASS_NAMES

CLASSES = ("road", "sidewalk", "building", "vegetation", "car")
TINY = dict(size=16, frames=2, frame_stride=10, camera_height=64, camera_width=128,
            scale=(1.0, 2.0), classes=CLASSES, progress=False)
SEEDS = {"train": (0,), "test": (100,)}
LENGTH = {"train": 72, "test": 36}      # 72 = 5 x 14 + 2: the remainder goes to 2 classes


def tiny(split, **kw):
    return sc.SynthCrops(split, **{**TINY, "seeds": SEEDS[split], "length": LENGTH[split], **kw})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyssl_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYSSL_DATA_ROOT", str(root))
        yield root


@pytest.fixture(scope="module")
def train(cache_root):
    return tiny("train")


@pytest.fixture(scope="module")
def test(cache_root):
    return tiny("test")


def test_shapes_dtypes_labels(train, test, cache_root):
    for ds, split in ((train, "train"), (test, "test")):
        assert len(ds) == LENGTH[split] and ds.channels == 3 and ds.name == "synth-crops"
        assert ds.classes == list(CLASSES) and ds.num_classes == 5
        img, y = ds[0]
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
        assert isinstance(y, int) and 0 <= y < 5
        labels = np.array(ds.labels())
        assert labels.min() >= 0 and labels.max() < 5
        # colour images: the channels differ
        assert (ds.images[:, 0].float() - ds.images[:, 2].float()).abs().mean() > 2
        assert ds.cache_path.parent == cache_root / "synth_crops" and ds.cache_path.exists()
    # label = world class of the centre pixel, remapped to the kept classes
    world_ids = np.array([CLASS_NAMES.index(c) for c in CLASSES])
    assert np.array_equal(world_ids[train.targets.numpy()], train.meta["world_class"])
    assert (train.meta["share"] >= 0.4).all() and (train.meta["share"] <= 1).all()
    assert set(np.unique(train.meta["side"])) <= set(train.sides)
    assert train.sides[0] == 16 and train.sides[-1] == 32


def test_class_balance(train, test):
    assert train.class_counts() == {"road": 15, "sidewalk": 15, "building": 14,
                                    "vegetation": 14, "car": 14}
    assert set(test.class_counts().values()) == {7, 8}


def test_crops_match_the_rendered_world(train):
    """Re-render the source frames: the centre pixel has the label, >= 40% of the window has
    it, and a crop cut at full resolution (side == size) is exactly that window."""
    m = train.meta
    cfg = WorldConfig(seed=0, frames=11, height=64, width=128, lidar_beams=1, lidar_azimuths=8)
    world = SyntheticWorld(cfg)
    frames = {f: world.render(f) for f in np.unique(m["frame"]).tolist()}
    exact = 0
    for i in range(len(train)):
        s = frames[int(m["frame"][i])]
        cam, r, c, side = (int(m[k][i]) for k in ("camera", "row", "col", "side"))
        lab = s["labels"][cam]
        assert int(lab[r, c]) == int(m["world_class"][i])
        y0, x0 = r - side // 2, c - side // 2
        assert y0 >= 0 and x0 >= 0 and y0 + side <= 64 and x0 + side <= 128
        win = lab[y0:y0 + side, x0:x0 + side]
        share = float((win == int(m["world_class"][i])).float().mean())
        assert share >= 0.4 and abs(share - float(m["share"][i])) < 1e-5
        crop = s["images"][cam][:, y0:y0 + side, x0:x0 + side]
        if side == 16:
            assert torch.equal(crop, train[i][0])
            exact += 1
        else:     # downscaled: the antialiased resize of the window
            ref = F.interpolate(crop[None].float(), size=(16, 16), mode="bilinear",
                                antialias=True).round()[0]
            assert (ref - train[i][0].float()).abs().max() <= 1
    assert exact > 0


def test_train_and_test_come_from_different_worlds(train, test):
    assert set(train.meta["world_seed"].tolist()) == {0}
    assert set(test.meta["world_seed"].tolist()) == {100}
    a = {bytes(x.numpy().tobytes()) for x in train.images}
    b = {bytes(x.numpy().tobytes()) for x in test.images}
    assert not a & b
    # no window is drawn twice (two windows can still hold equal pixels: a close-up of a
    # car's uniform paint)
    where = {tuple(int(train.meta[k][i]) for k in ("world_seed", "frame", "camera", "row", "col",
                                                    "side")) for i in range(len(train))}
    assert len(where) == len(train)


def test_deterministic(train, tmp_path):
    again = tiny("train", root=tmp_path)     # another cache folder: generated afresh
    assert not again.from_cache and again.cache_path != train.cache_path
    assert torch.equal(again.images, train.images) and torch.equal(again.targets, train.targets)
    for k in sc._META_KEYS:
        assert np.array_equal(again.meta[k], train.meta[k])
    other = tiny("train", root=tmp_path, seed=1)    # another crop seed: other crops
    assert not torch.equal(other.images, train.images)


def test_second_load_uses_the_cache(train, monkeypatch):
    class NoRender:
        def __init__(self, *a, **k):
            raise AssertionError("rendered although the crops are cached")

    monkeypatch.setattr(sc, "SyntheticWorld", NoRender)
    again = tiny("train")
    assert again.from_cache and again.cache_path == train.cache_path
    assert torch.equal(again.images, train.images) and torch.equal(again.targets, train.targets)
    with pytest.raises(AssertionError, match="rendered"):
        tiny("train", length=40)                  # other parameters: another cache entry
    assert not list(train.cache_path.parent.glob("*.tmp"))


@pytest.mark.parametrize("kw, match", [
    (dict(size=0), "size must be >= 1"),
    (dict(length=-5), "length must be >= 1"),
    (dict(length=0), "length must be >= 1"),
    (dict(frames=0), "frames must be >= 1"),
    (dict(size=2.5), "size must be an integer"),
    (dict(seeds=(-1,)), "seeds must be >= 0"),
    (dict(seeds=()), "seeds must be distinct"),
    (dict(min_share=0), "min_share must be in"),
    (dict(min_share=1.5), "min_share must be in"),
    (dict(scale=(0.5, 2)), "scale must satisfy"),
    (dict(scale=(3, 2)), "scale must satisfy"),
    (dict(classes=("road", "sky")), "classes must be"),
    (dict(classes=("road", "ignore")), "classes must be"),
    (dict(size=80), "does not fit"),
])
def test_bad_parameters_name_the_argument(kw, match, tmp_path):
    with pytest.raises(DataError, match=match):
        tiny("train", root=tmp_path, **kw)
    with pytest.raises(DataError, match="split='val'"):
        sc.SynthCrops("val")
    assert not (tmp_path / "synth_crops").exists()


def test_an_unusable_cache_root_is_refused_before_rendering(tmp_path, monkeypatch):
    """A root under a file failed with NotADirectoryError after the whole rendering."""
    monkeypatch.setattr(sc, "_generate", lambda *a: pytest.fail("rendered first"))
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match=r"cannot create the cache folder .*f/synth_crops"):
        tiny("train", root=tmp_path / "f")


def test_missing_class_is_a_clear_error(tmp_path):
    # no pedestrian fills 40% of a window in these two small frames
    with pytest.raises(DataError, match="no 'pedestrian' windows"):
        tiny("train", root=tmp_path, classes=("road", "pedestrian"))


def test_resolve_data_builtin_name(monkeypatch, tmp_path):
    made = []

    class Tiny(sc.SynthCrops):
        def __init__(self, split, size, root):
            made.append((split, size, root))
            super().__init__(split, **{**TINY, "size": size, "seeds": SEEDS[split],
                                       "length": LENGTH[split]}, root=tmp_path)

    monkeypatch.setattr(sc, "SynthCrops", Tiny)
    ds = resolve_data("synth-crops", "test")
    assert isinstance(ds, sc.SynthCrops) and len(ds) == 36 and made == [("test", 32, None)]
    sub = resolve_data("Synth_Crops", "train", subset=10, image_size=16, root="r")
    assert isinstance(sub, Subset) and len(sub) == 10 and sub.channels == 3
    assert sub.classes == list(CLASSES) and made[-1] == ("train", 16, "r")
    assert sub[0][0].shape == (3, 16, 16)
