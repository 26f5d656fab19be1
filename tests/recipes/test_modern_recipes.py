"""The modern recipes end to end on tiny models: a few engine steps each (checkpoint, figures,
k-NN monitor), BEiT with its tokenizer trained first, CLIP with captions and zero-shot,
torch.compile of the DINO and MAE steps, and clear errors for bad configs."""

import json

import pytest
import torch

from pyssl.engine import ConfigError, StepContext
from pyssl.engine.run import build_configs, pretrain
from pyssl.eval.features import load_encoder
from pyssl.recipes import RECIPES

MODERN = ["simclr", "clip", "dino", "dinov2", "mae", "beit", "vq_tokenizer"]
ENGINE = ["progress=false", "tensorboard=false", "log_every=1", "data_subset=48",
          "batch_size=16", "image_size=16", "warmup_epochs=0.5", "knn_every=0"]
VIT = ["backbone_width=32", "vit_depth=1", "vit_heads=2"]
DINO = VIT + ["out_dim=128", "head_hidden=32", "head_bottleneck=16", "local_size=8",
              "n_local_crops=2"]
OVERRIDES = {
    "simclr": ["backbone_width=4"],
    "clip": ["backbone_width=4", "text_encoder=hashing:64", "embed_dim=16"],
    "dino": DINO + ["knn_every=1", "knn_train=64", "knn_test=32"],
    "dinov2": DINO,
    "mae": VIT + ["decoder_dim=32", "decoder_depth=1"],
    "beit": VIT + ["tokenizer_epochs=1", "tokenizer_codes=32", "tokenizer_subset=32"],
    "vq_tokenizer": ["width=16", "num_codes=32", "code_dim=8"],
}
FIGURES = {"dino": ["attention.png", "knn.png"], "dinov2": ["attention.png"],
           "mae": ["reconstruction.png"], "vq_tokenizer": ["codebook.png",
                                                           "tokenizer_reconstruction.png"]}


def test_registry_lists_the_modern_recipes():
    assert set(MODERN) <= set(RECIPES)
    for name in MODERN:
        cls = RECIPES[name]
        assert cls.description and cls.paper and cls.small_scale, name


