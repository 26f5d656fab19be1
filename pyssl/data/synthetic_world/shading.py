"""Procedural materials, sky and lighting (all vectorised torch; no image textures).

Every texture is a function of a surface point in its primitive's own frame (or, for the
static ground, of world / road coordinates), so appearance moves rigidly with objects and
optical flow ground truth is photometrically consistent. Each material is class-specific in
colour, pattern and scale, with per-object variation (colours and pattern parameters drawn
per object). Edges and noise octaves are box-filtered over the pixel's footprint on the
surface (``fp``, metres), which keeps distant surfaces free of aliasing.
"""

from __future__ import annotations

import math

import torch

# material ids (what ``prim_mat`` holds)
WALL, PAINT, CABIN, TIRE, CARGO, FOLIAGE, BARK, CLOTH, SKIN, METAL, SIGN, GLASS = range(1, 13)

# LiDAR base reflectivity per material (index = material id; 0 unused = ground handled apart)
_RHO = torch.tensor([0.3, 0.45, 0.6, 0.08, 0.1, 0.55, 0.5, 0.4, 0.35, 0.35, 0.7, 1.0, 0.08])

_M32 = 0xFFFFFFFF
_LATTICE2 = torch.rand(256 * 256, generator=torch.Generator().manual_seed(7))
_LATTICE3 = torch.rand(64 * 64 * 64, generator=torch.Generator().manual_seed(11))

def _hash(*ints: torch.Tensor, seed=0) -> torch.Tensor:
    """Integer lattice coordinates (int64 tensors) -> floats in [0, 1) (a proper integer hash;
    used for per-cell random values such as window lighting)."""
    primes = (374761393, 668265263, 2147483647, 1103515245)
    h = torch.as_tensor(seed, dtype=torch.int64) * 2246822519 & _M32
    for p, x in zip(primes, ints):
        h = (h + (x & _M32) * p) & _M32
        h = ((h ^ (h >> 15)) * 2246822519) & _M32
    h = ((h ^ (h >> 13)) * 3266489917) & _M32
    h = h ^ (h >> 16)
    return h.to(torch.float32) * (1.0 / 4294967296.0)


def _smooth(f):
    return f * f * (3.0 - 2.0 * f)


def _seed_offset(seed, axis: int):
    """A per-seed shift of the noise lattice (seed: int or int64 tensor)."""
    golden = (0.6180339887, 0.4142135624, 0.7320508076)[axis]
    if isinstance(seed, torch.Tensor):
        return torch.remainder(seed.to(torch.float64) * golden, 1.0).float() * 256.0 + 0.5
    return math.fmod(seed * golden, 1.0) * 256.0 + 0.5


def value_noise(coords: list[torch.Tensor], seed) -> torch.Tensor:
    """Smooth value noise in [0, 1], 2-D or 3-D: random values on the integer lattice (a fixed
    table, period 256 cells in 2-D and 64 in 3-D), smoothstep-interpolated; ``seed`` shifts
    the lattice."""
    coords = [c + _seed_offset(seed, a) for a, c in enumerate(coords)]
    fl = [torch.floor(c) for c in coords]
    fr = [_smooth(c - f) for c, f in zip(coords, fl)]
    if len(coords) == 2:
        ix, iy = (f.to(torch.int64) & 255 for f in fl)
        ix1, iy1 = (ix + 1) & 255, (iy + 1) & 255
        r0, r1 = ix * 256, ix1 * 256

        def tab(i):
            return _LATTICE2.index_select(0, i)
        sx, sy = fr
        return torch.lerp(torch.lerp(tab(r0 + iy), tab(r1 + iy), sx),
                          torch.lerp(tab(r0 + iy1), tab(r1 + iy1), sx), sy)
    ix, iy, iz = (f.to(torch.int64) & 63 for f in fl)
    ix1, iy1, iz1 = (ix + 1) & 63, (iy + 1) & 63, (iz + 1) & 63
    sx, sy, sz = fr

    def tab(i):
        return _LATTICE3.index_select(0, i)
    out = []
    for zz in (iz, iz1):
        a0, a1 = ix * 4096 + zz, ix1 * 4096 + zz
        b0, b1 = iy * 64, iy1 * 64
        out.append(torch.lerp(torch.lerp(tab(a0 + b0), tab(a1 + b0), sx),
                              torch.lerp(tab(a0 + b1), tab(a1 + b1), sx), sy))
    return torch.lerp(out[0], out[1], sz)


