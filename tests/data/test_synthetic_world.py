"""The synthetic driving world: geometry self-consistency, ground-truth flow, determinism,
caching, the Dataset, the figure and the ``pyssl data synth`` command.

Small images and few LiDAR beams keep this fast; the numbers at the default size
(6 x 224 x 448, 32 beams) are reported by ``python -m pyssl.data.synthetic_world.report``.
"""

import json

import pytest
import torch

from pyssl.data.synthetic_world import checks
from pyssl.data.synthetic_world.cache import generate_sequence, load_frame
from pyssl.data.synthetic_world.classes import (BUILDING, CAR, CLASS_COLORS, CLASS_NAMES,
                                                DYNAMIC_CLASSES, NUM_CLASSES, ROAD, SIDEWALK)
from pyssl.data.synthetic_world.config import WorldConfig
from pyssl.data.synthetic_world.dataset import SyntheticWorldDataset, collate
from pyssl.data.synthetic_world.world import SyntheticWorld

SMALL = dict(frames=3, height=64, width=128, lidar_beams=16, lidar_azimuths=360)
TINY = dict(frames=3, cameras=2, height=24, width=40, lidar_beams=4, lidar_azimuths=90)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors: one torch thread is faster, and immune to a busy machine's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(WorldConfig(seed=0, **SMALL))


@pytest.fixture(scope="module")
def pair(world):
    return world.pair(0)


