import numpy as np
import pytest
import torch

from pyssl.data.datasets import DigitsDataset, Subset
from pyssl.data.views import ViewDataset
from pyssl.engine import ConfigError, StepContext
from pyssl.engine.run import build_configs
from pyssl.recipes import RECIPES, get_recipe
from pyssl.recipes.colorization import ab_bins, rebalance_weights, soft_encode
from pyssl.recipes.inpainting import border_weights, hole_mask
from pyssl.recipes.jigsaw import cut_tiles, maximal_hamming_permutations
from pyssl.recipes.relative_patch import NEIGHBOURS, patch_pair
from pyssl.recipes.rotnet import rotate_four

SMALL = {"backbone_width": "4"}
CLASSIC = ["rotnet", "relative_patch", "jigsaw", "inpainting", "colorization"]


def _recipe(name, channels=1, **over):
    cls, _, cfg = build_configs(name, {**SMALL, **{k: str(v) for k, v in over.items()}})
    torch.manual_seed(0)
    return cls(cfg, channels)


def test_registry():
    assert set(CLASSIC) <= set(RECIPES)       # the modern ones: tests/recipes/test_modern_*
    for cls in RECIPES.values():
        assert cls.description and cls.paper and cls.small_scale
    assert get_recipe("relative-patch").name == "relative_patch"
    with pytest.raises(ValueError, match="valid recipes: .*colorization, dino, .*inpainting"):
        get_recipe("simclr2")


def test_rotnet_views_hold_all_four_rotations():
    img = torch.arange(16.0).reshape(1, 4, 4)
    rots, labels = rotate_four(img)
    assert labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(rots[0], img)
    assert rots[1][0, 0, 0] == img[0, 0, 3]            # 90 degrees counter-clockwise
    assert torch.equal(rots[2], img.flip(-1).flip(-2))
    assert torch.equal(torch.rot90(rots[3], 1, (-2, -1)), img)
    r = _recipe("rotnet", image_size=16)
    x, y = r.views(torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8), 3)
    assert x.shape == (4, 1, 16, 16) and y.tolist() == [0, 1, 2, 3]
    for k in range(4):
        assert torch.equal(x[k], torch.rot90(x[0], k, (-2, -1)))


@pytest.mark.parametrize("label", range(8))
def test_relative_patch_geometry(label):
    patch, gap, jitter = 6, 5, 2
    cell = patch + gap
    size = 3 * cell
    img = torch.arange(size * size * 1.0).reshape(1, size, size)
    a, b, offs = patch_pair(img, label, patch, gap, jitter)
    (ya, xa), (yb, xb) = offs.tolist()
    assert torch.equal(a, img[:, ya:ya + patch, xa:xa + patch])
    assert torch.equal(b, img[:, yb:yb + patch, xb:xb + patch])
    dr, dc = NEIGHBOURS[label]
    assert abs((yb - ya) - dr * cell) <= 2 * jitter and abs((xb - xa) - dc * cell) <= 2 * jitter
    # the gap guarantees the patches never touch
    sep_y = abs(yb - ya) - patch if dr else -1
    sep_x = abs(xb - xa) - patch if dc else -1
    assert max(sep_y, sep_x) >= gap - 2 * jitter
    assert 0 <= min(ya, xa, yb, xb) and max(ya, xa, yb, xb) + patch <= size


def test_relative_patch_views_and_colour_dropping():
    r = _recipe("relative_patch")
    a, b, y = r.views(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8), 0)
    assert a.shape == b.shape == (3, 10, 10) and 0 <= int(y) < 8
    with pytest.raises(ConfigError, match="gap > 2 \\* jitter"):
        _recipe("relative_patch", gap=2, jitter=2)


def test_jigsaw_permutation_set():
    p = maximal_hamming_permutations(30)
    assert p.shape == (30, 9) and (np.sort(p, 1) == np.arange(9)).all()
    assert (p[0] == np.arange(9)).all()
    assert len({tuple(r) for r in p}) == 30
    d = (p[:, None] != p[None]).sum(-1) + 99 * np.eye(30, dtype=int)
    assert d.min() >= 7                                     # far apart
    assert np.array_equal(p, maximal_hamming_permutations(30))   # deterministic
    with pytest.raises(ValueError, match="n must be"):
        maximal_hamming_permutations(0)


def test_jigsaw_views_apply_a_recoverable_permutation():
    r = _recipe("jigsaw", num_permutations=20, tile_size=4, gap=0, flip="false")
    img = torch.randint(0, 256, (1, 12, 12), dtype=torch.uint8)
    tiles_ref = cut_tiles(img.float() / 127.5 - 1, 4, 0, random_offset=False)
    tiles_ref = (tiles_ref - tiles_ref.mean((1, 2, 3), keepdim=True)) / \
        tiles_ref.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-2)
    for seed in range(5):
        torch.manual_seed(seed)
        shuffled, k = r.views(img, 0)
        perm = r.permutations[int(k)]
        torch.testing.assert_close(shuffled, tiles_ref[perm])           # shuffled[i] = tiles[perm[i]]
        torch.testing.assert_close(shuffled[torch.argsort(perm)], tiles_ref)   # recoverable
        assert torch.allclose(shuffled.mean((1, 2, 3)), torch.zeros(9), atol=1e-5)  # per-tile norm
    with pytest.raises(ConfigError, match="num_permutations=0"):
        _recipe("jigsaw", num_permutations=0)