def _fade(wavelength, fp):
    """Weight of a pattern of this wavelength once box-filtered over the footprint fp."""
    return ((wavelength / fp.clamp_min(1e-6) - 2.0) * 0.5).clamp(0.0, 1.0)


def fbm(coords: list[torch.Tensor], fp, freq: float, octaves: int, seed, gain=0.5):
    """Fractal noise, zero mean, roughly in [-0.5, 0.5]; octaves finer than the footprint fade
    to their mean."""
    total = torch.zeros_like(coords[0])
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        f = freq * (2.0 ** o)
        w = _fade(1.0 / f, fp) * amp
        norm += amp
        amp *= gain
        if o == 0 or bool((w == amp / gain).all()):
            total = total + w * (value_noise([c * f for c in coords], seed + 101 * o) - 0.5)
            continue
        idx = (w > 0).nonzero(as_tuple=True)[0]  # octaves finer than the footprint: skipped
        if idx.numel() == 0:
            break
        sd = seed.index_select(0, idx) if isinstance(seed, torch.Tensor) and seed.dim() else seed
        n = value_noise([c.index_select(0, idx) * f for c in coords], sd + 101 * o) - 0.5
        total = total.index_add(0, idx, w.index_select(0, idx) * n)
    return total / norm


def band(d, half_width, fp):
    """Coverage of the band |d| <= half_width by a box filter of width fp centred at d."""
    fp = fp.clamp_min(1e-6)
    lo = torch.maximum(d - 0.5 * fp, -half_width + 0.0 * d)
    hi = torch.minimum(d + 0.5 * fp, half_width + 0.0 * d)
    return ((hi - lo) / fp).clamp(0.0, 1.0)


def periodic_band(x, period, center, half_width, fp):
    """``band`` repeated with a period along x (centre of each band at center + k * period);
    patterns finer than the footprint fade to their mean coverage."""
    d = torch.remainder(x - center + 0.5 * period, period) - 0.5 * period
    cov = band(d, half_width, fp)
    mean = 2.0 * half_width / period
    w = _fade(torch.as_tensor(period), fp)
    return torch.lerp(mean + 0.0 * cov, cov, w)


def _lum(rgb):
    return rgb @ torch.tensor([0.299, 0.587, 0.114])


def _face_coords(p, n):
    """2-D coordinates on a box face (horizontal, vertical) or on a top face (x, y)."""
    ax = n.abs().argmax(-1)
    u = torch.where(ax == 0, p[:, 1], p[:, 0])
    v = torch.where(ax == 2, p[:, 1], p[:, 2])
    return u, v, ax


def material_albedo(mat, p, n, size, col0, col1, par, fp):
    """Albedo [N, 3] in [0, 1] and LiDAR reflectivity [N] of object surfaces.

    mat [N] material ids, p/n [N, 3] point and outward normal in the primitive frame, size
    [N, 3] the primitive's half extents, col0/col1 [N, 3] per-object colours, par [N, 4]
    per-object pattern parameters (meaning per material; par[:, 3] = integer noise seed),
    fp [N] footprint (metres)."""
    out = torch.zeros_like(p)
    rho = torch.zeros_like(p[:, 0])
    for m in torch.unique(mat).tolist():
        idx = (mat == m).nonzero(as_tuple=True)[0]
        fn = _MATERIALS[m]
        a = fn(*(x.index_select(0, idx) for x in (p, n, size, col0, col1, par, fp))).clamp(0.0, 1.0)
        out.index_copy_(0, idx, a)
        rho.index_copy_(0, idx, _RHO[m] * (0.5 + 0.5 * _lum(a)))
    return out, rho


def _seed(par):
    return par[:, 3].to(torch.int64)


