"""``pyssl data ...``: built-in data. ``pyssl data list`` lists the built-in ``--data`` names;
``pyssl data synth`` generates and caches synthetic driving sequences
(pyssl.data.synthetic_world) and writes a figure of them."""

from __future__ import annotations

import sys


def _config(args, seed):
    from pyssl.data.synthetic_world.config import WorldConfig

    return WorldConfig(seed=seed, frames=args.frames, dt=args.dt, cameras=args.cameras,
                       height=args.height, width=args.width, hfov_deg=args.hfov,
                       lidar_beams=args.beams, lidar_azimuths=args.azimuths,
                       lidar_fov_up_deg=args.fov_up, lidar_fov_down_deg=args.fov_down,
                       lidar_min_range=args.min_range, lidar_max_range=args.max_range,
                       lidar_dropout=args.dropout, ego_speed=args.ego_speed,
                       traffic=args.traffic, pedestrians=args.pedestrians)


# WorldConfig field -> command-line flag, for error messages
_FLAGS = {"lidar_fov_down_deg": "--fov-down", "lidar_fov_up_deg": "--fov-up",
          "lidar_min_range": "--min-range", "lidar_max_range": "--max-range",
          "lidar_dropout": "--dropout", "lidar_azimuths": "--azimuths",
          "lidar_beams": "--beams", "hfov_deg": "--hfov", "ego_speed": "--ego-speed",
          "cameras": "--cameras", "height": "--height", "width": "--width",
          "frames": "--frames", "dt": "--dt", "traffic": "--traffic",
          "pedestrians": "--pedestrians"}