def _report(name, d):
    print(f"\n{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in d.items()))


# ---------------------------------------------------------------- format
def test_sample_format(world, pair):
    s = pair["t0"]
    c, h, w = 6, SMALL["height"], SMALL["width"]
    assert s["images"].shape == (c, 3, h, w) and s["images"].dtype == torch.uint8
    assert s["labels"].shape == (c, h, w) and s["labels"].dtype == torch.int64
    assert s["depth"].shape == (c, h, w) and s["depth"].dtype == torch.float32
    assert s["intrinsics"].shape == (c, 3, 3) and s["lidar_to_cam"].shape == (c, 4, 4)
    assert torch.equal(s["intrinsics"][:, 2], torch.tensor([0.0, 0.0, 1.0]).expand(c, 3))
    p = s["points"]
    assert p.dim() == 2 and p.shape[1] == 4 and p.dtype == torch.float32
    assert s["point_labels"].shape == (p.shape[0],) and s["point_labels"].dtype == torch.int64
    assert s["ego_pose"].shape == (4, 4) and s["timestamp"].dtype == torch.int64
    assert s["timestamp"].item() == 0 and pair["t1"]["timestamp"].item() == 100_000
    for k in ("flow_fw", "flow_bw"):
        assert pair[k].shape == (c, 2, h, w) and pair[k].dtype == torch.float32
    for k in ("flow_fw_valid", "flow_bw_valid"):
        assert pair[k].shape == (c, h, w) and pair[k].dtype == torch.bool
    # value ranges
    assert 0 <= int(s["labels"].min()) and int(s["labels"].max()) < NUM_CLASSES
    assert int(s["point_labels"].min()) >= 1          # the LiDAR never returns "sky"
    assert (s["depth"] >= 0).all() and ((s["depth"] == 0) == (s["labels"] == 0)).all()
    rng = p[:, :3].norm(dim=1)
    assert rng.min() > 0.5 - 0.1 and rng.max() < 70.0 + 0.1
    assert 0 <= float(p[:, 3].min()) and float(p[:, 3].max()) <= 1
    # 16 x 360 firings, some into the sky or beyond 70 m, 5% dropped
    assert 0.3 * 16 * 360 < p.shape[0] < 0.95 * 16 * 360


def test_scene_has_the_expected_classes_and_motion(world, pair):
    s = pair["t0"]
    pix = torch.bincount(s["labels"].flatten(), minlength=NUM_CLASSES)
    pts = torch.bincount(s["point_labels"], minlength=NUM_CLASSES)
    _report("pixels per class", dict(zip(CLASS_NAMES, pix.tolist())))
    _report("points per class", dict(zip(CLASS_NAMES, pts.tolist())))
    for cls in (ROAD, SIDEWALK, BUILDING, CAR):
        assert pix[cls] > 0 and pts[cls] > 0, CLASS_NAMES[cls]
    assert len(CLASS_COLORS) == NUM_CLASSES
    # the ego drives: consecutive LiDAR poses are ego_speed * dt apart
    moved = (pair["t1"]["ego_pose"][:3, 3] - s["ego_pose"][:3, 3]).norm()
    assert float(moved) == pytest.approx(world.scene.ego_speed * 0.1, rel=1e-3)
    # other traffic moves too
    assert (world.scene.obj_v != 0).any()


# ---------------------------------------------------------------- geometry
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lidar_points_land_on_matching_pixels(seed, world):
    w = world if seed == 0 else SyntheticWorld(WorldConfig(seed=seed, **{**SMALL, "frames": 1}))
    s = w.render(0)
    r = checks.lidar_camera_agreement(s)
    _report(f"seed {seed} LiDAR->camera agreement", r)
    assert min(r["per_camera"]) > 100                 # every camera sees LiDAR points
    assert r["depth_agree"] > 0.85 and r["label_agree"] > 0.9
    assert r["depth_agree_interior"] > 0.95 and r["label_agree_interior"] > 0.95
    assert r["map_farther_interior"] < 0.003          # never a point in front of the surface


def test_geometry_check_catches_a_calibration_error(world):
    """Negative control: a 3-pixel principal-point error or a mirrored camera is detected."""
    s = world.render(0)
    good = checks.lidar_camera_agreement(s)
    shifted = dict(s, intrinsics=s["intrinsics"].clone())
    shifted["intrinsics"][:, 0, 2] += 3.0
    bad = checks.lidar_camera_agreement(shifted)
    _report("cx + 3 px", bad)
    assert bad["depth_agree"] < good["depth_agree"] - 0.05
    assert bad["map_farther_interior"] > 10 * max(good["map_farther_interior"], 1e-3)
    swapped = dict(s, lidar_to_cam=s["lidar_to_cam"][[0, 2, 1, 3, 5, 4]])  # left <-> right
    assert checks.lidar_camera_agreement(swapped)["label_agree"] < 0.6


def test_project_points_contract_is_the_one_used(world):
    """The fused op (when present) and the reference agree on the sample's calibration."""
    from pyssl.ops.reference.projection import project_points as reference
    s = world.render(0)
    h, w = SMALL["height"], SMALL["width"]
    args = (s["points"], s["lidar_to_cam"], s["intrinsics"], (h, w))
    pix, depth, valid = checks.default_projector()(*args, min_depth=0.5)
    pix_r, depth_r, valid_r = reference(*args, min_depth=0.5)
    assert valid_r.sum() > 1000
    # float32 rounding may flip a point lying exactly on the image border; nothing else
    assert (valid != valid_r).sum() <= max(1, int(1e-3 * valid_r.sum()))
    both = valid & valid_r
    assert torch.allclose(pix[both], pix_r[both], atol=1e-3)
    assert torch.allclose(depth[both], depth_r[both], rtol=1e-5, atol=1e-4)


def test_package_exports():
    import pyssl.data.synthetic_world as sw
    if getattr(sw, "__file__", None) is None:
        pytest.skip("stale editable install maps synthetic_world as a namespace package; "
                    "`pip install --no-build-isolation -e .` refreshes it")
    assert sw.SyntheticWorld is SyntheticWorld and sw.WorldConfig is WorldConfig
    assert sw.SyntheticWorldDataset is SyntheticWorldDataset and sw.collate is collate
    assert sw.generate_sequence is generate_sequence and callable(sw.save_figure)
    assert sw.CLASS_NAMES == CLASS_NAMES


# ---------------------------------------------------------------- flow
@pytest.mark.parametrize("direction", ["fw", "bw"])
def test_flow_warp_reproduces_the_other_frame(pair, direction):
    r = checks.flow_photometric_error(pair, direction)
    _report(f"photometric error ({direction}, 0-255)", r)
    assert r["valid_fraction"] > 0.5
    assert r["warped"] < 0.25 * r["no_warp"]
    assert r["warped"] < 4.0 and r["warped_median"] < 1.0
    # negative control: the same warp with the flow off by one pixel is clearly worse
    off = dict(pair, flow_fw=pair["flow_fw"] + 1.0, flow_bw=pair["flow_bw"] + 1.0)
    assert checks.flow_photometric_error(off, direction)["warped"] > 1.5 * r["warped"]


def test_flow_of_moving_objects_is_right(world):
    """Warp error restricted to vehicles/pedestrians: object motion is in the flow."""
    best = None
    for k in range(world.frames - 1):
        p = world.pair(k)
        dyn = torch.zeros_like(p["flow_fw_valid"])
        for c in DYNAMIC_CLASSES:
            dyn |= p["t0"]["labels"] == c
        m = p["flow_fw_valid"] & dyn
        if best is None or m.sum() > best[1].sum():
            best = (p, m)
    p, m = best
    assert m.sum() > 200
    src, dst = p["t0"]["images"].float(), p["t1"]["images"].float()
    e_w = (checks.warp_with_flow(dst, p["flow_fw"]) - src).abs().mean(1)[m].mean()
    e_0 = (dst - src).abs().mean(1)[m].mean()
    _report("moving-object photometric error", {"pixels": int(m.sum()), "warped": float(e_w),
                                                 "no_warp": float(e_0)})
    assert e_w < 0.3 * e_0


def test_forward_backward_consistency(pair):
    r = checks.forward_backward_error(pair)
    _report("forward-backward |F_fw + F_bw(p + F_fw)| (px)", r)
    assert r["median"] < 0.01 and r["p90"] < 0.1
    # negative control: a backward flow scaled by 0.9 is inconsistent
    bad = checks.forward_backward_error(dict(pair, flow_bw=pair["flow_bw"] * 0.9))
    assert bad["median"] > 10 * max(r["median"], 1e-3)


def test_invalid_flow_marks_occlusion_and_leaving_the_image(world, pair):
    h, w = SMALL["height"], SMALL["width"]
    f, v = pair["flow_fw"], pair["flow_fw_valid"]
    jj = torch.arange(w)[None, None] + f[:, 0]
    ii = torch.arange(h)[None, :, None] + f[:, 1]
    inside = (jj >= 0) & (jj <= w - 1) & (ii >= 0) & (ii <= h - 1)
    assert (inside | ~v).all()                        # valid implies inside the image
    assert (~v & inside).any()                        # some pixels are occluded, not just out
    assert 0.5 < v.float().mean() < 1.0


# ---------------------------------------------------------------- determinism, cache, dataset
def test_deterministic_from_the_seed():
    cfg = WorldConfig(seed=5, **TINY)
    a, b = SyntheticWorld(cfg), SyntheticWorld(cfg)
    b.render(2)                                       # render order does not matter
    threads = torch.get_num_threads()
    try:                                              # nor the number of threads
        torch.set_num_threads(1)
        pa = a.pair(1)
        torch.set_num_threads(2)
        pb = b.pair(1)
    finally:
        torch.set_num_threads(threads)
    for k in ("flow_fw", "flow_bw", "flow_fw_valid", "flow_bw_valid"):
        assert torch.equal(pa[k], pb[k]), k
    for k in pa["t0"]:
        assert torch.equal(pa["t0"][k], pb["t0"][k]), k
    other = SyntheticWorld(cfg.replace(seed=6)).render(1)
    assert not torch.equal(other["images"], pa["t0"]["images"])
    assert other["points"].shape != pa["t0"]["points"].shape or not torch.equal(
        other["points"], pa["t0"]["points"])


def test_cache_round_trip_and_dataset(tmp_path):
    cfg = WorldConfig(seed=2, **TINY)
    world = SyntheticWorld(cfg)
    seq = generate_sequence(cfg, tmp_path / "seq", world=world)
    meta = json.loads((seq / "meta.json").read_text())
    assert meta["complete"] and meta["frames"] == 3 and meta["config"] == cfg.to_dict()
    assert [c["name"] for c in meta["classes"]] == list(CLASS_NAMES)
    assert "flow_bw" not in load_frame(seq, 0) and "flow_fw" not in load_frame(seq, 2)

    ds = SyntheticWorldDataset(tmp_path, mode="sample")   # a directory of sequences
    assert len(ds) == 3 and ds.camera_names == world.camera_names
    for k in range(3):
        got, ref = ds[k], world.render(k)
        assert set(got) == set(ref)
        for key in ref:
            assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    pairs = SyntheticWorldDataset(seq, mode="pair")
    assert len(pairs) == 2
    got, ref = pairs[1], world.pair(1)
    for key in ("flow_fw", "flow_bw", "flow_fw_valid", "flow_bw_valid"):
        assert torch.equal(got[key], ref[key]), key
    assert torch.equal(got["t1"]["images"], ref["t1"]["images"])

    batch = collate([pairs[0], pairs[1]])
    c, h, w = 2, TINY["height"], TINY["width"]
    assert batch["t0"]["images"].shape == (2, c, 3, h, w)
    assert batch["flow_fw"].shape == (2, c, 2, h, w) and batch["flow_bw_valid"].shape == (2, c, h, w)
    assert batch["t0"]["intrinsics"].shape == (2, c, 3, 3)
    assert isinstance(batch["t1"]["points"], list) and len(batch["t1"]["points"]) == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    assert next(iter(loader))["labels"].shape == (3, c, h, w)

    # cache hit: nothing is rewritten; a different config is refused unless overwrite
    mtime = (seq / "frame_000001.npz").stat().st_mtime_ns
    generate_sequence(cfg, seq)
    assert (seq / "frame_000001.npz").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_sequence(cfg.replace(seed=3), seq)
    generate_sequence(cfg.replace(seed=3, frames=2), seq, overwrite=True)
    assert len(SyntheticWorldDataset(seq)) == 2 and not (seq / "frame_000002.npz").exists()


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pyssl data synth"):
        SyntheticWorldDataset(tmp_path)
    with pytest.raises(ValueError, match="mode"):
        SyntheticWorldDataset(tmp_path, mode="pairs")
    with pytest.raises(IndexError):
        SyntheticWorld(WorldConfig(seed=0, **TINY)).pair(2)


def test_a_damaged_cache_is_rendered_again_or_named(tmp_path):
    """A frame file cut off (a crash, a full disk) made the cache hit return a sequence that
    failed later with zipfile's BadZipFile; a corrupt meta.json was reported as 'a different
    sequence'. Now: the same config re-renders, and readers name the file."""
    cfg = WorldConfig(seed=2, **TINY)
    seq = generate_sequence(cfg, tmp_path / "seq")
    good = (seq / "frame_000001.npz").read_bytes()
    (seq / "frame_000001.npz").write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=r"frame_000001.npz cannot be read \(BadZipFile"):
        SyntheticWorldDataset(seq)[1]
    generate_sequence(cfg, seq)                              # not a cache hit: rendered again
    assert (seq / "frame_000001.npz").read_bytes() == good
    (seq / "meta.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"meta.json cannot be read .*--overwrite"):
        SyntheticWorldDataset(seq)
    with pytest.raises(FileExistsError, match=r"meta.json cannot be read .*--overwrite"):
        generate_sequence(cfg, seq)
    generate_sequence(cfg, seq, overwrite=True)
    assert len(SyntheticWorldDataset(seq)) == 3


# ---------------------------------------------------------------- figure and CLI
def test_cli_synth_writes_sequence_and_figure(tmp_path, capsys):
    from pyssl.cli import main

    out = tmp_path / "synth"
    rc = main(["data", "synth", "--out", str(out), "--frames", "2", "--seed", "4",
               "--cameras", "3", "--height", "32", "--width", "64", "--beams", "8",
               "--azimuths", "180", "--quiet", "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "figure:" in text and "class balance" in text
    assert (out / "meta.json").is_file() and (out / "frame_000001.npz").is_file()
    png = out / "synthetic_world.png"
    assert png.is_file() and 10_000 < png.stat().st_size < 1_000_000
    assert len(SyntheticWorldDataset(out, mode="pair")) == 1


@pytest.mark.parametrize("args,needle", [
    (["--cameras", "0"], "--cameras"), (["--height", "0"], "--height"),
    (["--width", "-4"], "--width"), (["--max-range", "-5"], "--max-range"),
    (["--min-range", "-1"], "--min-range"), (["--frames", "0"], "--frames"),
    (["--dropout", "1.5"], "--dropout"), (["--sequences", "0"], "--sequences"),
    (["--threads", "0"], "--threads"),
    (["--figure-dpi", "0"], "--figure-dpi must be >= 1"),
    (["--frames", "3", "--figure-frame", "2"], "--figure-frame must be in [0, 1] for 3 frames"),
    (["--frames", "1", "--figure-frame", "-1"], "--figure-frame must be in [0, 0]"),
])
def test_cli_bad_parameters(tmp_path, capsys, args, needle):
    from pyssl.cli import main

    rc = main(["data", "synth", "--out", str(tmp_path / "x")] + args)
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "error" in err
    assert not (tmp_path / "x").exists()


def test_cli_out_that_is_a_file_is_refused_before_rendering(tmp_path, capsys):
    from pyssl.cli import main

    (tmp_path / "f").write_text("")
    assert main(["data", "synth", "--out", str(tmp_path / "f" / "x"), "--quiet"]) == 2
    assert "--out " in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [
    dict(cameras=1, height=17, width=23, lidar_beams=1, lidar_azimuths=7),
    dict(cameras=5, height=9, width=40, lidar_beams=3, lidar_azimuths=50, hfov_deg=120.0,
         lidar_min_range=0.0, lidar_dropout=0.0, lidar_range_noise=0.0, ego_speed=0.0),
])
def test_odd_sizes_render_and_pair(overrides):
    cfg = WorldConfig(seed=9, frames=2, **overrides)
    p = SyntheticWorld(cfg).pair(0)
    c, h, w = cfg.cameras, cfg.height, cfg.width
    assert p["t0"]["images"].shape == (c, 3, h, w) and p["flow_bw"].shape == (c, 2, h, w)
    assert p["t0"]["points"].shape[0] <= cfg.lidar_beams * cfg.lidar_azimuths
    if cfg.ego_speed == 0.0:     # a parked ego: static pixels do not move, their flow is 0
        static = p["flow_fw_valid"].clone()
        for cls in DYNAMIC_CLASSES:
            static &= p["t0"]["labels"] != cls
        assert p["flow_fw"].permute(0, 2, 3, 1)[static].abs().max() < 1e-3


def test_cli_data_without_subcommand_prints_help(capsys):
    from pyssl.cli import main

    assert main(["data"]) == 0
    assert "synth" in capsys.readouterr().out


def test_world_with_nothing_in_range_renders_ground_and_sky():
    # camera and LiDAR ranges too short to reach any object: no primitive is kept for the ray
    # cast (this once indexed an empty tensor)
    cfg = dict(TINY, frames=2)
    w = SyntheticWorld(WorldConfig(seed=0, camera_far=1.5, lidar_max_range=1.5, **cfg))
    s = w.render(0)
    assert s["points"].shape[1] == 4
    assert torch.isfinite(s["depth"]).all()