def _wall(p, n, h, c0, c1, par, fp):
    u, v, ax = _face_coords(p, n)
    seed = _seed(par)
    top = ax == 2
    height = v + h[:, 2]                      # above the block's base
    u0 = u + torch.where(ax == 0, h[:, 1], h[:, 0])
    spacing, floor_h, frac = par[:, 0], par[:, 1], par[:, 2]
    grain = 1.0 + 0.3 * fbm([u0, height], fp, 0.35, 4, seed, gain=0.6)
    wall = c0 * grain[:, None]
    # windows: a grid of (frac*spacing) x (0.5*floor) panes, none below 1 m or in the parapet
    ucell = torch.floor(u0 / spacing)
    vcell = torch.floor(height / floor_h)
    wu = periodic_band(u0, spacing, 0.5 * spacing, 0.5 * frac * spacing, fp)
    wv = periodic_band(height, floor_h, 0.55 * floor_h, 0.27 * floor_h, fp)
    limit = ((height > 1.0) & (height < 2.0 * h[:, 2] - 0.8)).float()
    cov = (wu * wv * limit)[:, None]
    lit = 0.55 + 0.9 * _hash(ucell.to(torch.int64), vcell.to(torch.int64), seed=seed)
    pane = c1 * lit[:, None]
    col = torch.lerp(wall, pane, cov)
    # a darker band at street level (shop fronts / plinth)
    plinth = (band(height - 0.5, 0.5 + 0.0 * height, fp))[:, None]
    col = torch.lerp(col, c0 * 0.6, 0.7 * plinth)
    roof = (0.38 + 0.1 * fbm([p[:, 0], p[:, 1]], fp, 0.5, 3, seed + 3))[:, None].expand_as(col)
    return torch.where(top[:, None], roof, col)


def _paint(p, n, h, c0, c1, par, fp):
    seed = _seed(par)
    z = p[:, 2] + h[:, 2]
    col = c0 * (1.0 + 0.05 * fbm([p[:, 0], p[:, 1], p[:, 2]], fp, 2.0, 2, seed))[:, None]
    # dark skirt / bumpers at the bottom
    skirt = band(z - 0.06, 0.09 + 0.0 * z, fp)
    col = torch.lerp(col, torch.full_like(col, 0.08), skirt[:, None])
    front, back = n[:, 0] > 0.5, n[:, 0] < -0.5
    yl = h[:, 1] - 0.32
    lamp = band(p[:, 1].abs() - yl, 0.18 + 0.0 * z, fp) * band(p[:, 2] - 0.3 * h[:, 2], 0.12 + 0.0 * z, fp)
    head = torch.tensor([0.95, 0.95, 0.8]).expand_as(col)
    tail = torch.tensor([0.75, 0.05, 0.05]).expand_as(col)
    col = torch.where(front[:, None], torch.lerp(col, head, lamp[:, None]), col)
    col = torch.where(back[:, None], torch.lerp(col, tail, lamp[:, None]), col)
    grille = band(p[:, 1], 0.35 * h[:, 1], fp) * band(p[:, 2] - 0.1 * h[:, 2], 0.1 + 0.0 * z, fp)
    col = torch.where(front[:, None], torch.lerp(col, torch.full_like(col, 0.1), grille[:, None]), col)
    # door seams on the sides
    side = n[:, 1].abs() > 0.5
    seam = periodic_band(p[:, 0], 1.1, 0.0, 0.012 + 0.0 * z, fp)
    col = torch.where(side[:, None], col * (1.0 - 0.6 * seam)[:, None], col)
    return col


def _cabin(p, n, h, c0, c1, par, fp):
    u, v, ax = _face_coords(p, n)
    hu = torch.where(ax == 0, h[:, 1], h[:, 0])
    margin = 0.08
    glass = band(u, hu - margin, fp) * band(v - 0.03, h[:, 2] - margin, fp)
    side = ax == 1
    pillar = band(p[:, 0] - par[:, 0], 0.06 + 0.0 * u, fp)
    glass = torch.where(side, glass * (1.0 - pillar), glass)
    refl = (0.75 + 0.5 * (v / h[:, 2]).clamp(-1, 1) * 0.5)[:, None]
    gcol = c1 * refl
    col = torch.lerp(c0, gcol, glass[:, None])
    return torch.where((ax == 2)[:, None], c0, col)