def run_synth(args) -> int:
    import time
    from pathlib import Path

    import torch

    from pyssl.data.synthetic_world.cache import generate_sequence
    from pyssl.data.synthetic_world.classes import CLASS_NAMES
    from pyssl.data.synthetic_world.dataset import SyntheticWorldDataset
    from pyssl.data.synthetic_world.figure import save_figure
    from pyssl.data.synthetic_world.world import SyntheticWorld

    def fail(msg):
        print(f"pyssl data synth: error: {msg}", file=sys.stderr)
        return 2

    if args.threads is not None:
        if args.threads < 1:
            return fail(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.sequences < 1:
        return fail(f"--sequences must be >= 1, got {args.sequences}")
    if args.seed < 0:
        return fail(f"--seed must be >= 0, got {args.seed}")
    try:
        configs = [_config(args, args.seed + i) for i in range(args.sequences)]
    except (ValueError, TypeError) as e:
        msg = str(e)
        field = msg.split(" ", 1)[0]
        if field in _FLAGS:                  # name the command-line flag too
            msg = f"{_FLAGS[field]} ({field}){msg[len(field):]}"
        return fail(msg)
    if not args.no_figure:
        if args.figure_dpi < 1:
            return fail(f"--figure-dpi must be >= 1, got {args.figure_dpi}")
        last = args.frames - 2 if args.frames > 1 else 0  # pairs (k, k+1) from 2 frames on
        if not 0 <= args.figure_frame <= last:
            return fail(f"--figure-frame must be in [0, {last}] for {args.frames} frames"
                        + (" (the figure shows frame k and k+1)" if args.frames > 1 else "")
                        + f", got {args.figure_frame}")
    from pyssl.engine.checkpoint import check_folder
    from pyssl.engine.config import ConfigError

    try:
        out = check_folder(args.out)
    except ConfigError as e:
        return fail(str(e))
    dirs = [out] if args.sequences == 1 else [out / f"seq_{i:03d}" for i in range(args.sequences)]
    for cfg, d in zip(configs, dirs):
        world = SyntheticWorld(cfg)
        times = []

        def progress(k, n, sec):
            times.append(sec)
            if not args.quiet:
                print(f"  {d.name}: frame {k + 1}/{n} rendered + flow in {sec:.2f} s", flush=True)

        t0 = time.perf_counter()
        try:
            generate_sequence(cfg, d, overwrite=args.overwrite, compress=not args.no_compress,
                              progress=progress, world=world)
        except FileExistsError as e:
            return fail(str(e))
        size = sum(f.stat().st_size for f in d.glob("*")) / 2 ** 20
        per = f", {sum(times) / len(times):.2f} s/frame" if times else " (cached)"
        print(f"{d}: seed {cfg.seed}, {cfg.frames} frames, {cfg.cameras} cameras "
              f"{cfg.height}x{cfg.width}, {cfg.lidar_beams}-beam LiDAR; "
              f"{time.perf_counter() - t0:.1f} s{per}; {size:.1f} MiB on disk")
    if not args.no_figure:
        mode = "pair" if configs[0].frames > 1 else "sample"
        ds = SyntheticWorldDataset(dirs[0], mode=mode)
        k = args.figure_frame
        item = ds[k]
        fig = save_figure(item, out / "synthetic_world.png", ds.camera_names, dpi=args.figure_dpi,
                          title=f"pyssl synthetic world, seed {configs[0].seed}, frame {k}"
                                + (f" -> {k + 1}" if mode == "pair" else ""))
        sample = item["t0"] if mode == "pair" else item
        pix = torch.bincount(sample["labels"].flatten(), minlength=len(CLASS_NAMES)).double()
        pts = torch.bincount(sample["point_labels"], minlength=len(CLASS_NAMES)).double()
        print(f"figure: {fig}")
        print("class balance (frame %d): " % k + ", ".join(
            f"{n} {100 * a / pix.sum():.1f}%/{100 * b / max(pts.sum(), 1):.1f}%"
            for n, a, b in zip(CLASS_NAMES, pix.tolist(), pts.tolist())) + "  (pixels/points)")
    return 0


def run_list(args) -> int:
    from pyssl.data.datasets import BUILTIN_DATASETS

    width = max(map(len, BUILTIN_DATASETS))
    for name, what in BUILTIN_DATASETS.items():
        print(f"{name:<{width}}  {what}")
    print("or a path: an image folder (root/<class>/<image>, with train/ and val/ or split "
          "80/20 per class; or unlabelled root/<image>), a Fashion-MNIST idx folder, or a "
          "captions file (.jsonl/.csv/.tsv)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="built-in data (synthetic driving world)")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    ls = sub.add_parser("list", help="list the built-in datasets (names for --data / data=)")
    ls.set_defaults(func=run_list)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    s = sub.add_parser(
        "synth", help="generate + cache a synthetic driving sequence and a figure of it",
        description="Renders a procedural driving sequence (6 calibrated cameras, a spinning "
                    "LiDAR, labels, depth, ground-truth optical flow) into DIR as one npz per "
                    "frame plus meta.json, and writes DIR/synthetic_world.png. Read it back "
                    "with pyssl.data.synthetic_world.SyntheticWorldDataset(DIR).")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--frames", type=int, default=10, help="frames per sequence (default 10)")
    s.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    s.add_argument("--sequences", type=int, default=1,
                   help="number of sequences (seeds seed, seed+1, ...; DIR/seq_NNN each)")
    s.add_argument("--cameras", type=int, default=6, help="cameras (default 6, nuScenes rig)")
    s.add_argument("--height", type=int, default=224, help="image rows (default 224)")
    s.add_argument("--width", type=int, default=448, help="image columns (default 448)")
    s.add_argument("--hfov", type=float, default=70.0, help="camera horizontal FOV, degrees")
    s.add_argument("--dt", type=float, default=0.1, help="seconds between frames (default 0.1)")
    s.add_argument("--beams", type=int, default=32, help="LiDAR beams (default 32)")
    s.add_argument("--azimuths", type=int, default=1080, help="LiDAR firings per turn")
    s.add_argument("--fov-up", type=float, default=10.0, help="top beam elevation, degrees")
    s.add_argument("--fov-down", type=float, default=-30.0, help="bottom beam elevation")
    s.add_argument("--min-range", type=float, default=0.5, help="LiDAR min range, metres")
    s.add_argument("--max-range", type=float, default=70.0, help="LiDAR max range, metres")
    s.add_argument("--dropout", type=float, default=0.05, help="LiDAR return dropout rate")
    s.add_argument("--ego-speed", type=float, default=None, help="m/s (default: from seed)")
    s.add_argument("--traffic", type=float, default=1.0, help="vehicle density multiplier")
    s.add_argument("--pedestrians", type=float, default=1.0, help="pedestrian density multiplier")
    s.add_argument("--figure-frame", type=int, default=0, help="frame shown in the figure")
    s.add_argument("--figure-dpi", type=int, default=60, help="figure resolution (default 60)")
    s.add_argument("--no-figure", action="store_true", help="skip the figure")
    s.add_argument("--no-compress", action="store_true", help="write uncompressed npz")
    s.add_argument("--overwrite", action="store_true", help="replace a different sequence in DIR")
    s.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    s.add_argument("--quiet", action="store_true", help="no per-frame progress")
    s.set_defaults(func=run_synth)
