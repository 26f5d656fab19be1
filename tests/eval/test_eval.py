import json

import pytest
import torch

from pyssl.engine.config import ConfigError
from pyssl.engine.run import pretrain
from pyssl.eval import extract_features, fewshot_eval, knn_accuracy, knn_predict, linear_probe
from pyssl.eval.features import load_encoder
from pyssl.eval.finetune import balanced_fraction
from pyssl.eval.protocols import run_eval


def _knn_bruteforce(tr, ytr, te, k, T, C):
    out = []
    for q in te:
        sims = [(float(torch.dot(q / q.norm(), t / t.norm())), int(y)) for t, y in zip(tr, ytr)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * C
        for s, y in sims[:k]:
            votes[y] += float(torch.exp(torch.tensor(s / T)))
        out.append(votes)
    return torch.tensor(out)


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(60, 5, generator=g), torch.randn(13, 5, generator=g)
    ytr = torch.randint(0, 4, (60,), generator=g)
    for k, T in ((1, 0.07), (7, 0.5), (20, 0.07)):
        got = knn_predict(tr, ytr, te, 4, k, T, chunk=5)
        ref = _knn_bruteforce(tr, ytr, te, k, T, 4)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    yte = ref.argmax(1)
    assert knn_accuracy(tr, ytr, te, yte, k=20) == 1.0
    with pytest.raises(ValueError, match="k must be positive"):
        knn_predict(tr, ytr, te, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(tr, ytr, te, temperature=0)


def _clusters(n_per, classes=5, dim=8, spread=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_linear_probe_separable_vs_random_labels():
    x, y = _clusters(40)
    xt, yt = _clusters(20, seed=0)
    r = linear_probe(x, y, xt, yt, epochs=30)
    assert r["test_acc"] == 1.0
    noise = torch.randn(200, 8)
    r = linear_probe(noise[:150], torch.randint(0, 5, (150,)), noise[150:],
                     torch.randint(0, 5, (50,)), epochs=20)
    assert r["test_acc"] < 0.5
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, xt, yt, epochs=0)


def test_fewshot_episodes_and_confidence_interval():
    x, y = _clusters(30, classes=6, spread=0.5)
    r = fewshot_eval(x, y, n_way=5, n_shot=1, n_query=5, episodes=50)
    assert r["acc"] > 0.95 and 0 <= r["ci95"] < 0.05
    r = fewshot_eval(x, y, 3, 2, 5, 10, classifier="logistic")
    assert r["acc"] > 0.9
    noise = torch.randn(180, 8)
    r = fewshot_eval(noise, y, 5, 1, 5, 200, seed=1)
    assert abs(r["acc"] - 0.2) < 3 * r["ci95"] + 0.03 and r["ci95"] > 0
    with pytest.raises(ValueError, match="n_way"):
        fewshot_eval(x, y, n_way=7)
    with pytest.raises(ValueError, match=r"at least n_shot \+ n_query = 35"):
        fewshot_eval(x, y, n_shot=20, n_query=15)


def test_balanced_fraction():
    labels = [0] * 50 + [1] * 10
    idx = balanced_fraction(labels, 0.1)
    assert sum(labels[i] == 0 for i in idx) == 5 and sum(labels[i] == 1 for i in idx) == 1
    with pytest.raises(ValueError, match="label fraction"):
        balanced_fraction(labels, 0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    pretrain("rotnet", data="digits", epochs=1, out=out,
             overrides=["progress=false", "tensorboard=false", "data_subset=128",
                        "batch_size=32", "image_size=16", "backbone_width=4", "max_steps=3"])
    return out


def test_encoder_from_checkpoint_and_random_init(tiny_run):
    enc, spec, meta = load_encoder(tiny_run / "last.pt")
    rnd, spec2, _ = load_encoder(tiny_run / "last.pt", random_init=True)
    assert meta["recipe"] == "rotnet" and meta["step"] == 3 and spec == spec2
    assert not torch.equal(enc.conv1.weight, rnd.conv1.weight)
    from pyssl.data.datasets import DigitsDataset, Subset
    f, y = extract_features(enc, spec, Subset(DigitsDataset("test"), 10), batch_size=4)
    assert f.shape == (10, 32) and y.shape == (10,)
    with pytest.raises(ValueError, match="feature 'nope'"):
        extract_features(enc, spec, Subset(DigitsDataset("test"), 2), feature="nope")


def test_run_eval_writes_tables(tiny_run, capsys):
    r = run_eval(["linear", "knn", "fewshot"], tiny_run, overrides=[
        "probe_epochs=3", "episodes=5", "n_shots=1", "n_query=4", "train_subset=200",
        "test_subset=100"])
    printed = capsys.readouterr().out
    assert "| linear |" in printed and "| knn |" in printed and "| fewshot |" in printed
    assert [row["protocol"] for row in r["rows"]] == ["linear", "knn", "fewshot"]
    saved = json.loads((tiny_run / "eval" / "eval_linear_knn_fewshot.json").read_text())
    assert saved["data"] == "digits" and saved["train_size"] == 200 and saved["rows"][0]["accuracy"] > 0.1
    assert (tiny_run / "eval" / "eval_linear_knn_fewshot.md").read_text().count("|") > 10
    r = run_eval("finetune", tiny_run, random_init=True, verbose=False, overrides=[
        "finetune_epochs=1", "label_fraction=0.2", "train_subset=200", "test_subset=50",
        "progress=false", "finetune_batch_size=16"])
    assert r["rows"][0]["protocol"] == "finetune" and 0 <= r["rows"][0]["accuracy"] <= 1
    assert (tiny_run / "eval" / "finetune_random" / "last.pt").exists()
    assert (tiny_run / "eval" / "eval_finetune_random.md").exists()


def test_run_eval_bad_input(tiny_run):
    with pytest.raises(ConfigError, match="unknown evaluation protocol 'svm'"):
        run_eval("svm", tiny_run)
    with pytest.raises(ConfigError, match="unknown config key 'kk'"):
        run_eval("knn", tiny_run, overrides=["kk=3"])
    with pytest.raises(ConfigError, match="k=0"):
        run_eval("knn", tiny_run, overrides=["k=0"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval("knn", tiny_run / "missing.pt")
    from pyssl.data.datasets import DataError
    with pytest.raises(DataError, match="no labels"):
        run_eval("knn", tiny_run, overrides=["data=photos"])


def test_patch_grid_preprocessing_cuts_the_cell_centres():
    from pyssl.data.transforms import input_spec, patch_grid, preprocess

    # a 3x3 grid of 6 px cells; each cell's 4 px centre holds its row-major index, its 1 px
    # border holds 255: every patch must be exactly its cell's centre
    img = torch.full((1, 18, 18), 255, dtype=torch.uint8)
    for r in range(3):
        for c in range(3):
            img[0, r * 6 + 1:r * 6 + 5, c * 6 + 1:c * 6 + 5] = 10 * (3 * r + c)
    spec = input_spec(28, 1, patches={"grid": 3, "cell": 6, "size": 4})
    x = preprocess(img, spec)
    assert x.shape == (9, 1, 4, 4)
    expect = torch.tensor([10.0 * k for k in range(9)]) / 255 * 2 - 1
    assert torch.allclose(x.flatten(1), expect[:, None].expand(9, 16))
    # standardised patches: mean 0 and std 1 each, flat patches stay finite
    g = torch.Generator().manual_seed(0)
    y = patch_grid(torch.randn(3, 30, 30, generator=g), 3, 10, 8, standardize=True)
    assert y.shape == (9, 3, 8, 8)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(9), atol=1e-5)
    assert torch.allclose(y.std(dim=(1, 2, 3)), torch.ones(9), atol=1e-5)
    assert torch.isfinite(patch_grid(torch.zeros(1, 9, 9), 3, 3, 3, standardize=True)).all()
    with pytest.raises(ValueError, match="size <= cell"):
        input_spec(28, 1, patches={"cell": 4, "size": 6})
    with pytest.raises(ValueError, match="expected a 30x30 image"):
        patch_grid(torch.zeros(1, 28, 28), 3, 10, 8)


def test_encode_averages_patch_features():
    from pyssl.eval.features import encode
    from pyssl.models import build_backbone

    torch.manual_seed(0)
    enc = build_backbone("resnet_tiny", in_chans=1, image_size=16, kwargs={"width": 4}).eval()
    x = torch.randn(2, 9, 1, 8, 8)
    with torch.no_grad():
        got = encode(enc, x)
        want = torch.stack([enc(x[b]).mean(0) for b in range(2)])
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(encode(enc, x[:, 0]), enc(x[:, 0]))   # 4-D: whole images


@pytest.mark.parametrize("recipe", ["jigsaw", "relative_patch"])
def test_patch_recipes_are_evaluated_on_their_patch_grid(recipe, tmp_path):
    out = tmp_path / recipe
    pretrain(recipe, data="digits", epochs=1, out=out,
             overrides=["progress=false", "tensorboard=false", "data_subset=64", "batch_size=16",
                        "backbone_width=4", "max_steps=2"])
    enc, spec, _ = load_encoder(out / "last.pt")
    p = spec["input"]["patches"]
    assert p["grid"] == 3 and (p["cell"], p["size"]) == ((16, 12) if recipe == "jigsaw" else (16, 10))
    assert p["standardize"] == (recipe == "jigsaw")
    over = ["train_subset=60", "test_subset=30", "probe_epochs=2", "progress=false"]
    r = run_eval(["knn", "finetune"], out / "last.pt", verbose=False,
                 overrides=over + ["finetune_epochs=1", "finetune_batch_size=16"])
    assert r["input"] == "3x3 patches" and "3x3 patches" in r["table"]
    assert all(0 <= row["accuracy"] <= 1 for row in r["rows"])
    img = run_eval("knn", out / "last.pt", verbose=False, overrides=over + ["view=image"])
    assert img["input"] == "image"
    from pyssl.data.datasets import DigitsDataset, Subset
    f, _ = extract_features(enc, spec, Subset(DigitsDataset("test"), 5), batch_size=4)
    from pyssl.eval.features import image_view
    f_img, _ = extract_features(enc, image_view(spec), Subset(DigitsDataset("test"), 5))
    assert f.shape == f_img.shape and not torch.allclose(f, f_img)
    with pytest.raises(ConfigError, match="view='tiles'"):
        run_eval("knn", out / "last.pt", overrides=["view=tiles"])


def test_run_eval_reads_torchvision_data_where_pretraining_did(tiny_run, monkeypatch):
    """A run pretrained with data_root=<folder> is evaluated on data from the same folder
    (eval looked under PYSSL_DATA_ROOT only); eval's own data_root= wins, and other data does
    not inherit the run's root."""
    import pyssl.eval.protocols as protocols
    from pyssl.engine.checkpoint import atomic_save, load_checkpoint

    ck = load_checkpoint(tiny_run / "last.pt")
    ck["config"]["train"]["data_root"] = "/datasets/torchvision"
    atomic_save(ck, tiny_run / "rooted.pt")
    roots = []

    def recording(data, split, *, root=None, **kw):
        roots.append(root)
        raise protocols.DataError("stop here")

    monkeypatch.setattr(protocols, "resolve_data", recording)
    for overrides, want in (([], "/datasets/torchvision"), (["data_root=/mine"], "/mine"),
                            (["data=digits"], "/datasets/torchvision"),
                            (["data=photos"], None)):
        with pytest.raises(protocols.DataError, match="stop here"):
            run_eval("knn", tiny_run / "rooted.pt", overrides=overrides, verbose=False)
        assert roots.pop() == want
