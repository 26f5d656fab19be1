"""Unit checks of the synthetic world's ray caster, geometry helpers and configuration."""

import math

import pytest
import torch

from pyssl.data.synthetic_world.config import WorldConfig
from pyssl.data.synthetic_world.geometry import (Road, camera_rig, intrinsics_matrix,
                                                 invert_pose, lidar_directions, make_pose,
                                                 rot_z)
from pyssl.data.synthetic_world.raycast import (BOX, CYLINDER, ELLIPSOID, Primitives,
                                                TileLayout, cast, local_normals)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors: one torch thread is faster, and immune to a busy machine's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def _prims(centers, sizes, kinds, yaws=None):
    c = torch.tensor(centers, dtype=torch.float32)
    yaw = torch.tensor(yaws if yaws is not None else [0.0] * len(centers), dtype=torch.float64)
    return Primitives(c, rot_z(yaw).float(), torch.tensor(sizes, dtype=torch.float32),
                      torch.tensor(kinds, dtype=torch.int64))


def _one_tile(dirs):
    d = torch.nn.functional.normalize(torch.tensor(dirs, dtype=torch.float32), dim=-1)
    return torch.zeros(1, 3), d[None], torch.tensor([0.01]), torch.tensor([1000.0])


def test_cast_matches_closed_form_distances():
    # box [9, 11] x [-1, 1] x [0, 2]; vertical cylinder r=1 at (0, 10); ellipsoid at (-10, 0)
    prims = _prims([[10, 0, 1], [0, 10, 1], [-10, 0, 1]],
                   [[1, 1, 1], [1, 1, 1], [2, 1, 1]], [BOX, CYLINDER, ELLIPSOID])
    o, d, near, far = _one_tile([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, 0, 1], [1, 0, 0.05]])
    o = o + torch.tensor([[0.0, 0.0, 1.0]])
    t, hit = cast(o, d, near, far, prims, ground_z=None)
    assert hit[0].tolist() == [0, 1, 2, -1, 0]
    assert t[0, 0].item() == pytest.approx(9.0, abs=1e-5)
    assert t[0, 1].item() == pytest.approx(9.0, abs=1e-5)
    assert t[0, 2].item() == pytest.approx(8.0, abs=1e-5)       # ellipsoid semi-axis 2 along x
    assert t[0, 4].item() == pytest.approx(9.0 * math.sqrt(1 + 0.05 ** 2), abs=1e-4)
    # from 3 m up, descending 0.1 per metre: above the cylinder's side at y = 9 (z = 2.1),
    # through its top cap z = 2 at y = 10; descending 0.2: into the side at y = 9 (z = 1.2)
    o, d, near, far = _one_tile([[0, 1, -0.1], [0, 1, -0.2]])
    t, hit = cast(o + torch.tensor([[0.0, 0.0, 3.0]]), d, near, far, prims, ground_z=None)
    assert hit[0].tolist() == [1, 1]
    assert t[0, 0].item() == pytest.approx(10.0 * math.sqrt(1.01), abs=1e-4)
    assert t[0, 1].item() == pytest.approx(9.0 * math.sqrt(1.04), abs=1e-4)


def test_cast_ground_plane_and_nearest_wins():
    prims = _prims([[10, 0, 1], [20, 0, 1]], [[1, 1, 1], [1, 1, 5]], [BOX, BOX])
    o, d, near, far = _one_tile([[1, 0, 0], [1, 0, -0.2], [1, 0, 0.2]])
    o = o + torch.tensor([[0.0, 0.0, 1.0]])
    t, hit = cast(o, d, near, far, prims, ground_z=0.0)
    assert hit[0, 0].item() == 0                       # the nearer box hides the farther one
    assert hit[0, 1].item() == 2                       # K = ground: z = 1 - 0.2 s = 0 at 5 m
    assert t[0, 1].item() == pytest.approx(5.0 * math.sqrt(1 + 0.04), abs=1e-4)
    assert hit[0, 2].item() == 1                       # over the first box, into the tall one
    assert t[0, 2].item() == pytest.approx(19.0 * math.sqrt(1 + 0.04), abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_culling_never_changes_the_result(seed):
    """The tile/bounding-sphere culling is conservative: identical to brute force."""
    g = torch.Generator().manual_seed(seed)
    k = 60
    centers = torch.rand(k, 3, generator=g) * torch.tensor([80.0, 80.0, 6.0]) - torch.tensor([40.0, 40.0, 0.0])
    sizes = torch.rand(k, 3, generator=g) * 2.0 + 0.1
    kinds = torch.randint(0, 3, (k,), generator=g)
    yaw = torch.rand(k, generator=g, dtype=torch.float64) * 6.28
    prims = Primitives(centers, rot_z(yaw).float(), sizes, kinds)
    names, cam_to_lidar = camera_rig(6)
    kmat = intrinsics_matrix(40, 80, 70.0).float()
    layout = TileLayout(40, 80, 16, 16)
    d = torch.stack([(layout.cols.float() - kmat[0, 2]) / kmat[0, 0],
                     (layout.rows.float() - kmat[1, 2]) / kmat[1, 1],
                     torch.ones(layout.rows.shape)], -1)
    d = torch.nn.functional.normalize(d, dim=-1)
    dirs = torch.einsum("cij,gtj->cgti", cam_to_lidar[:, :3, :3].float(), d).reshape(-1, d.shape[1], 3)
    origins = cam_to_lidar[:, :3, 3].float().repeat_interleave(layout.tiles, 0) + torch.tensor([0, 0, 1.5])
    lid = lidar_directions(8, 64, 10, -30).reshape(-1, 256, 3).float()
    dirs = torch.cat([dirs, lid])
    origins = torch.cat([origins, torch.zeros(lid.shape[0], 3) + torch.tensor([0, 0, 1.8])])
    near = torch.full((dirs.shape[0],), 0.05)
    far = torch.full((dirs.shape[0],), 60.0)
    t1, h1 = cast(origins, dirs, near, far, prims, ground_z=0.0)
    t2, h2 = cast(origins, dirs, near, far, prims, ground_z=0.0, cull=False)
    assert (h1 >= 0).float().mean() > 0.3          # the scene is actually hit
    assert torch.equal(h1, h2)
    assert torch.equal(t1, t2)


def test_normals_point_outwards():
    p = torch.tensor([[1.0, 0.2, -0.3], [0.3, 0.0, 2.0], [0.0, 0.5, 0.0], [0.0, 0.0, -1.0]])
    size = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 2.0], [1.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    kind = torch.tensor([BOX, CYLINDER, ELLIPSOID, ELLIPSOID])
    n = local_normals(p, size, kind)
    assert torch.allclose(n, torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, -1]]))


