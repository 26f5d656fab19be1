import pytest
import torch

from pyssl.models import BACKBONES, ResNet, VisionTransformer, build_backbone


@pytest.mark.parametrize("size, stride", [(28, 8), (64, 8), (96, 32)])
def test_resnet_features(size, stride):
    m = build_backbone("resnet_tiny", 1, size, {"width": 8}).eval()
    out = m.forward_features(torch.randn(2, 1, size, size))
    h = -(-size // stride)
    assert out["map"].shape == (2, 64, h, h)
    assert out["patch"].shape == (2, h * h, 64) and out["pooled"].shape == (2, 64)
    torch.testing.assert_close(out["pooled"], out["patch"].mean(1))
    assert m.num_features == 64 and m(torch.randn(1, 1, size, size)).shape == (1, 64)
    assert isinstance(m.conv1, torch.nn.Conv2d) and m.conv1.stride == ((1, 1) if size <= 64 else (2, 2))


def test_resnet_variants_and_errors():
    r50 = ResNet(50, 3, width=8, small_stem=True, norm="group")
    assert r50.num_features == 8 * 8 * 4
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in r50.modules())
    with pytest.raises(ValueError, match="depth"):
        ResNet(19)
    with pytest.raises(ValueError, match="norm"):
        ResNet(18, norm="layer")
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'; valid backbones: .*vit_tiny"):
        build_backbone("resnet7")
    assert set(BACKBONES) >= {"resnet18", "resnet50", "vit_small", "vit_base"}


def test_vit_features_masking_attention_and_pieces():
    torch.manual_seed(0)
    m = build_backbone("vit_micro", 3, 32).eval()
    assert isinstance(m, VisionTransformer) and m.patch_size == 4 and m.num_patches == 64
    x = torch.randn(2, 3, 32, 32)
    out = m.forward_features(x)
    assert out["cls"].shape == (2, 64) and out["patch"].shape == (2, 64, 64)
    assert out["map"].shape == (2, 64, 8, 8) and torch.equal(out["pooled"], out["cls"])
    # BEiT-style masking: masked patches do not depend on their pixels
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :10] = True
    x2 = x.clone()
    x2[:, :, :4, :] += 5.0                 # changes patches 0-7 (first patch row) only
    e1, e2 = m.embed(x, mask), m.embed(x2, mask)
    torch.testing.assert_close(e1[:, :8], e2[:, :8])
    assert not torch.allclose(m.embed(x)[:, :8], m.embed(x2)[:, :8])
    # MAE-style: the block stack on a subset of tokens
    tokens = m.embed(x)[:, [1, 5, 9]]
    y = m.forward_blocks(torch.cat([m.cls_embed(2), tokens], 1))
    assert y.shape == (2, 4, 64)
    # DINO attention maps: rows are distributions
    att = m.last_self_attention(x)
    assert att.shape == (2, 2, 65, 65)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 65))
    # another input size (multi-crop local views): position embedding interpolated
    assert m.forward_features(torch.randn(1, 3, 16, 16))["patch"].shape == (1, 16, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m.forward_features(torch.randn(1, 3, 18, 18))
    with pytest.raises(ValueError, match="mask must have shape"):
        m.embed(x, mask[:, :5])
    assert "pos_embed" in m.no_weight_decay()


def test_vit_224_uses_16px_patches():
    m = build_backbone("vit_micro", 3, 224)
    assert m.patch_size == 16 and m.num_patches == 196
