"""Rendering a scene into samples: cameras, LiDAR, and ground-truth flow between frames."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import shading as SH
from .config import WorldConfig
from .geometry import (F64, camera_rig, intrinsics_matrix, invert_pose, lidar_directions,
                       transform_points)
from .raycast import Primitives, TileLayout, cast, local_normals
from .scene import Scene, generate_scene

_CAM_TILE = (16, 16)
_LIDAR_TILE = (8, 32)
#: relative depth tolerance of the flow visibility test (see ``SyntheticWorld.flow``)
FLOW_DEPTH_TOLERANCE = 0.015


@dataclass
class Render:
    """One rendered frame: the public sample plus what ground-truth flow needs."""

    sample: dict
    time: float
    hit: torch.Tensor        # [C, H, W] int64 primitive index, K = ground, -1 = sky
    points: torch.Tensor     # [C, H, W, 3] float64 world position of each pixel's surface
    dirs: torch.Tensor       # [C, H, W, 3] float64 world ray direction of each pixel
    inv_depth: torch.Tensor  # [C, H, W] float64 1/z-depth (0 = sky)


class SyntheticWorld:
    """A procedural driving world generated from ``config`` (a WorldConfig; keyword overrides
    are applied on top). ``render(k)`` gives frame k's sample; ``pair(k)`` frames k and k+1
    with forward/backward flow. Deterministic: the same config gives the same tensors."""

    def __init__(self, config: WorldConfig | None = None, **overrides):
        cfg = config if config is not None else WorldConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg
        self.scene: Scene = generate_scene(cfg)
        self.camera_names, self.cam_to_lidar = camera_rig(cfg.cameras)
        self.lidar_to_cam = invert_pose(self.cam_to_lidar)
        self.intrinsics = intrinsics_matrix(cfg.height, cfg.width, cfg.hfov_deg)
        h, w = cfg.height, cfg.width
        self.cam_tiles = TileLayout(h, w, *_CAM_TILE)
        fx, cx, cy = self.intrinsics[0, 0], self.intrinsics[0, 2], self.intrinsics[1, 2]
        # per tile-ray directions in the camera frame, then the LiDAR frame: [C, G, T, 3]
        d = torch.stack([(self.cam_tiles.cols.to(F64) - cx) / fx,
                         (self.cam_tiles.rows.to(F64) - cy) / fx,
                         torch.ones(self.cam_tiles.rows.shape, dtype=F64)], -1)
        d = d / d.norm(dim=-1, keepdim=True)
        self._cam_dir_z = d[..., 2]                                   # [G, T] cos to axis
        self._cam_dirs = torch.einsum("cij,gtj->cgti", self.cam_to_lidar[:, :3, :3], d)
        self.lidar_tiles = TileLayout(cfg.lidar_beams, cfg.lidar_azimuths, *_LIDAR_TILE)
        ld = lidar_directions(cfg.lidar_beams, cfg.lidar_azimuths, cfg.lidar_fov_up_deg,
                              cfg.lidar_fov_down_deg)
        self._lidar_grid_dirs = ld                                     # [B, A, 3]
        self._lidar_dirs = ld[self.lidar_tiles.rows, self.lidar_tiles.cols]   # [G, T, 3]
        self._radius = Primitives(torch.zeros(1, 3), torch.eye(3)[None], self.scene.prim_size,
                                  self.scene.prim_kind).radius.double()
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def frames(self) -> int:
        return self.config.frames

    def time_of(self, frame: int) -> float:
        if not 0 <= frame < self.config.frames:
            raise IndexError(f"frame {frame} out of range [0, {self.config.frames})")
        return frame * self.config.dt

    def ego_pose(self, frame: int) -> torch.Tensor:
        return self.scene.ego_pose(self.time_of(frame), self.config.lidar_height)

    def _surface(self, hit, xyz_rel, origin, dirs, t, posed, fp):
        """Albedo, LiDAR reflectivity, label and world normal of hits (hit >= 0)."""
        sc = self.scene
        k = sc.prim_kind.shape[0]
        n = hit.shape[0]
        albedo = torch.zeros(n, 3)
        rho = torch.zeros(n)
        label = torch.zeros(n, dtype=torch.int64)
        normal = torch.zeros(n, 3)
        normal[:, 2] = 1.0
        g = hit == k
        o = (hit >= 0) & (hit < k)
        if o.any():
            idx = o.nonzero(as_tuple=True)[0]
            pid = hit.index_select(0, idx)
            center, rot = posed
            rot_p = rot.index_select(0, pid)
            p_loc = ((xyz_rel.index_select(0, idx) - center.index_select(0, pid))[:, None, :]
                     @ rot_p)[:, 0]
            size = sc.prim_size.index_select(0, pid)
            n_loc = local_normals(p_loc, size, sc.prim_kind.index_select(0, pid))
            n_w = (rot_p @ n_loc[..., None])[..., 0]
            cos = (n_w * dirs.index_select(0, idx)).sum(-1).abs().clamp_min(0.05)
            col = sc.prim_col.index_select(0, pid)
            a, r = SH.material_albedo(sc.prim_mat.index_select(0, pid), p_loc, n_loc, size,
                                      col[:, 0], col[:, 1], sc.prim_par.index_select(0, pid),
                                      fp.index_select(0, idx) / cos.sqrt())
            albedo.index_copy_(0, idx, a)
            rho.index_copy_(0, idx, r)
            label.index_copy_(0, idx, sc.prim_label.index_select(0, pid))
            normal.index_copy_(0, idx, n_w)
        gi = g.nonzero(as_tuple=True)[0]
        if gi.numel():
            cos = dirs.index_select(0, gi)[:, 2].abs().clamp_min(0.02)
            # ground footprint: anisotropy folded in (geometric mean of the two axes)
            fpg = fp.index_select(0, gi) / cos.sqrt()
            xy = xyz_rel.index_select(0, gi)[:, :2].double() + origin[:2]
            s, l = sc.road.from_world(xy[:, 0], xy[:, 1])
            a, lab, r = SH.ground_albedo(xy[:, 0].float(), xy[:, 1].float(), s.float(), l.float(),
                                         sc.layout, fpg, self.config.seed)
            albedo.index_copy_(0, gi, a)
            label.index_copy_(0, gi, lab)
            rho.index_copy_(0, gi, r)
        return albedo, rho, label, normal

    # ------------------------------------------------------------------ rendering
    def render(self, frame: int, internals: bool = False):
        """Frame ``frame``'s sample (see the package docstring); with ``internals=True`` a
        Render that also holds per-pixel surface points and primitive ids (for flow)."""
        cfg, sc = self.config, self.scene
        tm = {}
        t0 = time.perf_counter()
        t = self.time_of(frame)
        ego = self.ego_pose(frame)                                    # LiDAR -> world
        origin = ego[:3, 3].clone()
        rot_e = ego[:3, :3]
        poses = sc.prim_poses(t)
        center_rel = poses[:, :3, 3] - origin
        far = max(cfg.camera_far, cfg.lidar_max_range)
        keep = (center_rel.norm(dim=-1) - self._radius <= far + 1.0).nonzero(as_tuple=True)[0]
        k = sc.prim_kind.shape[0]
        prims = Primitives(center_rel[keep].float(), poses[keep, :3, :3].float(),
                           sc.prim_size[keep], sc.prim_kind[keep])
        posed = (center_rel.float(), poses[:, :3, :3].float())

        c = cfg.cameras
        cam_pose_w = ego @ self.cam_to_lidar                          # camera -> world [C,4,4]
        cam_org = (cam_pose_w[:, :3, 3] - origin).float()             # [C, 3]
        cam_dirs = torch.einsum("ij,cgtj->cgti", rot_e, self._cam_dirs).float()
        gc, tc = cam_dirs.shape[1:3]
        lid_dirs = (self._lidar_dirs @ rot_e.T).float()               # [Gl, T, 3]
        gl = lid_dirs.shape[0]
        origins = torch.cat([cam_org[:, None].expand(c, gc, 3).reshape(-1, 3),
                             torch.zeros(gl, 3)])
        dirs = torch.cat([cam_dirs.reshape(c * gc, tc, 3), lid_dirs])
        near = torch.cat([torch.full((c * gc,), 0.05), torch.full((gl,), 1e-3)])
        far_t = torch.cat([torch.full((c * gc,), float(cfg.camera_far)),
                           torch.full((gl,), float(cfg.lidar_max_range))])
        tm["setup"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats = {}
        dist, hit = cast(origins, dirs, near, far_t, prims, ground_z=-float(origin[2]),
                          stats=stats)
        # local hit ids -> world ids: -1 miss, len(prims) the ground (id k), else keep[hit]; with
        # no primitive in range only the ground and the sky remain
        obj = keep[hit.clamp(0, len(prims) - 1)] if len(prims) else torch.full_like(hit, k)
        hit = torch.where(hit < 0, hit, torch.where(hit == len(prims), k, obj))
        tm["cast"] = time.perf_counter() - t1
        tm["pairs"] = stats.get("pairs", 0)

        # ---- cameras
        t2 = time.perf_counter()
        h, w = cfg.height, cfg.width
        gi = self.cam_tiles.gather_index
        gflat = gi.reshape(-1)
        cam_dist = dist[:c * gc].reshape(c, gc * tc).index_select(1, gflat).reshape(c, h, w)
        cam_hit = hit[:c * gc].reshape(c, gc * tc).index_select(1, gflat).reshape(c, h, w)
        cam_d = cam_dirs.reshape(c, gc * tc, 3).index_select(1, gflat).reshape(c, h, w, 3)
        dir_z = self._cam_dir_z.reshape(-1)[gi].float()               # [H, W]
        flat_hit = cam_hit.reshape(-1)
        flat_d = cam_d.reshape(-1, 3)
        flat_t = cam_dist.reshape(-1)
        is_hit = flat_hit >= 0
        hidx = is_hit.nonzero(as_tuple=True)[0]
        h_t = flat_t.index_select(0, hidx)
        h_d = flat_d.index_select(0, hidx)
        xyz_rel = cam_org.repeat_interleave(h * w, 0).index_select(0, hidx) + h_t[:, None] * h_d
        fx = float(self.intrinsics[0, 0])
        albedo, _, lab, nrm = self._surface(flat_hit.index_select(0, hidx), xyz_rel, origin, h_d,
                                            h_t, posed, h_t / fx)
        col = SH.shade(albedo, nrm, sc.sun, sc.ambient)
        col = SH.fog(col, h_t, sc.sky["horizon"])
        rgb = torch.empty(c * h * w, 3)
        rgb.index_copy_(0, hidx, col)
        sidx = (~is_hit).nonzero(as_tuple=True)[0]
        rgb.index_copy_(0, sidx, SH.sky_color(flat_d.index_select(0, sidx), sc.sky))
        labels = torch.zeros(c * h * w, dtype=torch.int64)
        labels.index_copy_(0, hidx, lab)
        depth = torch.where(cam_hit >= 0, cam_dist * dir_z, torch.zeros_like(cam_dist))
        image = (rgb.reshape(c, h, w, 3).permute(0, 3, 1, 2) * 255.0 + 0.5).clamp(0, 255)
        tm["shade"] = time.perf_counter() - t2

        # ---- LiDAR
        t3 = time.perf_counter()
        lt = self.lidar_tiles
        ldist = lt.to_grid(dist[c * gc:].reshape(-1))                 # [B, A]
        lhit = lt.to_grid(hit[c * gc:].reshape(-1))
        ldir_w = lt.to_grid(lid_dirs.reshape(-1, 3))                  # [B, A, 3]
        # sweep order: azimuth-major, beams top to bottom within a firing
        ldist, lhit = ldist.T.reshape(-1), lhit.T.reshape(-1)
        ldir_w = ldir_w.transpose(0, 1).reshape(-1, 3)
        ldir_l = self._lidar_grid_dirs.transpose(0, 1).reshape(-1, 3).float()
        gen = np.random.default_rng([cfg.seed, frame, 0x11DA2])
        drop = torch.from_numpy(gen.random(ldist.shape[0]) < cfg.lidar_dropout)
        noise = torch.from_numpy(gen.standard_normal(ldist.shape[0]).astype(np.float32))
        jitter = torch.from_numpy(gen.uniform(0.9, 1.1, ldist.shape[0]).astype(np.float32))
        ok = (lhit >= 0) & (ldist >= cfg.lidar_min_range) & (ldist <= cfg.lidar_max_range) & ~drop
        li = ok.nonzero(as_tuple=True)[0]
        rng_m = ldist[li]
        pts_rel = rng_m[:, None] * ldir_w[li]
        az_step = 2 * math.pi / cfg.lidar_azimuths
        _, lrho, llab, lnrm = self._surface(lhit[li], pts_rel, origin, ldir_w[li], rng_m,
                                            posed, rng_m * az_step)
        cos = (lnrm * ldir_w[li]).sum(-1).abs()
        inten = (lrho * (0.35 + 0.65 * cos) * torch.exp(-rng_m / 120.0) * jitter[li]).clamp(0, 1)
        meas = rng_m + cfg.lidar_range_noise * noise[li]
        points = torch.cat([meas[:, None] * ldir_l[li], inten[:, None]], -1)
        tm["lidar"] = time.perf_counter() - t3
        tm["total"] = time.perf_counter() - t0
        self.timings = tm

        sample = {
            "images": image.to(torch.uint8),
            "labels": labels.reshape(c, h, w),
            "depth": depth.float(),
            "intrinsics": self.intrinsics.float().expand(c, 3, 3).clone(),
            "lidar_to_cam": self.lidar_to_cam.float(),
            "points": points.float(),
            "point_labels": llab,
            "ego_pose": ego.float(),
            "timestamp": torch.tensor(int(round(t * 1e6)), dtype=torch.int64),
            "frame": torch.tensor(frame, dtype=torch.int64),
        }
        if not internals:
            return sample
        pts_w = (cam_org.double()[:, None, None, :] + origin
                 + cam_dist.double()[..., None] * cam_d.double())
        inv_depth = torch.where(cam_hit >= 0, 1.0 / (cam_dist.double() * dir_z.double()),
                                torch.zeros((), dtype=F64))
        return Render(sample=sample, time=t, hit=cam_hit, points=pts_w, dirs=cam_d.double(),
                      inv_depth=inv_depth)

    # ------------------------------------------------------------------ flow
    def flow(self, src: Render, dst: Render, tolerance: float = FLOW_DEPTH_TOLERANCE):
        """Ground-truth optical flow from ``src``'s frame to ``dst``'s frame, per camera.

        Each pixel's surface point is moved with its primitive's rigid motion between the two
        times (static world: identity; sky: a direction, moved by the camera rotation only)
        and projected into the same camera at ``dst``: ``flow = (u', v') - (u, v)`` [C, 2, H, W]
        (channel 0 = columns). ``valid`` [C, H, W] is True where that point is in front of
        the camera, inside the image (0 <= u' <= W-1, 0 <= v' <= H-1), and visible there: its
        inverse depth agrees with ``dst``'s inverse depth map, bilinearly interpolated at
        (u', v'), within ``tolerance`` (relative; exact for planar surfaces); sky pixels need
        sky at all four neighbours. Flow is given wherever the point stays in front of the
        camera, also where it leaves the image (it then points outside); 0 where it goes
        behind the camera.
        """
        sc = self.scene
        k = sc.prim_kind.shape[0]
        pa, pb = sc.prim_poses(src.time), sc.prim_poses(dst.time)
        motion = pb @ invert_pose(pa)                                 # [K, 4, 4]
        hit = src.hit
        # only pixels of primitives that moved need their points moved
        eye = torch.eye(4, dtype=F64)
        moving = torch.cat([(motion - eye).abs().amax((-1, -2)) > 0,
                            torch.zeros(1, dtype=torch.bool)])        # [K + 1], ground static
        flat_hit = hit.reshape(-1)
        pts = src.points.reshape(-1, 3)
        mi = moving.index_select(0, flat_hit.clamp(min=0) % (k + 1)) & (flat_hit >= 0)
        mi = mi.nonzero(as_tuple=True)[0]
        if mi.numel():
            m = motion.index_select(0, flat_hit.index_select(0, mi))
            pts = pts.index_copy(0, mi, transform_points(m, pts.index_select(0, mi)))
        c, h, w = hit.shape
        pts = pts.reshape(c, h, w, 3)
        ego_b = self.scene.ego_pose(dst.time, self.config.lidar_height)
        w2c = invert_pose(ego_b @ self.cam_to_lidar)                  # [C, 4, 4]
        sky = hit < 0
        pc = torch.einsum("cij,chwj->chwi", w2c[:, :3, :3], pts) + w2c[:, None, None, :3, 3]
        pc_sky = torch.einsum("cij,chwj->chwi", w2c[:, :3, :3], src.dirs)
        pc = torch.where(sky[..., None], pc_sky, pc)
        kk = self.intrinsics
        z = pc[..., 2]
        zs = torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)
        u = kk[0, 0] * pc[..., 0] / zs + kk[0, 2]
        v = kk[1, 1] * pc[..., 1] / zs + kk[1, 2]
        jj = torch.arange(w, dtype=F64)[None, None, :]
        ii = torch.arange(h, dtype=F64)[None, :, None]
        flow = torch.stack([u - jj, v - ii], 1)
        inside = (z > 1e-6) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
        w_dst = _bilinear(dst.inv_depth, u, v)
        w_src = torch.where(sky, torch.zeros_like(z), 1.0 / zs)
        visible = (w_dst - w_src).abs() <= tolerance * w_src + 1e-9
        valid = inside & visible
        flow = torch.where((z > 1e-6)[:, None], flow, torch.zeros_like(flow))
        return flow.float(), valid

    def pair(self, frame: int) -> dict:
        """Frames ``frame`` and ``frame + 1`` with forward and backward flow (see the package
        docstring for the keys)."""
        if not 0 <= frame < self.config.frames - 1:
            raise IndexError(f"pair index {frame} out of range [0, {self.config.frames - 1})")
        a, b = self.render(frame, internals=True), self.render(frame + 1, internals=True)
        return make_pair(self, a, b)


def make_pair(world: SyntheticWorld, a: Render, b: Render) -> dict:
    fw, fw_valid = world.flow(a, b)
    bw, bw_valid = world.flow(b, a)
    return {"t0": a.sample, "t1": b.sample, "flow_fw": fw, "flow_bw": bw,
            "flow_fw_valid": fw_valid, "flow_bw_valid": bw_valid}


def _bilinear(img: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Samples img [C, H, W] at pixel coordinates u, v [C, H, W] (clamped to the image)."""
    c, h, w = img.shape
    u = u.clamp(0, w - 1)
    v = v.clamp(0, h - 1)
    u0 = u.floor().clamp(max=max(w - 2, 0))
    v0 = v.floor().clamp(max=max(h - 2, 0))
    fu, fv = u - u0, v - v0
    u0, v0 = u0.long(), v0.long()
    u1, v1 = (u0 + 1).clamp(max=w - 1), (v0 + 1).clamp(max=h - 1)
    flat = img.reshape(c, -1)

    def at(vv, uu):
        return flat.gather(1, (vv * w + uu).reshape(c, -1)).reshape(u.shape)

    top = at(v0, u0) * (1 - fu) + at(v0, u1) * fu
    bot = at(v1, u0) * (1 - fu) + at(v1, u1) * fu
    return top * (1 - fv) + bot * fv