def test_tile_layout_round_trip_with_ragged_border():
    lay = TileLayout(37, 53, 16, 16)
    flat_rows = lay.rows.reshape(-1)
    flat_cols = lay.cols.reshape(-1)
    assert torch.equal(lay.to_grid(flat_rows), torch.arange(37)[:, None].expand(37, 53))
    assert torch.equal(lay.to_grid(flat_cols), torch.arange(53)[None].expand(37, 53))


@pytest.mark.parametrize("curvature", [0.0, 1 / 300.0, -1 / 450.0])
def test_road_coordinates_round_trip(curvature):
    road = Road(curvature)
    s = torch.linspace(-250, 400, 50, dtype=torch.float64)
    l = torch.linspace(-30, 30, 50, dtype=torch.float64)
    x, y, yaw = road.to_world(s, l)
    s2, l2 = road.from_world(x, y)
    assert torch.allclose(s2, s, atol=1e-6) and torch.allclose(l2, l, atol=1e-6)
    # heading is the derivative of the centreline
    x1, y1, _ = road.to_world(s + 1e-4, torch.zeros_like(s))
    x0, y0, _ = road.to_world(s, torch.zeros_like(s))
    assert torch.allclose(torch.atan2(y1 - y0, x1 - x0), yaw, atol=1e-4)


def test_camera_rig_and_intrinsics_conventions():
    names, cam_to_lidar = camera_rig(6)
    assert names == ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK",
                     "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
    rot = cam_to_lidar[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=rot.dtype).expand(6, 3, 3))
    assert torch.allclose(torch.linalg.det(rot), torch.ones(6, dtype=rot.dtype))
    lidar_to_cam = invert_pose(cam_to_lidar)
    # a point 10 m ahead, 1 m left and 1 m up: front camera sees it left (u < cx) and up (v < cy)
    p = torch.tensor([10.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    pc = lidar_to_cam[0] @ p
    assert pc[2] > 9 and pc[0] < 0 and pc[1] < 0
    # back camera: a point behind is in front of it
    assert (lidar_to_cam[3] @ torch.tensor([-10.0, 0, 0, 1], dtype=torch.float64))[2] > 8
    k = intrinsics_matrix(224, 448, 70.0)
    assert k[2].tolist() == [0.0, 0.0, 1.0]
    assert k[0, 2] == pytest.approx(223.5) and k[1, 2] == pytest.approx(111.5)
    assert 2 * math.degrees(math.atan(224 / k[0, 0])) == pytest.approx(70.0)
    assert make_pose(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)).shape == (4, 4)


@pytest.mark.parametrize("field,value,exc", [
    ("cameras", 0, ValueError), ("cameras", -2, ValueError), ("cameras", 1.5, TypeError),
    ("height", 0, ValueError), ("width", 0, ValueError), ("frames", 0, ValueError),
    ("dt", 0.0, ValueError), ("dt", -0.1, ValueError), ("hfov_deg", 180.0, ValueError),
    ("lidar_beams", 0, ValueError), ("lidar_azimuths", 0, ValueError),
    ("lidar_min_range", -1.0, ValueError), ("lidar_max_range", -5.0, ValueError),
    ("lidar_max_range", 0.3, ValueError),       # not above the 0.5 m minimum range
    ("lidar_dropout", 1.0, ValueError), ("lidar_dropout", -0.1, ValueError),
    ("lidar_range_noise", -0.01, ValueError), ("lidar_fov_up_deg", -40.0, ValueError),
    ("seed", -1, ValueError), ("ego_speed", -3.0, ValueError), ("traffic", float("nan"), ValueError),
    ("camera_far", 0.0, ValueError), ("lidar_height", 0.0, ValueError), ("seed", "7", TypeError),
])
def test_bad_parameters_name_the_argument(field, value, exc):
    with pytest.raises(exc) as info:
        WorldConfig(**{field: value})
    assert field in str(info.value)


def test_config_round_trip_and_unknown_fields():
    cfg = WorldConfig(seed=3, cameras=2, height=32)
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown WorldConfig fields"):
        WorldConfig.from_dict({**cfg.to_dict(), "colour": 1})
