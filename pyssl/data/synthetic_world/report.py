"""Measures the synthetic world at a given size: render time per sample and the
self-consistency checks (``python -m pyssl.data.synthetic_world.report --seeds 0 1 2``).

Times are wall-clock and process CPU time on this machine with the given torch thread count
(on a shared machine the CPU time of a 1-thread run is the fairer number); the first render
of a world (warm-up) is excluded.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def main(argv=None) -> int:
    import torch

    from .checks import flow_photometric_error, forward_backward_error, lidar_camera_agreement
    from .config import WorldConfig
    from .world import SyntheticWorld, make_pair

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--frames", type=int, default=4, help="timed renders per seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=448)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--beams", type=int, default=32)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# synthetic world report: {args.cameras} cameras {args.height}x{args.width}, "
          f"{args.beams}-beam LiDAR; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}")
    rows = []
    for seed in args.seeds:
        cfg = WorldConfig(seed=seed, frames=args.frames + 1, cameras=args.cameras,
                          height=args.height, width=args.width, lidar_beams=args.beams)
        t0 = time.perf_counter()
        world = SyntheticWorld(cfg)
        t_scene = time.perf_counter() - t0
        world.render(0)
        times, cpu, casts, shades = [], [], [], []
        renders = []
        for k in range(1, cfg.frames):
            t0, c0 = time.perf_counter(), time.process_time()
            renders.append(world.render(k, internals=True))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            casts.append(world.timings["cast"])
            shades.append(world.timings["shade"])
        t0 = time.perf_counter()
        pair = make_pair(world, renders[0], renders[1])
        t_flow = time.perf_counter() - t0
        geo = lidar_camera_agreement(pair["t0"])
        fw = flow_photometric_error(pair, "fw")
        bw = flow_photometric_error(pair, "bw")
        fb = forward_backward_error(pair)
        row = dict(seed=seed, prims=int(world.scene.prim_kind.shape[0]), scene_s=t_scene,
                   render_s=statistics.median(times), render_cpu_s=statistics.median(cpu),
                   cast_s=statistics.median(casts),
                   shade_s=statistics.median(shades), flows_s=t_flow,
                   points=int(pair["t0"]["points"].shape[0]), **{f"geo_{k}": v for k, v in geo.items()},
                   fw_valid=fw["valid_fraction"], fw_warped=fw["warped"], fw_no_warp=fw["no_warp"],
                   bw_warped=bw["warped"], bw_no_warp=bw["no_warp"], fb_median=fb["median"],
                   fb_p90=fb["p90"], fb_p99=fb["p99"])
        rows.append(row)
        print(f"seed {seed}: {row['prims']} primitives, {row['points']} LiDAR points; render "
              f"{row['render_s']:.3f} s/sample wall, {row['render_cpu_s']:.3f} s CPU (cast "
              f"{row['cast_s']:.3f}, shade "
              f"{row['shade_s']:.3f}), forward+backward flow {row['flows_s']:.3f} s")
        print(f"  LiDAR->camera: {geo['projections']} projections; depth agree "
              f"{geo['depth_agree']:.4f} (interior {geo['depth_agree_interior']:.4f}), label "
              f"agree {geo['label_agree']:.4f} (interior {geo['label_agree_interior']:.4f}), "
              f"edge {geo['edge_fraction']:.4f}, point in front of the visible surface "
              f"(interior) {geo['map_farther_interior']:.5f}")
        print(f"  flow: valid {fw['valid_fraction']:.3f}; photometric |I_t - warp(I_t+1)| "
              f"{fw['warped']:.2f} vs no warp {fw['no_warp']:.2f} (0-255; bw {bw['warped']:.2f} "
              f"vs {bw['no_warp']:.2f}); forward-backward median {fb['median']:.2e} px, p90 "
              f"{fb['p90']:.2e}, p99 {fb['p99']:.2f}")
    print("median render time over seeds: "
          f"{statistics.median(r['render_s'] for r in rows):.3f} s wall, "
          f"{statistics.median(r['render_cpu_s'] for r in rows):.3f} s CPU per "
          f"{args.cameras}-camera {args.height}x{args.width} sample + {args.beams}-beam scan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