def test_inpainting_mask_and_weights():
    m = hole_mask(8, 4)
    assert m.sum() == 16 and m[2:6, 2:6].all()
    w = border_weights(m, 1, 10.0)
    assert w[~m].sum() == 0 and w[3:5, 3:5].eq(1).all() and w[2, 2:6].eq(10).all()
    r = _recipe("inpainting", image_size=16, mask="central")
    x, mask = r.views(torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8), 0)
    assert x.shape == (1, 16, 16) and mask.sum() == 64 and mask[4:12, 4:12].all()
    with pytest.raises(ConfigError, match="mask='ring'"):
        _recipe("inpainting", mask="ring")


def test_inpainting_adversarial_gradients_go_to_the_right_player():
    r = _recipe("inpainting", image_size=16, adversarial_weight=0.5, mask="random")
    x = torch.randn(4, 1, 16, 16).clamp(-1, 1)
    mask = torch.stack([hole_mask(16, 8)] * 4)
    out = r.training_step((x, mask), StepContext())
    assert {"rec_loss", "d_loss", "g_adv", "loss"} <= set(out)
    out["g_adv"].backward(retain_graph=True)                 # generator term alone
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in r.disc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.backbone.parameters())
    r.zero_grad()
    out["d_loss"].backward()                                 # discriminator term alone
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in r.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.disc.parameters())


def test_colorization_bins_soft_targets_and_rebalancing():
    bins = ab_bins()
    assert 200 < len(bins) <= 313 and bins.abs().max() <= 130
    ab = torch.tensor([[[[0.0]], [[0.0]]], [[[40.0]], [[-30.0]]]])     # [2, 2, 1, 1]
    soft, near = soft_encode(ab, bins)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, 1, 1))
    assert (soft > 0).sum() == 10
    torch.testing.assert_close(bins[near.flatten()], torch.tensor([[0.0, 0.0], [40.0, -30.0]]))
    counts = torch.zeros(len(bins))
    counts[near.flatten()] = torch.tensor([90.0, 10.0])
    p, w = rebalance_weights(counts, bins, 0.5)
    assert (p * w).sum().item() == pytest.approx(1.0, abs=1e-5)
    assert w[near[0, 0, 0]] < w[near[1, 0, 0]]               # the rarer colour weighs more
    r = _recipe("colorization", 3, image_size=16, prior_samples=8)
    L, ab = r.views(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8), -1)
    assert L.shape == (1, 16, 16) and ab.shape == (2, 16, 16) and -1 <= L.min() and L.max() <= 1
    gray = torch.full((3, 16, 16), 120, dtype=torch.uint8)
    _, ab_gray = r.views(gray, -1)
    assert ab_gray.abs().max() < 1e-2                        # gray has no colour
    with pytest.raises(ValueError, match="3-channel"):
        r.views(gray[:1], -1)


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_each_recipe_trains_one_step(name):
    channels = 3 if name == "colorization" else 1
    over = {"image_size": 16} if name in ("rotnet", "inpainting", "colorization") else {}
    if name == "colorization":
        over["prior_samples"] = 8
    r = _recipe(name, channels, **over)
    base = Subset(DigitsDataset(), 8)
    if channels == 3:
        from pyssl.data.datasets import PhotoCrops
        base = PhotoCrops(length=8, size=16)
    ds = ViewDataset(base, r.views, seed=0)
    ctx = StepContext(dataset=ds)
    r.on_train_start(ctx)
    batch = r.collate([ds[i] for i in range(8)])
    out = r.training_step(batch, ctx)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    out["loss"].backward()
    assert r.encoder.conv1.weight.grad.abs().sum() > 0       # the encoder learns
    spec = r.encoder_spec()
    assert spec["backbone"]["name"] == "resnet_tiny" and spec["input"]["channels"] == (
        1 if name == "colorization" else channels)


def test_jigsaw_tiles_never_touch():
    tile, gap = 6, 4
    size = 3 * (tile + gap)
    rows = torch.arange(size).view(1, size, 1).expand(1, size, size).float()
    for seed in range(20):
        torch.manual_seed(seed)
        t = cut_tiles(rows, tile, gap)                       # top row of each tile = its y
        tops = t[:, 0, 0, 0].view(3, 3)
        assert ((tops[1:] - tops[:-1]) - tile >= 2 * (gap // 4)).all()


def test_inpainting_region_mask_and_global_bottleneck():
    from pyssl.recipes.inpainting import region_mask

    torch.manual_seed(0)
    masks = [region_mask(28, 0.25) for _ in range(20)]
    for m in masks:
        assert m.shape == (28, 28) and m.dtype == torch.bool
        assert abs(int(m.sum()) - 196) <= 4                  # about a quarter of the pixels
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 20   # random shapes
    r = _recipe("inpainting", image_size=16, mask="region", bottleneck="global")
    x, mask = r.views(torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8), 0)
    assert mask.shape == (16, 16) and 0 < mask.sum() < 256
    batch = (x[None].repeat(2, 1, 1, 1), mask[None].repeat(2, 1, 1))
    out = r.training_step(batch, StepContext())
    out["loss"].backward()
    assert r.decoder.net[0].fc.weight.grad.abs().sum() > 0    # decoded from the pooled vector
    with pytest.raises(ConfigError, match="bottleneck='x'"):
        _recipe("inpainting", bottleneck="x")
