"""Procedural scene layout from a seed: road, pavements, buildings, vegetation, poles,
parked and moving vehicles, walking pedestrians, and the ego vehicle's trajectory.

Everything is placed in road coordinates (s along the road, l to the left). Each object has
a rigid pose at time t (``s = s0 + v t``, fixed lateral offset and heading relative to the
road); each primitive has a rest pose in its object's frame (x forward, y left, z up, origin
on the ground) plus, for pedestrians' legs and arms, a swing about a pivot, and, for wheels,
a spin about the axle. Primitive poses are therefore known exactly at any time, which is what
ground-truth flow uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import classes as C
from . import shading as M
from .config import WorldConfig
from .geometry import F64, Road, make_pose, rot_x, rot_y, rot_z
from .raycast import BOX, CYLINDER, ELLIPSOID

_WALL_COLORS = [(0.78, 0.72, 0.6), (0.62, 0.32, 0.25), (0.6, 0.6, 0.62), (0.85, 0.84, 0.8),
                (0.7, 0.58, 0.45), (0.86, 0.8, 0.58), (0.55, 0.6, 0.68), (0.45, 0.42, 0.4)]
_WINDOW_COLORS = [(0.18, 0.24, 0.32), (0.12, 0.14, 0.16), (0.28, 0.34, 0.4), (0.22, 0.2, 0.16)]
_PAINT_COLORS = [(0.92, 0.92, 0.92), (0.06, 0.06, 0.07), (0.62, 0.64, 0.66), (0.7, 0.08, 0.08),
                 (0.08, 0.2, 0.6), (0.35, 0.36, 0.38), (0.1, 0.32, 0.18), (0.85, 0.7, 0.1),
                 (0.45, 0.12, 0.3), (0.6, 0.45, 0.3)]
_CLOTH_COLORS = [(0.1, 0.12, 0.3), (0.08, 0.08, 0.08), (0.5, 0.1, 0.1), (0.15, 0.4, 0.2),
                 (0.8, 0.75, 0.65), (0.45, 0.45, 0.45), (0.7, 0.5, 0.1), (0.3, 0.2, 0.5),
                 (0.85, 0.85, 0.85), (0.2, 0.5, 0.7)]
_SKIN_COLORS = [(0.95, 0.8, 0.68), (0.85, 0.65, 0.5), (0.6, 0.42, 0.3), (0.4, 0.27, 0.2)]
_HAIR_COLORS = [(0.08, 0.06, 0.05), (0.35, 0.22, 0.1), (0.75, 0.6, 0.35), (0.5, 0.5, 0.5)]
_SIGN_COLORS = [(0.8, 0.08, 0.08), (0.1, 0.25, 0.7), (0.9, 0.75, 0.1)]


@dataclass
class Scene:
    """A generated world (tensors float64 unless noted)."""

    road: Road
    layout: dict
    sky: dict
    sun: torch.Tensor            # [3] float32 unit vector towards the sun (world)
    ambient: float
    ego_s0: float
    ego_l: float
    ego_speed: float
    # objects [O]
    obj_class: torch.Tensor      # int64
    obj_s0: torch.Tensor
    obj_l: torch.Tensor
    obj_v: torch.Tensor          # signed speed along s (m/s)
    obj_yaw: torch.Tensor        # heading relative to the road tangent
    # primitives [K]
    prim_obj: torch.Tensor       # int64
    prim_kind: torch.Tensor      # int64
    prim_size: torch.Tensor      # [K, 3] float32
    prim_rest: torch.Tensor      # [K, 4, 4] primitive-to-object at rest
    prim_pivot: torch.Tensor     # [K, 3] swing pivot (object frame)
    prim_swing: torch.Tensor     # [K, 3] amplitude (rad), frequency (Hz), phase (rad)
    prim_spin: torch.Tensor      # [K] rad/s about the primitive's own z axis
    prim_mat: torch.Tensor       # int64 material id
    prim_col: torch.Tensor       # [K, 2, 3] float32
    prim_par: torch.Tensor       # [K, 4] float32
    extra: dict = field(default_factory=dict)

    @property
    def prim_label(self) -> torch.Tensor:
        return self.obj_class[self.prim_obj]

    def ego_pose(self, t: float, lidar_height: float) -> torch.Tensor:
        """LiDAR-to-world [4, 4] at time t (LiDAR lidar_height above the ground)."""
        s = torch.tensor([self.ego_s0 + self.ego_speed * t], dtype=F64)
        return self.road.pose(s, torch.tensor([self.ego_l], dtype=F64), 0.0, lidar_height)[0]

    def object_poses(self, t: float) -> torch.Tensor:
        return self.road.pose(self.obj_s0 + self.obj_v * t, self.obj_l, self.obj_yaw)

    def prim_poses(self, t: float) -> torch.Tensor:
        """Primitive-to-world [K, 4, 4] at time t."""
        obj = self.object_poses(t)[self.prim_obj]
        amp, freq, phase = self.prim_swing.unbind(-1)
        ang = amp * torch.sin(2.0 * math.pi * freq * t + phase)
        piv = self.prim_pivot
        swing = make_pose(rot_y(ang), piv - (rot_y(ang) @ piv[..., None])[..., 0])
        spin = make_pose(rot_z(self.prim_spin * t), torch.zeros_like(piv))
        return obj @ swing @ self.prim_rest @ spin


class _Builder:
    def __init__(self):
        self.objs: list[tuple] = []
        self.prims: list[dict] = []

    def obj(self, cls, s0, l, v=0.0, yaw=0.0) -> int:
        self.objs.append((cls, float(s0), float(l), float(v), float(yaw)))
        return len(self.objs) - 1

    def prim(self, obj, kind, size, center, mat, col0, col1=(0.0, 0.0, 0.0),
             par=(0.0, 0.0, 0.0, 0.0), rot=None, pivot=(0.0, 0.0, 0.0), swing=(0.0, 0.0, 0.0),
             spin=0.0):
        self.prims.append(dict(obj=obj, kind=kind, size=size, center=center, mat=mat,
                               col0=col0, col1=col1, par=par,
                               rot=np.eye(3) if rot is None else np.asarray(rot), pivot=pivot,
                               swing=swing, spin=spin))


def _jitter(rng, color, amount=0.06):
    c = np.asarray(color) * (1.0 + rng.uniform(-amount, amount)) + rng.uniform(-amount, amount, 3) * 0.5
    return tuple(np.clip(c, 0.0, 1.0).tolist())


def _pick(rng, options):
    return options[rng.integers(len(options))]


_WHEEL_ROT = rot_x(torch.tensor(math.pi / 2, dtype=F64)).numpy()  # cylinder axis z -> object y


def _add_vehicle(b: _Builder, rng, kind: str, s0, l, v, yaw):
    paint = _jitter(rng, _pick(rng, _PAINT_COLORS), 0.04)
    glass = _jitter(rng, (0.12, 0.16, 0.22), 0.05)
    seed = float(rng.integers(1 << 20))
    cls = C.TRUCK if kind == "truck" else C.CAR
    o = b.obj(cls, s0, l, v, yaw)
    if kind == "car":
        length, width = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9)
        wheel_r = rng.uniform(0.3, 0.35)
        bh = rng.uniform(0.6, 0.75)
        b.prim(o, BOX, (length / 2, width / 2, bh / 2), (0, 0, 0.25 + bh / 2), M.PAINT, paint,
               par=(0, 0, 0, seed))
        cl = length * rng.uniform(0.45, 0.58)
        ch = rng.uniform(0.45, 0.6)
        cx = -length * rng.uniform(0.0, 0.1)
        b.prim(o, BOX, (cl / 2, width / 2 - 0.08, ch / 2), (cx, 0, 0.25 + bh + ch / 2), M.CABIN,
               paint, glass, par=(rng.uniform(-0.1, 0.1) * cl, 0, 0, seed))
        axles = [length / 2 - 0.85, -(length / 2 - 0.8)]
    elif kind == "van":
        length, width = rng.uniform(4.8, 5.6), rng.uniform(1.9, 2.05)
        wheel_r = rng.uniform(0.33, 0.38)
        bh = 0.8
        b.prim(o, BOX, (length / 2, width / 2, bh / 2), (0, 0, 0.3 + bh / 2), M.PAINT, paint,
               par=(0, 0, 0, seed))
        uh = rng.uniform(0.95, 1.15)
        ul = length * 0.88
        b.prim(o, BOX, (ul / 2, width / 2 - 0.04, uh / 2), (-length * 0.06, 0, 0.3 + bh + uh / 2),
               M.GLASS, paint, glass, par=(1.4, 0, 0, seed))
        axles = [length / 2 - 0.9, -(length / 2 - 0.9)]
    else:  # box truck
        length, width = rng.uniform(6.5, 9.0), 2.4
        wheel_r = 0.5
        cab_l, cab_h = 2.2, rng.uniform(2.4, 2.7)
        b.prim(o, BOX, (cab_l / 2, width / 2 - 0.05, 0.55 / 2), (length / 2 - cab_l / 2, 0, 0.5 + 0.55 / 2),
               M.PAINT, paint, par=(0, 0, 0, seed))
        b.prim(o, BOX, (cab_l / 2, width / 2 - 0.05, (cab_h - 0.55) / 2),
               (length / 2 - cab_l / 2, 0, 1.05 + (cab_h - 0.55) / 2), M.GLASS, paint, glass,
               par=(1.2, 0, 0, seed))
        box_l, box_h = length - cab_l - 0.2, rng.uniform(2.6, 3.2)
        body = _jitter(rng, _pick(rng, [(0.92, 0.92, 0.9), (0.75, 0.75, 0.75), (0.2, 0.35, 0.6),
                                        (0.85, 0.3, 0.1)]), 0.04)
        stripe = _jitter(rng, _pick(rng, _PAINT_COLORS), 0.04)
        b.prim(o, BOX, (box_l / 2, width / 2, box_h / 2), (-length / 2 + box_l / 2, 0, 0.95 + box_h / 2),
               M.CARGO, body, stripe, par=(rng.uniform(-0.5, 0.5), 0, 0, seed))
        b.prim(o, BOX, (length / 2 - 0.3, 0.5, 0.2), (0, 0, 0.65), M.METAL, (0.12, 0.12, 0.12),
               par=(0, 0, 0, seed))
        axles = [length / 2 - 1.2, -length / 2 + 1.6, -length / 2 + 2.7]
    hub = _jitter(rng, (0.6, 0.6, 0.62), 0.1)
    spin = -abs(v) / wheel_r  # local z is the object's -y axis: rolling forward
    for ax in axles:
        for side in (-1, 1):
            b.prim(o, CYLINDER, (wheel_r, wheel_r, 0.11),
                   (ax, side * (width / 2 - 0.1), wheel_r), M.TIRE, hub,
                   par=(0, 0, 0, seed), rot=_WHEEL_ROT, spin=spin)
    return length


def _add_pedestrian(b: _Builder, rng, s0, l, v, yaw):
    o = b.obj(C.PEDESTRIAN, s0, l, v, yaw)
    height = rng.uniform(1.55, 1.92)
    seed = float(rng.integers(1 << 20))
    leg = 0.47 * height
    torso = 0.3 * height
    shirt = _jitter(rng, _pick(rng, _CLOTH_COLORS), 0.05)
    trousers = _jitter(rng, _pick(rng, _CLOTH_COLORS), 0.05)
    skin = _jitter(rng, _pick(rng, _SKIN_COLORS), 0.03)
    hair = _jitter(rng, _pick(rng, _HAIR_COLORS), 0.05)
    speed = abs(v)
    amp = 0.0 if speed == 0 else min(0.45, 0.25 + 0.12 * speed)
    freq = speed / 1.4
    phase = rng.uniform(0, 2 * math.pi)
    for side in (-1, 1):
        b.prim(o, BOX, (0.075, 0.075, leg / 2), (0, side * 0.1, leg / 2), M.CLOTH, trousers,
               par=(0, 0, 0, seed), pivot=(0, side * 0.1, leg),
               swing=(amp, freq, phase + (0 if side > 0 else math.pi)))
        b.prim(o, BOX, (0.05, 0.05, 0.3 * height / 2), (0, side * 0.25, leg + torso - 0.15 * height),
               M.CLOTH, shirt, par=(0, 0, 0, seed), pivot=(0, side * 0.25, leg + torso - 0.02),
               swing=(0.6 * amp, freq, phase + (math.pi if side > 0 else 0)))
    b.prim(o, BOX, (0.12, 0.19, torso / 2), (0, 0, leg + torso / 2), M.CLOTH, shirt,
           par=(0, 0, 0, seed))
    hr = 0.105 * height / 1.75
    b.prim(o, ELLIPSOID, (hr, hr * 0.9, hr * 1.2), (0, 0, leg + torso + 0.05 + hr * 1.2), M.SKIN,
           skin, hair, par=(0, 0, 0, seed))


def _add_tree(b: _Builder, rng, s0, l, max_crown=2.8):
    o = b.obj(C.VEGETATION, s0, l, 0.0, rng.uniform(0, 2 * math.pi))
    seed = float(rng.integers(1 << 20))
    crown_r = rng.uniform(1.4, max_crown)
    crown_h = rng.uniform(1.5, 3.2)
    trunk_h = rng.uniform(2.3, 3.5) + 0.15 * crown_h  # crown bottom >= 2.3 m above ground
    tr = rng.uniform(0.1, 0.2)
    bark = _jitter(rng, (0.33, 0.24, 0.16), 0.1)
    g0 = _jitter(rng, _pick(rng, [(0.2, 0.38, 0.12), (0.15, 0.3, 0.1), (0.3, 0.42, 0.15)]), 0.1)
    g1 = _jitter(rng, _pick(rng, [(0.35, 0.5, 0.18), (0.1, 0.22, 0.08), (0.42, 0.45, 0.2)]), 0.1)
    b.prim(o, CYLINDER, (tr, tr, (trunk_h + 0.5 * crown_h) / 2), (0, 0, (trunk_h + 0.5 * crown_h) / 2),
           M.BARK, bark, par=(0, 0, 0, seed))
    b.prim(o, ELLIPSOID, (crown_r, crown_r * rng.uniform(0.8, 1.0), crown_h),
           (0, 0, trunk_h + crown_h * 0.85), M.FOLIAGE, g0, g1, par=(0, 0, 0, seed))
    if rng.random() < 0.5:
        r2 = crown_r * rng.uniform(0.5, 0.8)
        b.prim(o, ELLIPSOID, (r2, r2, r2 * 1.1),
               (rng.uniform(-0.5, 0.5) * crown_r, rng.uniform(-0.5, 0.5) * crown_r,
                trunk_h + crown_h * 1.6), M.FOLIAGE, g1, g0, par=(0, 0, 0, seed + 1))


def _add_bush(b: _Builder, rng, s0, l, hedge_len=None):
    o = b.obj(C.VEGETATION, s0, l, 0.0, 0.0)
    seed = float(rng.integers(1 << 20))
    g0 = _jitter(rng, (0.18, 0.34, 0.12), 0.12)
    g1 = _jitter(rng, (0.3, 0.45, 0.15), 0.12)
    if hedge_len is None:
        r = rng.uniform(0.5, 1.2)
        b.prim(o, ELLIPSOID, (r, r * rng.uniform(0.7, 1.0), r * 0.8), (0, 0, r * 0.5), M.FOLIAGE,
               g0, g1, par=(0, 0, 0, seed))
    else:
        h = rng.uniform(0.6, 1.4)
        b.prim(o, BOX, (hedge_len / 2, rng.uniform(0.3, 0.5), h / 2), (0, 0, h / 2), M.FOLIAGE,
               g0, g1, par=(0, 0, 0, seed))


def _add_pole(b: _Builder, rng, s0, l, side, kind):
    o = b.obj(C.POLE, s0, l, 0.0, 0.0)
    seed = float(rng.integers(1 << 20))
    metal = _jitter(rng, _pick(rng, [(0.5, 0.5, 0.52), (0.25, 0.27, 0.25), (0.6, 0.58, 0.5)]), 0.05)
    if kind == "light":
        h = rng.uniform(6.0, 9.0)
        b.prim(o, CYLINDER, (0.09, 0.09, h / 2), (0, 0, h / 2), M.METAL, metal, par=(0, 0, 0, seed))
        arm = rng.uniform(1.2, 2.5)
        b.prim(o, BOX, (0.05, arm / 2, 0.05), (0, -side * arm / 2, h - 0.1), M.METAL, metal,
               par=(0, 0, 0, seed))
        b.prim(o, BOX, (0.25, 0.35, 0.08), (0, -side * arm, h - 0.2), M.METAL, (0.8, 0.8, 0.75),
               par=(0, 0, 0, seed))
    else:  # sign post facing the traffic on its side
        h = rng.uniform(2.4, 3.0)
        b.prim(o, CYLINDER, (0.04, 0.04, h / 2), (0, 0, h / 2), M.METAL, metal, par=(0, 0, 0, seed))
        facing = math.pi if side < 0 else 0.0  # the plate faces oncoming traffic
        rot = rot_z(torch.tensor(facing, dtype=F64)).numpy()
        half = rng.uniform(0.28, 0.4)
        b.prim(o, BOX, (0.02, half, half), (0.06 * math.cos(facing), 0, h - half), M.SIGN,
               _pick(rng, _SIGN_COLORS), (0.92, 0.92, 0.92), par=(0, 0, 0, seed), rot=rot)


def _add_building(b: _Builder, rng, s_mid, l_front, side, width, depth):
    height = float(np.exp(rng.uniform(math.log(6.0), math.log(30.0))))
    wall = _jitter(rng, _pick(rng, _WALL_COLORS), 0.06)
    win = _jitter(rng, _pick(rng, _WINDOW_COLORS), 0.05)
    par = (rng.uniform(2.4, 4.0), rng.uniform(2.9, 3.6), rng.uniform(0.35, 0.7),
           float(rng.integers(1 << 20)))
    lc = l_front + side * depth / 2
    o = b.obj(C.BUILDING, s_mid, lc, 0.0, 0.0)
    b.prim(o, BOX, (width / 2, depth / 2, height / 2), (0, 0, height / 2), M.WALL, wall, win, par=par)
    if height > 12 and rng.random() < 0.35:
        h2 = rng.uniform(3, 10)
        b.prim(o, BOX, (width * 0.35, depth * 0.3, h2 / 2), (0, side * depth * 0.1, height + h2 / 2),
               M.WALL, wall, win, par=par)


def generate_scene(cfg: WorldConfig) -> Scene:
    rng = np.random.default_rng([cfg.seed, 0x5CE7E])
    duration = (cfg.frames - 1) * cfg.dt
    ego_speed = float(rng.uniform(5.0, 12.0)) if cfg.ego_speed is None else float(cfg.ego_speed)
    travel = ego_speed * duration
    margin = min(cfg.camera_far, 200.0) + 20.0
    s_min, s_max = -margin, travel + margin

    # road layout
    lane_w = float(rng.uniform(3.2, 3.7))
    lanes_right = int(rng.integers(1, 3))
    lanes_left = int(rng.integers(0, 3)) if lanes_right == 2 else int(rng.integers(1, 3))
    park_r = 2.4 if rng.random() < 0.6 else 0.0
    park_l = 2.4 if rng.random() < 0.5 else 0.0
    road_right = -(lanes_right * lane_w + park_r)
    road_left = lanes_left * lane_w + park_l
    walk_r, walk_l = float(rng.uniform(2.5, 4.5)), float(rng.uniform(2.5, 4.5))
    strip_r, strip_l = float(rng.uniform(0.0, 5.0)), float(rng.uniform(0.0, 5.0))
    max_extent = max(abs(s_min), abs(s_max))
    curvature = 0.0
    if rng.random() < 0.5:
        radius = float(rng.uniform(250.0, 700.0))
        radius = max(radius, max_extent / 2.4)
        curvature = float(rng.choice([-1.0, 1.0])) / radius
    crossings = []
    s = s_min + rng.uniform(20, 120)
    while s < s_max:
        if abs(s) > 12:
            crossings.append(float(s))
        s += rng.uniform(80, 200)
    layout = dict(lane_width=lane_w, lanes_right=lanes_right, lanes_left=lanes_left,
                  parking_right=park_r, parking_left=park_l, road_right=road_right,
                  road_left=road_left, sidewalk_right=walk_r, sidewalk_left=walk_l,
                  strip_right=strip_r, strip_left=strip_l, crossings=crossings,
                  asphalt=float(rng.uniform(0.22, 0.34)),
                  pavement=_jitter(rng, _pick(rng, [(0.62, 0.6, 0.56), (0.7, 0.64, 0.55),
                                                    (0.55, 0.55, 0.57)]), 0.04),
                  grass=_jitter(rng, (0.26, 0.42, 0.15), 0.1), s_min=s_min, s_max=s_max)
    ego_lane = int(rng.integers(lanes_right))
    ego_l = -(ego_lane + 0.5) * lane_w

    b = _Builder()
    # --- both sides: buildings, kerb furniture, vegetation, pedestrians
    for side in (-1, 1):
        edge = road_left if side > 0 else road_right
        walk = walk_l if side > 0 else walk_r
        strip = strip_l if side > 0 else strip_r
        front = edge + side * (walk + strip)
        s = s_min + rng.uniform(-10, 0)
        while s < s_max:
            width = float(rng.uniform(8.0, 26.0))
            if rng.random() < 0.8:
                depth = float(rng.uniform(8.0, 20.0))
                setback = float(rng.uniform(0.0, 2.5))
                _add_building(b, rng, s + width / 2, front + side * setback, side, width, depth)
                if strip + setback > 1.6 and rng.random() < 0.3:
                    _add_bush(b, rng, s + width / 2, front + side * (setback / 2) - side * 0.8,
                              hedge_len=width * 0.8)
            else:  # a gap: trees and bushes on open ground
                for _ in range(int(rng.integers(0, 3))):
                    _add_tree(b, rng, s + rng.uniform(0, width), front + side * rng.uniform(1, 12))
            s += width + (0.0 if rng.random() < 0.65 else float(rng.uniform(2.0, 9.0)))
        # trees and bushes on the grass strip
        if strip > 1.2:
            s = s_min + rng.uniform(0, 10)
            while s < s_max:
                lpos = edge + side * (walk + strip / 2)
                if rng.random() < 0.6:
                    _add_tree(b, rng, s, lpos)
                else:
                    _add_bush(b, rng, s, lpos)
                s += rng.uniform(7.0, 18.0)
        # kerb furniture: street lights, sign posts, street trees
        s = s_min + rng.uniform(0, 10)
        while s < s_max:
            r = rng.random()
            if r < 0.25:
                _add_pole(b, rng, s, edge + side * 0.45, side, "light")
            elif r < 0.37:
                _add_pole(b, rng, s, edge + side * 0.35, side, "sign")
            elif r < 0.6 and walk > 3.0:
                _add_tree(b, rng, s, edge + side * 0.7, max_crown=1.8)
            s += rng.uniform(8.0, 16.0)
        # pedestrians walk along the pavement at their own lateral offset
        n_ped = rng.poisson(cfg.pedestrians * (s_max - s_min) / 14.0)
        for _ in range(n_ped):
            speed = 0.0 if rng.random() < 0.2 else float(rng.uniform(0.8, 1.7))
            direction = float(rng.choice([-1.0, 1.0]))
            lpos = edge + side * rng.uniform(1.3, max(1.35, walk - 0.35))
            s0 = rng.uniform(s_min, s_max) - direction * speed * duration * rng.uniform(0, 1)
            _add_pedestrian(b, rng, s0, lpos, direction * speed, 0.0 if direction > 0 else math.pi)

    # --- parked vehicles
    for side, park in ((-1, park_r), (1, park_l)):
        if park <= 0:
            continue
        edge = road_left if side > 0 else road_right
        lpos = edge - side * park / 2
        s = s_min + rng.uniform(0, 6)
        while s < s_max:
            kind = _pick(rng, ["car"] * 7 + ["van"] * 2 + ["truck"])
            if rng.random() < min(0.9, 0.55 * cfg.traffic):
                yaw = (0.0 if side < 0 else math.pi) + rng.uniform(-0.03, 0.03)
                length = _add_vehicle(b, rng, kind, s + 4.5, lpos, 0.0, yaw)
                s += length + rng.uniform(0.8, 3.0)
            else:
                s += rng.uniform(4.0, 8.0)

    # --- moving vehicles, one speed per lane (no lane changes, so no collisions)
    lanes = [(-(i + 0.5) * lane_w, 1.0, i == ego_lane) for i in range(lanes_right)]
    lanes += [((i + 0.5) * lane_w, -1.0, False) for i in range(lanes_left)]
    for lpos, direction, is_ego_lane in lanes:
        speed = ego_speed if is_ego_lane else float(rng.uniform(4.0, 14.0))
        lo = s_min - speed * duration - 10 if direction > 0 else s_min - 10
        hi = s_max + 10 if direction > 0 else s_max + speed * duration + 10
        s = lo + rng.uniform(0, 20)
        while s < hi:
            kind = _pick(rng, ["car"] * 6 + ["van"] * 2 + ["truck"] * 2)
            length = {"car": 4.8, "van": 5.6, "truck": 9.0}[kind]
            if is_ego_lane and -10.0 - length / 2 < s < 10.0 + length / 2:
                s += 3.0
                continue
            _add_vehicle(b, rng, kind, s, lpos, direction * speed, 0.0 if direction > 0 else math.pi)
            s += length + rng.uniform(6.0, 45.0) / max(cfg.traffic, 0.05)

    objs = b.objs
    prims = b.prims
    if not prims:
        raise RuntimeError("the scene generator produced no objects")
    sun_el = math.radians(rng.uniform(25, 65))
    sun_az = rng.uniform(0, 2 * math.pi)
    sun = torch.tensor([math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az),
                        math.sin(sun_el)], dtype=torch.float32)
    sky = dict(horizon=_jitter(rng, (0.78, 0.84, 0.9), 0.03),
               zenith=_jitter(rng, (0.3, 0.48, 0.78), 0.06),
               cloudiness=float(rng.uniform(0.0, 0.6)), seed=int(rng.integers(1 << 20)))

    def t64(x):
        return torch.tensor(np.asarray(x, dtype=np.float64), dtype=F64)

    rest = torch.zeros(len(prims), 4, 4, dtype=F64)
    rest[:, :3, :3] = t64([p["rot"] for p in prims])
    rest[:, :3, 3] = t64([p["center"] for p in prims])
    rest[:, 3, 3] = 1.0
    return Scene(
        road=Road(curvature), layout=layout, sky=sky, sun=sun,
        ambient=float(rng.uniform(0.35, 0.5)), ego_s0=0.0, ego_l=ego_l, ego_speed=ego_speed,
        obj_class=torch.tensor([o[0] for o in objs], dtype=torch.int64),
        obj_s0=t64([o[1] for o in objs]), obj_l=t64([o[2] for o in objs]),
        obj_v=t64([o[3] for o in objs]), obj_yaw=t64([o[4] for o in objs]),
        prim_obj=torch.tensor([p["obj"] for p in prims], dtype=torch.int64),
        prim_kind=torch.tensor([p["kind"] for p in prims], dtype=torch.int64),
        prim_size=torch.tensor([p["size"] for p in prims], dtype=torch.float32),
        prim_rest=rest,
        prim_pivot=t64([p["pivot"] for p in prims]),
        prim_swing=t64([p["swing"] for p in prims]),
        prim_spin=t64([p["spin"] for p in prims]),
        prim_mat=torch.tensor([p["mat"] for p in prims], dtype=torch.int64),
        prim_col=torch.tensor([[p["col0"], p["col1"]] for p in prims], dtype=torch.float32),
        prim_par=torch.tensor([p["par"] for p in prims], dtype=torch.float32),
    )
