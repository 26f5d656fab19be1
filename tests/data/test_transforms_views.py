import numpy as np
import pytest
import skimage.color
import torch

from pyssl.data.color import lab_to_rgb, rgb_to_lab
from pyssl.data.datasets import DigitsDataset
from pyssl.data.transforms import (MultiCropTransform, input_spec, match_channels,
                                   multicrop_collate, preprocess)
from pyssl.data.views import EpochSampler, ViewDataset, mix_seed


def test_lab_matches_skimage_and_round_trips():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 9, 7, generator=g, dtype=torch.float64)
    rgb[0, :, 0, 0] = 0.0            # black and white and a dark pixel (linear branch)
    rgb[0, :, 0, 1] = 1.0
    rgb[0, :, 0, 2] = 0.01
    lab = rgb_to_lab(rgb)
    ref = skimage.color.rgb2lab(rgb.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(lab.permute(0, 2, 3, 1).numpy(), ref, atol=1e-4)
    torch.testing.assert_close(lab_to_rgb(lab), rgb, atol=1e-6, rtol=0)
    back = skimage.color.lab2rgb(ref)
    np.testing.assert_allclose(lab_to_rgb(lab).permute(0, 2, 3, 1).numpy(), back, atol=1e-4)
    f32 = rgb_to_lab(rgb.float())
    torch.testing.assert_close(f32.double(), lab, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_lab(torch.rand(1, 2, 4, 4))


def test_multicrop_shapes_and_crop_major_collate():
    t = MultiCropTransform(global_size=32, local_size=16, n_local=4, channels=3)
    img = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
    crops = t(img)
    assert len(crops) == 6
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert all(c.dtype == torch.float32 and c.min() >= -1 and c.max() <= 1 for c in crops)
    batch = multicrop_collate([t(img) for _ in range(5)])
    assert len(batch) == 6 and batch[0].shape == (5, 3, 32, 32) and batch[5].shape == (5, 3, 16, 16)
    gray = MultiCropTransform(32, 16, 2, channels=1)(img)     # RGB input -> 1-channel crops
    assert gray[0].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="n_global"):
        MultiCropTransform(n_global=0)


def test_preprocess_and_channels():
    img = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    x = preprocess(img, input_spec(16, 3))
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    rgb = match_channels(img, 3)
    assert torch.equal(match_channels(rgb, 1), img)
    lab = preprocess(img, input_spec(8, 1, mode="lab_l"))
    assert lab.shape == (1, 8, 8) and lab.min() >= -1 and lab.max() <= 1


def test_views_are_a_pure_function_of_seed_epoch_index():
    base = DigitsDataset()
    views = lambda img, y: (torch.rand(3), y)  # noqa: E731  (global RNG, as torchvision uses)
    ds = ViewDataset(base, views, seed=7)
    state = torch.get_rng_state()
    a = ds[5][0]
    assert torch.equal(torch.get_rng_state(), state)       # caller's RNG untouched
    assert torch.equal(ds[5][0], a)
    assert not torch.equal(ds[6][0], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a)
    assert mix_seed(7, 0, 5) != mix_seed(7, 5, 0)


def test_epoch_sampler_ranks_and_resume_offset():
    data = list(range(20))
    full = list(EpochSampler(data, 1, 0, seed=3))
    r0, r1 = list(EpochSampler(data, 2, 0, seed=3)), list(EpochSampler(data, 2, 1, seed=3))
    assert sorted(r0 + r1) == sorted(full) and r0 == full[0::2] and r1 == full[1::2]
    s = EpochSampler(data, 1, 0, seed=3)
    s.set_start(8)
    assert list(s) == full[8:] and len(s) == 12
    s.set_epoch(1)
    assert list(s) != full[8:]
