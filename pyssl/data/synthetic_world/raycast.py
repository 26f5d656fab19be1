"""Vectorised ray casting against boxes, cylinders, ellipsoids and the ground plane (torch).

Rays come in tiles: ``G`` groups of ``T`` rays that share an origin (a 16x16 pixel block of one
camera, or a block of LiDAR firings). Each primitive's bounding sphere is tested against each
tile's bounding cone; only the surviving (tile, primitive) pairs are intersected, ray by ray,
in the primitive's own frame (canonical shapes centred at the origin):

* box: ``|x| <= hx, |y| <= hy, |z| <= hz`` (size = half extents);
* cylinder: axis z, ``x^2 + y^2 <= r^2, |z| <= hz`` (size = (r, r, hz));
* ellipsoid: ``(x/rx)^2 + (y/ry)^2 + (z/rz)^2 <= 1`` (size = radii).

The nearest hit per ray wins (one ``scatter_reduce(amin)`` over an int64 key that packs the
float32 distance's bit pattern above the primitive index). The ground plane (z = 0 in the world) is
intersected analytically by every ray. Intersections are exact (closed form), up to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BOX, CYLINDER, ELLIPSOID = 0, 1, 2
KIND_NAMES = {BOX: "box", CYLINDER: "cylinder", ELLIPSOID: "ellipsoid"}

_PRIM_BITS = 21
_PRIM_MASK = (1 << _PRIM_BITS) - 1
_INF_BITS = 0x7F800000  # float32 +inf
_NO_HIT_KEY = (_INF_BITS << _PRIM_BITS) | _PRIM_MASK
_CHUNK = 1 << 20  # ray-primitive tests per batch (bounds memory)


@dataclass
class Primitives:
    """Primitives posed in the (render) world frame at one instant. float32 unless noted."""

    center: torch.Tensor   # [K, 3]
    rot: torch.Tensor      # [K, 3, 3] local-to-world rotation
    size: torch.Tensor     # [K, 3] half extents / radii
    kind: torch.Tensor     # [K] int64

    @property
    def radius(self) -> torch.Tensor:
        r = self.size.norm(dim=-1)
        return torch.where(self.kind == ELLIPSOID, self.size.amax(-1), r)

    def __len__(self) -> int:
        return self.kind.shape[0]


def _cull(origins, dirs, t_far, prims: Primitives):
    """(tile, primitive) pairs whose bounding sphere can meet the tile's bounding cone.

    A sphere (centre c, radius r) at distance D from the apex meets a cone (axis a, half
    angle h) iff D <= r or angle(a, c - o) <= h + asin(r / D), i.e. (no trigonometry)
    ``a.(c - o) >= cos(h) sqrt(D^2 - r^2) - sin(h) r``; plus ``D - r <= t_far``.
    Evaluated in float64 with a small slack, so it never drops a real hit.
    """
    axis = torch.nn.functional.normalize(dirs.sum(1), dim=-1)                  # [G, 3]
    cos_h = (dirs * axis[:, None]).sum(-1).amin(1).clamp(-1.0, 1.0).double()  # [G]
    cos_h = (cos_h - 1e-4).clamp(-1.0, 1.0)                                    # slack
    sin_h = (1.0 - cos_h * cos_h).clamp_min(0.0).sqrt()
    c = prims.center.double()
    r = prims.radius.double() + 1e-3
    out_t, out_p = [], []
    # tiles sharing an origin (one sensor) are tested together: [G_s, K] per sensor
    uniq, inverse = torch.unique(origins, dim=0, return_inverse=True)
    for si in range(uniq.shape[0]):
        tiles = (inverse == si).nonzero(as_tuple=True)[0]
        v = c - uniq[si].double()                                              # [K, 3]
        d2 = (v * v).sum(-1)
        dist = d2.sqrt()
        near_ok = dist - r <= t_far[tiles].double().amax()
        kid = near_ok.nonzero(as_tuple=True)[0]
        if kid.numel() == 0:
            continue
        v, d2, dist, rk = v[kid], d2[kid], dist[kid], r[kid]
        along = axis[tiles].double() @ v.T                                     # [G_s, K']
        tangent = (d2 - rk * rk).clamp_min(0.0).sqrt()
        ok = along >= cos_h[tiles, None] * tangent[None] - sin_h[tiles, None] * rk[None]
        ok &= (dist - rk)[None] <= t_far[tiles].double()[:, None]
        ok |= (dist <= rk)[None]
        ti, pi = ok.nonzero(as_tuple=True)
        out_t.append(tiles[ti])
        out_p.append(kid[pi])
    if not out_t:
        e = torch.zeros(0, dtype=torch.int64)
        return e, e
    return torch.cat(out_t), torch.cat(out_p)


def _intersect_box(o, d, h, near):
    o, h = o[:, None, :], h[:, None, :]
    tiny = torch.full_like(d, 1e-20)
    d_safe = torch.where(d.abs() < 1e-20, torch.copysign(tiny, d), d)
    inv = 1.0 / d_safe
    t1 = (-h - o) * inv
    t2 = (h - o) * inv
    tmin = torch.minimum(t1, t2).amax(-1)
    tmax = torch.maximum(t1, t2).amin(-1)
    hit = (tmax >= tmin) & (tmin > near[:, None])
    return torch.where(hit, tmin, torch.full_like(tmin, float("inf")))


def _intersect_cylinder(o, d, size, near):
    ox, oy, oz = o[:, 0:1], o[:, 1:2], o[:, 2:3]
    r, hz = size[:, 0:1], size[:, 2:3]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    inf = torch.full_like(dx, float("inf"))
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    c = ox * ox + oy * oy - r * r
    disc = b * b - a * c
    ts = (-b - disc.clamp_min(0.0).sqrt()) / a.clamp_min(1e-20)
    zs = oz + ts * dz
    side = (disc >= 0) & (a > 1e-20) & (zs.abs() <= hz) & (ts > near[:, None])
    cap_z = torch.where(oz > 0, hz, -hz)
    dz_safe = torch.where(dz.abs() < 1e-20, torch.full_like(dz, 1e-20), dz)
    tc = (cap_z - oz) / dz_safe
    xc, yc = ox + tc * dx, oy + tc * dy
    cap = (xc * xc + yc * yc <= r * r) & (tc > near[:, None]) & (oz.abs() > hz)
    return torch.minimum(torch.where(side, ts, inf), torch.where(cap, tc, inf))


def _intersect_ellipsoid(o, d, size, near):
    inv_r = 1.0 / size
    o2 = (o * inv_r)[:, None, :]
    d2 = d * inv_r[:, None, :]
    a = (d2 * d2).sum(-1)
    b = (o2 * d2).sum(-1)
    c = (o2 * o2).sum(-1) - 1.0
    disc = b * b - a * c
    t = (-b - disc.clamp_min(0.0).sqrt()) / a
    hit = (disc >= 0) & (t > near[:, None])
    return torch.where(hit, t, torch.full_like(t, float("inf")))


_INTERSECT = {BOX: _intersect_box, CYLINDER: _intersect_cylinder, ELLIPSOID: _intersect_ellipsoid}


def _encode(t: torch.Tensor, prim: torch.Tensor) -> torch.Tensor:
    bits = t.contiguous().view(torch.int32).to(torch.int64)
    return (bits << _PRIM_BITS) | prim


def cast(origins, dirs, t_near, t_far, prims: Primitives, ground_z: float | None = 0.0,
         stats=None, cull: bool = True):
    """Nearest hit of every ray.

    origins [G, 3], dirs [G, T, 3] (unit), t_near / t_far [G] (float32, render world frame).
    Returns ``t`` [G, T] float32 (distance along the ray; inf = no hit within (near, far]) and
    ``hit`` [G, T] int64: a primitive index in [0, K), K = the ground plane z = ground_z
    (None: no ground), -1 = none. ``cull=False`` tests every ray against every primitive
    (the brute-force oracle the culled result must equal).
    """
    g, n = dirs.shape[:2]
    k = len(prims)
    if k >= _PRIM_MASK:
        raise ValueError(f"too many primitives ({k}); at most {_PRIM_MASK - 1}")
    best = torch.full((g * n,), _NO_HIT_KEY, dtype=torch.int64)
    ray_base = torch.arange(n, dtype=torch.int64)
    if k:
        if cull:
            tiles, pids = _cull(origins, dirs, t_far, prims)
        else:
            tiles = torch.arange(g).repeat_interleave(k)
            pids = torch.arange(k).repeat(g)
        if stats is not None:
            stats["pairs"] = stats.get("pairs", 0) + int(tiles.numel())
        kinds = prims.kind[pids]
        for kind, fn in _INTERSECT.items():
            sel = (kinds == kind).nonzero(as_tuple=True)[0]
            step = max(1, _CHUNK // n)
            for s in range(0, sel.numel(), step):
                idx = sel[s:s + step]
                tt, pp = tiles.index_select(0, idx), pids.index_select(0, idx)
                rot = prims.rot.index_select(0, pp)
                o_loc = ((origins.index_select(0, tt) - prims.center.index_select(0, pp))[:, None, :]
                         @ rot)[:, 0]
                d_loc = torch.bmm(dirs.index_select(0, tt), rot)
                t = fn(o_loc, d_loc, prims.size.index_select(0, pp), t_near.index_select(0, tt))
                t = torch.where(t <= t_far.index_select(0, tt)[:, None], t,
                                torch.full_like(t, float("inf")))
                key = _encode(t, pp[:, None].expand_as(t))
                best.scatter_reduce_(0, (tt[:, None] * n + ray_base).reshape(-1),
                                     key.reshape(-1), "amin")
    if ground_z is not None:
        dz = dirs[..., 2]
        oz = origins[:, 2:3] - ground_z
        tg = -oz / torch.where(dz < -1e-12, dz, torch.full_like(dz, -1e-12))
        okg = (dz < -1e-12) & (tg > t_near[:, None]) & (tg <= t_far[:, None])
        tg = torch.where(okg, tg, torch.full_like(tg, float("inf")))
        best = torch.minimum(best, _encode(tg, torch.full_like(tg, k, dtype=torch.int64)).reshape(-1))
    t = (best >> _PRIM_BITS).to(torch.int32).view(torch.float32).reshape(g, n)
    hit = (best & _PRIM_MASK).reshape(g, n)
    hit = torch.where(torch.isinf(t), torch.full_like(hit, -1), hit)
    return t, hit


def local_normals(p: torch.Tensor, size: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """Outward unit normals [N, 3] at surface points p [N, 3] (primitive frame)."""
    n = torch.zeros_like(p)
    q = p / size
    # box: the face whose normalised coordinate is largest
    axis = q.abs().argmax(-1)
    box_n = torch.zeros_like(p).scatter_(1, axis[:, None], torch.sign(q.gather(1, axis[:, None])))
    # cylinder: cap where |z|/hz beats the radial ratio
    rad = (q[:, 0] ** 2 + q[:, 1] ** 2).sqrt()
    cap = q[:, 2].abs() >= rad
    side_n = torch.stack([p[:, 0], p[:, 1], torch.zeros_like(p[:, 0])], -1)
    side_n = torch.nn.functional.normalize(side_n, dim=-1)
    cap_n = torch.zeros_like(p)
    cap_n[:, 2] = torch.sign(p[:, 2])
    cyl_n = torch.where(cap[:, None], cap_n, side_n)
    ell_n = torch.nn.functional.normalize(p / (size * size), dim=-1)
    n = torch.where((kind == BOX)[:, None], box_n, n)
    n = torch.where((kind == CYLINDER)[:, None], cyl_n, n)
    n = torch.where((kind == ELLIPSOID)[:, None], ell_n, n)
    return n


class TileLayout:
    """How an H x W ray grid (image rows x columns, or LiDAR beams x azimuths) is cut into
    th x tw tiles; border tiles repeat edge rays (their duplicates are never read back)."""

    def __init__(self, height: int, width: int, th: int, tw: int):
        self.height, self.width, self.th, self.tw = height, width, th, tw
        self.ny, self.nx = -(-height // th), -(-width // tw)
        ii = (torch.arange(self.ny)[:, None] * th + torch.arange(th)[None]).clamp(max=height - 1)
        jj = (torch.arange(self.nx)[:, None] * tw + torch.arange(tw)[None]).clamp(max=width - 1)
        rows = ii[:, None, :, None].expand(self.ny, self.nx, th, tw)
        cols = jj[None, :, None, :].expand(self.ny, self.nx, th, tw)
        #: [tiles, th*tw] row / column of each ray of each tile
        self.rows = rows.reshape(self.tiles, th * tw)
        self.cols = cols.reshape(self.tiles, th * tw)
        i = torch.arange(height)[:, None]
        j = torch.arange(width)[None]
        #: [H, W] index into the flat [tiles * th*tw] ray array of each grid cell
        self.gather_index = (((i // th) * self.nx + j // tw) * (th * tw)
                             + (i % th) * tw + j % tw)

    @property
    def tiles(self) -> int:
        return self.ny * self.nx

    @property
    def rays_per_tile(self) -> int:
        return self.th * self.tw

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[tiles * th*tw, *rest] (one sensor's rays, tile-major) -> [H, W, *rest]."""
        return x.index_select(0, self.gather_index.reshape(-1)).reshape(
            *self.gather_index.shape, *x.shape[1:])