def _tire(p, n, h, c0, c1, par, fp):
    r = (p[:, 0] ** 2 + p[:, 1] ** 2).sqrt() / h[:, 0]
    ang = torch.atan2(p[:, 1], p[:, 0])
    rubber = torch.full_like(p, 0.07)
    cap = n[:, 2].abs() > 0.5
    # hub: a metal disc with 5 dark holes
    hub = band(r, 0.62 + 0.0 * r, fp / h[:, 0])
    spokes = periodic_band(ang * h[:, 0] * 0.45, 2 * math.pi * h[:, 0] * 0.45 / 5, 0.0,
                           0.13 * h[:, 0] + 0.0 * r, fp)
    hub_col = torch.lerp(c0, torch.full_like(c0, 0.05), (spokes * band(r - 0.38, 0.17 + 0.0 * r, fp / h[:, 0]))[:, None])
    cap_col = torch.lerp(rubber, hub_col, hub[:, None])
    tread = periodic_band(ang * h[:, 0], 2 * math.pi * h[:, 0] / 24, 0.0, 0.02 + 0.0 * r, fp)
    side_col = rubber * (1.0 + 1.2 * tread)[:, None]
    return torch.where(cap[:, None], cap_col, side_col)


def _cargo(p, n, h, c0, c1, par, fp):
    u, v, ax = _face_coords(p, n)
    seed = _seed(par)
    ribs = periodic_band(u, 0.45, 0.0, 0.04 + 0.0 * u, fp)
    col = c0 * (1.0 - 0.25 * ribs + 0.06 * fbm([u, v], fp, 1.0, 2, seed))[:, None]
    stripe = band(v - par[:, 0] * h[:, 2], 0.25 + 0.0 * v, fp)
    col = torch.where((ax != 2)[:, None], torch.lerp(col, c1, stripe[:, None]), col * 0.8)
    return col


def _foliage(p, n, h, c0, c1, par, fp):
    seed = _seed(par)
    xyz = [p[:, 0], p[:, 1], p[:, 2]]
    mix = (0.5 + 1.6 * fbm(xyz, fp, 0.9, 3, seed)).clamp(0, 1)
    col = torch.lerp(c0, c1, mix[:, None])
    leaf = 1.0 + 0.7 * fbm(xyz, fp, 6.0, 2, seed + 11)
    under = 0.7 + 0.3 * (p[:, 2] / h[:, 2]).clamp(-1, 1).add(1.0).mul(0.5)
    return col * (leaf * under)[:, None]


def _bark(p, n, h, c0, c1, par, fp):
    seed = _seed(par)
    ang = torch.atan2(p[:, 1], p[:, 0]) * 0.3
    streak = fbm([ang * 8.0, p[:, 2] * 0.7], fp * 8.0 / (h[:, 0] + 0.1), 1.0, 3, seed)
    return c0 * (1.0 + 0.8 * streak)[:, None]


def _cloth(p, n, h, c0, c1, par, fp):
    seed = _seed(par)
    return c0 * (1.0 + 0.25 * fbm([p[:, 0], p[:, 1], p[:, 2]], fp, 8.0, 2, seed))[:, None]


def _skin(p, n, h, c0, c1, par, fp):
    q = p / h
    hair = (q[:, 2] > 0.35) | ((q[:, 0] < -0.25) & (q[:, 2] > -0.3))
    return torch.where(hair[:, None], c1, c0)


def _metal(p, n, h, c0, c1, par, fp):
    seed = _seed(par)
    return c0 * (1.0 + 0.15 * fbm([p[:, 0], p[:, 1], p[:, 2]], fp, 3.0, 2, seed))[:, None]