@pytest.mark.parametrize("name", MODERN)
def test_recipe_trains_a_few_steps_through_the_engine(tmp_path, name):
    out = tmp_path / name
    s = pretrain(name, data="digits", epochs=1, out=out,
                 overrides=ENGINE + ["max_steps=3"] + OVERRIDES[name])
    assert s["status"] == "finished" and s["step"] == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])
    enc, spec, meta = load_encoder(out / "last.pt")           # evaluation can rebuild it
    from pyssl.data.transforms import preprocess

    x = torch.stack([preprocess(torch.zeros(1, 8, 8, dtype=torch.uint8), spec["input"])] * 2)
    f = enc.forward_features(x)[spec["feature"]]
    assert f.shape[0] == 2 and torch.isfinite(f).all()
    for fig in FIGURES.get(name, []):
        assert (out / "figures" / fig).stat().st_size > 1000, fig
    if name == "dino":                                        # epoch 0 (random) + the end
        recs = [json.loads(line) for line in (out / "knn.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in recs] == [0, 1] and 0 <= recs[-1]["knn"] <= 1
    if name == "beit":                                        # tokenizer trained first, in run
        assert (out / "tokenizer" / "last.pt").exists()
        assert (out / "tokenizer" / "codebook.jsonl").exists()
        tok_cfg = json.loads((out / "tokenizer" / "config.json").read_text())
        assert tok_cfg["train"]["data_subset"] == 32          # tokenizer_subset, not 48
    if name == "vq_tokenizer":
        rec = json.loads((out / "codebook.jsonl").read_text().splitlines()[-1])
        assert 0 < rec["usage"] <= 1 and rec["perplexity"] >= 1


def test_dino_with_65536_prototypes_takes_a_step():
    cls, _, cfg = build_configs("dino", [o for o in DINO if not o.startswith("out_dim")] +
                                ["out_dim=65536", "image_size=16", "knn_every=0"])
    torch.manual_seed(0)
    r = cls(cfg, 1)
    imgs = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    batch = r.collate([r.views(im, 0) for im in imgs])
    ctx = StepContext(total_steps=2, steps_per_epoch=2)
    r.on_train_start(ctx)
    out = r.training_step(batch, ctx)
    out["loss"].backward()
    assert r.student.head.last_layer.weight_v.grad.shape == (65536, 16)
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0


def test_clip_captions_file_and_zero_shot(tmp_path):
    from pyssl.data.captions import write_captions_file
    from pyssl.data.datasets import DigitsDataset, Subset, resolve_data
    from pyssl.eval.zeroshot import zeroshot_eval

    d = Subset(DigitsDataset(), 24)
    caps = [[f"a photo of the digit {d[i][1]}", f"digit {d[i][1]}"] for i in range(24)]
    path = write_captions_file(tmp_path / "caps.jsonl", [d[i][0] for i in range(24)], caps)
    ds = resolve_data(str(path))
    img, cap = ds[3]
    assert img.shape[0] == 3 and cap == caps[3]
    s = pretrain("clip", data=str(path), epochs=2, out=tmp_path / "run",
                 overrides=ENGINE + ["max_steps=2"] + OVERRIDES["clip"])
    assert s["step"] == 2
    # zero-shot runs from the checkpoint on a labelled set (3-channel images, prompts)
    r = zeroshot_eval(tmp_path / "run" / "last.pt", Subset(DigitsDataset("test"), 40))
    assert 0 <= r["accuracy"] <= 1 and len(r["classes"]) == 10
    from pyssl.eval.protocols import run_eval           # `pyssl eval zeroshot`

    res = run_eval(["zeroshot"], tmp_path / "run" / "last.pt", verbose=False,
                   overrides=["data=digits", "test_subset=40", "train_subset=20"])
    assert res["rows"][0]["protocol"] == "zeroshot" and 0 <= res["rows"][0]["accuracy"] <= 1


def test_clip_zero_shot_on_a_trivially_separable_task(tmp_path):
    """Three classes of obviously different images named by distinct words: a few dozen steps
    of CLIP training make zero-shot by prompts (no labelled training) nearly perfect."""
    from pyssl.data.datasets import ImageDataset
    from pyssl.eval.zeroshot import zeroshot_eval

    class Shapes(ImageDataset):
        classes = ["dark", "bright", "stripes"]
        channels, name = 1, "shapes"

        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.y = torch.arange(n) % 3
            base = torch.zeros(n, 1, 16, 16)
            base[self.y == 1] = 1.0
            base[self.y == 2, :, :, ::2] = 1.0
            noise = 0.15 * torch.rand(n, 1, 16, 16, generator=g)
            self.x = ((base * 0.8 + noise) * 255).to(torch.uint8)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    cls, tcfg, cfg = build_configs("clip", ["backbone_width=4", "text_encoder=hashing:64",
                                            "embed_dim=16", "image_size=16",
                                            "crop_scale_min=0.9", "knn_every=0"])
    from pyssl.engine.trainer import Trainer

    torch.manual_seed(0)
    model = cls(cfg, 1)
    for k, v in dict(epochs=10, batch_size=24, lr=5e-3, progress=False, tensorboard=False,
                     warmup_epochs=0.0, log_every=10).items():
        setattr(tcfg, k, v)
    Trainer(model, Shapes(48, 0), tcfg, tmp_path / "shapes",
            {"train": {}, "recipe": "clip", "recipe_config": cfg.__dict__}).fit()
    ck = torch.load(tmp_path / "shapes" / "last.pt", weights_only=False)
    ck["config"] = {"recipe_config": cfg.__dict__}
    r = zeroshot_eval(ck, Shapes(30, 1), text_encoder="hashing:64")
    rnd = zeroshot_eval(ck, Shapes(30, 1), text_encoder="hashing:64", random_init=True)
    assert r["accuracy"] >= 0.9 and r["accuracy"] > rnd["accuracy"]


@pytest.mark.parametrize("name", ["dino", "mae"])
def test_torch_compile_training_step(name):
    """MAE's forward + loss and DINO's training step up to the loss (student on 2 + 2 crops,
    teacher, heads, DINOLoss with its centre update) compile with ``fullgraph=True`` (no graph
    break) and give the eager loss and gradients. (``compile=true`` in the recipe compiles
    DINO's networks; the losses stay eager there for iBOT's data-dependent masking.)"""
    import torch._dynamo

    cls, _, cfg = build_configs(name, OVERRIDES[name] + ["image_size=16", "knn_every=0",
                                                         "figures=false"])
    torch.manual_seed(0)
    r = cls(cfg, 1)
    imgs = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    torch.manual_seed(1)
    batch = r.collate([r.views(im, 0) for im in imgs])
    noise = torch.rand(4, 16)
    state = {k: v.clone() for k, v in r.state_dict().items()}

    losses = r._losses if name == "dino" else None

    def step():
        r.load_state_dict(state)          # same centre / weights for both runs
        r.zero_grad()
        if name == "mae":
            loss = r._compute(batch, noise)[0]
        else:
            loss = losses(torch.cat(batch[:2]), torch.cat(batch[2:]), None, 0)[0]["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in r.named_parameters()
                               if p.grad is not None}

    eager_loss, eager_grads = step()
    torch._dynamo.reset()
    if name == "mae":
        r._compute = torch.compile(r.forward_loss, fullgraph=True)
    else:                                 # networks + DINOLoss (centre update) in one graph
        losses = torch.compile(r._losses, fullgraph=True)
    c_loss, c_grads = step()
    torch.testing.assert_close(c_loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert set(c_grads) == set(eager_grads) and len(c_grads) > 10
    for n, g in eager_grads.items():
        torch.testing.assert_close(c_grads[n], g, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name, override, message", [
    ("dino", "centering=median", "centering='median'"),
    ("dino", "n_global_crops=3", "n_global_crops=3"),
    ("dino", "local_scale=0.5,0.1", "local_scale"),
    ("dinov2", "backbone=resnet_tiny", "ibot=true needs a ViT"),
    ("mae", "mask_ratio=1.0", "mask_ratio=1.0"),
    ("mae", "backbone=resnet_tiny", "needs a ViT backbone"),
    ("mae", "vit_pool=max", "vit_pool='max'"),
    ("beit", "tokenizer=/no/such/tokenizer.pt", "no such file"),
    ("beit", "tokenizer_pixels=rgb", "tokenizer_pixels"),
    ("beit", "tokenizer_subset=-2", "tokenizer_subset=-2"),
    ("clip", "text_encoder=/no/such/encoder.pt", "text_encoder"),
    ("clip", "templates=a photo", "templates"),
    ("clip", "duplicates=drop", "duplicates='drop'"),
    ("simclr", "temperature=0", "temperature=0.0"),
    ("vq_tokenizer", "downsample=3", "power of two"),
    ("dino", "prototypes=10", "unknown config key 'prototypes'; valid keys: "),
    ("simclr", "temperature=warm", "expected a number"),
])
def test_bad_config_gives_a_clear_error(name, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls, _, cfg = build_configs(name, [override, "image_size=16"] + (
            ["text_encoder=hashing"] if name == "clip" and "text_encoder" not in override
            else []))
        cls(cfg, 1)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_dino_head_reads_the_pooled_feature_evaluation_reads(pool):
    """vit_pool picks what the DINO head is trained on (the CLS token as in the paper, or the
    mean patch token), and it is the feature the evaluation protocols read."""
    cls, _, cfg = build_configs("dino", DINO + [f"vit_pool={pool}", "image_size=16",
                                                "knn_every=0"])
    torch.manual_seed(0)
    r = cls(cfg, 1)
    x = torch.randn(3, 1, 16, 16)
    feat, _ = r._features(r.student, x)
    f = r.student.backbone.forward_features(x)
    want = f["cls"] if pool == "cls" else f["patch"].mean(1)
    torch.testing.assert_close(feat, want)
    assert not torch.allclose(f["cls"], f["patch"].mean(1))     # the two choices differ


def test_dino_collapse_diagnostics_on_every_logged_step(tmp_path):
    """teacher_entropy / prototypes_used are computed only on the steps the engine logs
    (log_every and the last step), and every logged record has them."""
    out = tmp_path / "dino"
    s = pretrain("dino", data="digits", epochs=1, out=out,
                 overrides=[o for o in ENGINE if not o.startswith("log_every")] +
                 ["log_every=2", "max_steps=3"] + DINO)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 3]
    assert all("teacher_entropy" in r and r["prototypes_used"] >= 1 for r in recs)
    assert [("teacher_entropy" in h) for h in s["history"]] == [False, True, True]
