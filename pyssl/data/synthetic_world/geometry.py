"""Frames, the road's curvilinear coordinates, the camera rig and the LiDAR's beam pattern.

World frame: z up, the ground is the plane z = 0. The LiDAR frame (what every sample refers
to) is x forward, y left, z up with its origin at the LiDAR, ``lidar_height`` above the
ground. Camera frames are OpenCV-style: x right, y down, z forward (optical axis).
All poses here are float64 [..., 4, 4] homogeneous transforms "A-to-B" (``p_B = T p_A``).
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def rot_z(yaw: torch.Tensor) -> torch.Tensor:
    """[...] angles -> [..., 3, 3] rotations about +z (counter-clockwise seen from above)."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    z, o = torch.zeros_like(yaw), torch.ones_like(yaw)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(*yaw.shape, 3, 3)


def rot_y(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(*angle.shape, 3, 3)


def rot_x(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([o, z, z, z, c, -s, z, s, c], -1).reshape(*angle.shape, 3, 3)


def make_pose(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3], [..., 3] -> [..., 4, 4]."""
    shape = torch.broadcast_shapes(rot.shape[:-2], trans.shape[:-1])
    out = torch.zeros(*shape, 4, 4, dtype=rot.dtype)
    out[..., :3, :3] = rot
    out[..., :3, 3] = trans
    out[..., 3, 3] = 1.0
    return out


def invert_pose(pose: torch.Tensor) -> torch.Tensor:
    rot_t = pose[..., :3, :3].transpose(-1, -2)
    return make_pose(rot_t, -(rot_t @ pose[..., :3, 3:4])[..., 0])


def transform_points(pose: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] x [..., 3] -> [..., 3] (broadcasting)."""
    return (pose[..., :3, :3] @ pts[..., None])[..., 0] + pose[..., :3, 3]


class Road:
    """A road centreline of constant curvature (0 = straight) through the world origin along +x.

    Road coordinates: ``s`` arc length along the centreline (metres), ``l`` lateral offset
    (metres, positive to the left of the +s direction). ``to_world`` maps (s, l) to the world
    position and the heading (yaw of +s) there; ``from_world`` inverts it. |curvature| * |s|
    stays below pi over the generated extent, so the map is one-to-one there.
    """

    def __init__(self, curvature: float):
        self.k = float(curvature)

    def to_world(self, s: torch.Tensor, l: torch.Tensor):
        s, l = torch.as_tensor(s, dtype=F64), torch.as_tensor(l, dtype=F64)
        s, l = torch.broadcast_tensors(s, l)
        if self.k == 0.0:
            return s.clone(), l.clone(), torch.zeros_like(s)
        th = self.k * s
        x = torch.sin(th) / self.k - l * torch.sin(th)
        y = (1.0 - torch.cos(th)) / self.k + l * torch.cos(th)
        return x, y, th

    def from_world(self, x: torch.Tensor, y: torch.Tensor):
        if self.k == 0.0:
            return x, y
        sg = 1.0 if self.k > 0 else -1.0
        qx, qy = sg * x, sg * (y - 1.0 / self.k)
        th = torch.atan2(qx, -qy)
        rho = torch.sqrt(qx * qx + qy * qy)
        return th / self.k, 1.0 / self.k - sg * rho

    def pose(self, s, l, yaw_offset=0.0, z=0.0) -> torch.Tensor:
        """[N] road coordinates -> [N, 4, 4] object-to-world poses (x along +s rotated by yaw_offset)."""
        x, y, th = self.to_world(s, l)
        yaw = th + torch.as_tensor(yaw_offset, dtype=F64)
        zz = torch.as_tensor(z, dtype=F64).expand_as(x)
        return make_pose(rot_z(yaw), torch.stack([x, y, zz], -1))


# nuScenes-like rig: (name, x, y, z in the LiDAR frame, yaw in degrees). Positions are the
# nuScenes calibrated sensor translations relative to the LiDAR (ego-frame values minus the
# LiDAR's (0.94, 0, 1.84)), rounded.
NUSCENES_RIG = (
    ("CAM_FRONT", 0.76, 0.00, -0.33, 0.0),
    ("CAM_FRONT_LEFT", 0.58, 0.49, -0.33, 55.0),
    ("CAM_FRONT_RIGHT", 0.58, -0.49, -0.33, -55.0),
    ("CAM_BACK", -0.91, 0.00, -0.27, 180.0),
    ("CAM_BACK_LEFT", 0.10, 0.48, -0.28, 110.0),
    ("CAM_BACK_RIGHT", 0.10, -0.48, -0.28, -110.0),
)


def camera_rig(cameras: int):
    """Names and [C, 4, 4] camera-to-LiDAR poses. 6: the nuScenes layout (front, front-left,
    front-right, back, back-left, back-right); 1: front; otherwise yaws 360*k/C."""
    if cameras == 6:
        rig = NUSCENES_RIG
    elif cameras == 1:
        rig = NUSCENES_RIG[:1]
    else:
        rig = []
        for k in range(cameras):
            yaw = 360.0 * k / cameras
            a = math.radians(yaw)
            rig.append((f"CAM_{k}", 0.7 * math.cos(a), 0.5 * math.sin(a), -0.3,
                        yaw if yaw <= 180 else yaw - 360))
    names = [r[0] for r in rig]
    yaw = torch.tensor([math.radians(r[4]) for r in rig], dtype=F64)
    pos = torch.tensor([r[1:4] for r in rig], dtype=F64)
    c, s = torch.cos(yaw), torch.sin(yaw)
    z = torch.zeros_like(yaw)
    # Columns: camera x (right), y (down), z (forward) expressed in the LiDAR frame.
    right = torch.stack([s, -c, z], -1)
    down = torch.stack([z, z, z - 1.0], -1)
    fwd = torch.stack([c, s, z], -1)
    rot = torch.stack([right, down, fwd], -1)
    return names, make_pose(rot, pos)


def intrinsics_matrix(height: int, width: int, hfov_deg: float) -> torch.Tensor:
    """Square pixels, principal point at the image centre ((W-1)/2, (H-1)/2): pixel (row i,
    col j) has its centre at (u=j, v=i)."""
    f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    return torch.tensor([[f, 0.0, (width - 1) / 2.0],
                         [0.0, f, (height - 1) / 2.0],
                         [0.0, 0.0, 1.0]], dtype=F64)


def lidar_directions(beams: int, azimuths: int, fov_up_deg: float, fov_down_deg: float):
    """[beams, azimuths, 3] unit ray directions in the LiDAR frame, beam 0 at the top,
    azimuth 0 along +x, increasing counter-clockwise (towards +y)."""
    if beams == 1:
        el = torch.tensor([math.radians(0.5 * (fov_up_deg + fov_down_deg))], dtype=F64)
    else:
        el = torch.linspace(math.radians(fov_up_deg), math.radians(fov_down_deg), beams,
                            dtype=F64)
    az = torch.arange(azimuths, dtype=F64) * (2.0 * math.pi / azimuths)
    ce, se = torch.cos(el)[:, None], torch.sin(el)[:, None]
    return torch.stack([ce * torch.cos(az)[None], ce * torch.sin(az)[None],
                        se.expand(beams, azimuths)], -1)