def _sign(p, n, h, c0, c1, par, fp):
    face = n[:, 0] > 0.5
    q = torch.maximum((p[:, 1] / h[:, 1]).abs(), (p[:, 2] / h[:, 2]).abs())
    border = 1.0 - band(q, 0.78 + 0.0 * q, fp / h[:, 1])
    col = torch.lerp(c0, c1, border[:, None])
    return torch.where(face[:, None], col, torch.full_like(col, 0.45))


def _glass(p, n, h, c0, c1, par, fp):
    """Van / truck-cab upper body: paint with a glazed front and side windows up front."""
    u, v, ax = _face_coords(p, n)
    front = n[:, 0] > 0.5
    side = ax == 1
    windshield = band(u, h[:, 1] - 0.1, fp) * band(v - 0.1 * h[:, 2], 0.55 * h[:, 2], fp)
    side_win = (band(p[:, 0] - (h[:, 0] - par[:, 0]), par[:, 0] - 0.15, fp)
                * band(v - 0.15 * h[:, 2], 0.45 * h[:, 2], fp))
    g = torch.where(front, windshield, torch.where(side, side_win, torch.zeros_like(u)))
    return torch.lerp(c0, c1, g[:, None])


_MATERIALS = {WALL: _wall, PAINT: _paint, CABIN: _cabin, TIRE: _tire, CARGO: _cargo,
              FOLIAGE: _foliage, BARK: _bark, CLOTH: _cloth, SKIN: _skin, METAL: _metal,
              SIGN: _sign, GLASS: _glass}


def ground_albedo(x, y, s, l, layout: dict, fp, seed: int):
    """Albedo [N, 3], class ids [N] and LiDAR reflectivity [N] of the ground plane at world
    (x, y) with road coordinates (s, l)."""
    from .classes import ROAD, SIDEWALK, TERRAIN

    r_lo, r_hi = layout["road_right"], layout["road_left"]
    sw_r, sw_l = layout["sidewalk_right"], layout["sidewalk_left"]
    on_road = (l >= r_lo) & (l <= r_hi)
    on_walk = ((l < r_lo) & (l >= r_lo - sw_r)) | ((l > r_hi) & (l <= r_hi + sw_l))
    label = torch.where(on_road, ROAD, torch.where(on_walk, SIDEWALK, TERRAIN))
    col = torch.zeros(x.shape[0], 3)
    rho = torch.full_like(x, 0.45)

    idx = on_road.nonzero(as_tuple=True)[0]
    if idx.numel():
        c_, r_ = _road(*(v.index_select(0, idx) for v in (x, y, s, l)), layout,
                       fp.index_select(0, idx), seed)
        col.index_copy_(0, idx, c_)
        rho.index_copy_(0, idx, r_)
    idx = on_walk.nonzero(as_tuple=True)[0]
    if idx.numel():
        col.index_copy_(0, idx, _pavement(*(v.index_select(0, idx) for v in (x, y, s, l)), layout,
                                          fp.index_select(0, idx), seed))
        rho.index_fill_(0, idx, 0.35)
    idx = (~on_road & ~on_walk).nonzero(as_tuple=True)[0]
    if idx.numel():
        col.index_copy_(0, idx, _grass(x.index_select(0, idx), y.index_select(0, idx), layout,
                                       fp.index_select(0, idx), seed))
    return col.clamp(0, 1), label, rho


def _road(x, y, s, l, layout, fp, seed):
    xs = [x, y]
    g = layout["asphalt"]
    asphalt = g * (1.0 + 0.35 * fbm(xs, fp, 0.3, 2, seed + 1) + 0.3 * fbm(xs, fp, 4.0, 3, seed + 2))
    col = asphalt[:, None] * torch.tensor([1.0, 1.0, 1.04])
    paint = torch.zeros_like(x)
    yellow = torch.zeros_like(x)
    lw = layout["lane_width"]
    hw = torch.full_like(x, 0.07)
    # centre line (double yellow when traffic runs both ways)
    if layout["lanes_left"] > 0:
        yellow = torch.maximum(band(l - 0.12, hw, fp), band(l + 0.12, hw, fp))
    # dashed lines between lanes of one direction, solid edge lines at the driving-lane edges
    dashes = periodic_band(s, 9.0, 1.5, 1.5 + 0.0 * s, fp)
    for i in range(1, layout["lanes_right"]):
        paint = torch.maximum(paint, band(l + i * lw, hw, fp) * dashes)
    for i in range(1, layout["lanes_left"]):
        paint = torch.maximum(paint, band(l - i * lw, hw, fp) * dashes)
    paint = torch.maximum(paint, band(l + layout["lanes_right"] * lw, hw, fp))
    if layout["lanes_left"] > 0:
        paint = torch.maximum(paint, band(l - layout["lanes_left"] * lw, hw, fp))
    # zebra crossings
    for sc in layout["crossings"]:
        near = (s - sc).abs() < 2.0 + fp
        if near.any():
            zebra = band(s - sc, 2.0 + 0.0 * s, fp) * periodic_band(l, 1.0, 0.0, 0.25 + 0.0 * l, fp)
            paint = torch.maximum(paint, zebra)
    col = torch.lerp(col, torch.tensor([0.85, 0.85, 0.82]).expand_as(col), paint[:, None])
    col = torch.lerp(col, torch.tensor([0.85, 0.68, 0.15]).expand_as(col), yellow[:, None])
    return col, 0.18 + 0.8 * torch.maximum(paint, yellow)


def _pavement(x, y, s, l, layout, fp, seed):
    pav = torch.tensor(layout["pavement"])
    walk_u = torch.where(l > 0, l - layout["road_left"], layout["road_right"] - l)
    tiles = torch.maximum(periodic_band(walk_u, 0.6, 0.0, 0.015 + 0.0 * l, fp),
                          periodic_band(s, 0.6, 0.0, 0.015 + 0.0 * l, fp))
    walk = pav * (1.0 + 0.15 * fbm([x, y], fp, 1.5, 2, seed + 5))[:, None]
    walk = walk * (1.0 - 0.35 * tiles)[:, None]
    kerb = band(walk_u - 0.12, 0.12 + 0.0 * l, fp)
    return torch.lerp(walk, torch.full_like(walk, 0.72), kerb[:, None])


def _grass(x, y, layout, fp, seed):
    xs = [x, y]
    mix = (0.5 + 1.5 * fbm(xs, fp, 0.25, 3, seed + 8)).clamp(0, 1)
    grass = torch.lerp(torch.tensor(layout["grass"]).expand(x.shape[0], 3),
                       torch.tensor([0.42, 0.36, 0.25]).expand(x.shape[0], 3), mix[:, None])
    return grass * (1.0 + 0.5 * fbm(xs, fp, 5.0, 2, seed + 9))[:, None]


def sky_color(d: torch.Tensor, sky: dict) -> torch.Tensor:
    """Sky colour [N, 3] for world ray directions d [N, 3] (a function of direction only, so
    that sky flow is pure rotation and photometrically consistent)."""
    up = d[:, 2].clamp(0.0, 1.0)
    hor = torch.tensor(sky["horizon"])
    zen = torch.tensor(sky["zenith"])
    col = torch.lerp(hor.expand(d.shape[0], 3), zen.expand(d.shape[0], 3), (up ** 0.6)[:, None])
    denom = d[:, 2].clamp_min(0.02) + 0.15
    px, py = d[:, 0] / denom, d[:, 1] / denom
    fp = torch.full_like(px, 0.004)
    cloud = (fbm([px * 0.8, py * 0.8], fp, 1.0, 4, sky["seed"]) * 2.0 + sky["cloudiness"] - 0.5).clamp(0, 1)
    cloud = cloud * (d[:, 2] > -0.05)
    return torch.lerp(col, torch.tensor([0.95, 0.95, 0.97]).expand_as(col), (0.8 * cloud)[:, None])


def shade(albedo, n_world, sun, ambient):
    """Lambertian sun + ambient."""
    lam = (n_world @ sun).clamp_min(0.0)
    return albedo * (ambient + (1.0 - ambient) * lam)[:, None]


def fog(color, dist, horizon, scale=220.0):
    f = 1.0 - torch.exp(-(dist / scale) ** 2)
    return torch.lerp(color, torch.tensor(horizon).expand_as(color), f[:, None])
