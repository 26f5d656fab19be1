"""A procedural, offline driving world: calibrated multi-camera video, a spinning LiDAR,
ground-truth optical flow with occlusion masks, depth and semantic labels, in nuScenes'
conventions.

Nothing is downloaded and no external renderer is used: a scene (a road with lanes, markings
and crossings, pavements, grass, buildings, trees and bushes, street lights and sign posts,
parked and moving cars / vans / trucks, walking pedestrians) is laid out from a seed and
ray-cast in torch against exact boxes, cylinders, ellipsoids and the ground plane
(:mod:`.raycast`), with class-specific procedural textures (:mod:`.shading`). An ego vehicle
drives along its lane; every frame gives one sample, consecutive frames give pairs with
ground-truth flow. Generation is deterministic from :class:`WorldConfig` (seed included).

Usage::

    from pyssl.data import synthetic_world as sw
    world = sw.SyntheticWorld(sw.WorldConfig(seed=0, frames=20))
    sample = world.render(0)                     # one frame, a dict of tensors
    pair = world.pair(0)                         # frames 0 and 1 + flow both ways
    sw.generate_sequence(world.config, "data/synth/seq0")   # cache to disk (npz per frame)
    ds = sw.SyntheticWorldDataset("data/synth", mode="pair")  # reads cached sequences
    # or from the shell: pyssl data synth --out data/synth/seq0 --frames 20 --seed 0

Frames and conventions
----------------------
* World: z up, the ground is z = 0. **LiDAR frame** (what every sample refers to): x forward,
  y left, z up, metres, origin at the LiDAR, ``lidar_height`` (1.84 m) above the ground.
* **Camera frame**: OpenCV, x right, y down, z forward. A point p in the LiDAR frame projects
  as ``p_cam = R p + t`` (``lidar_to_cam = [[R, t], [0, 1]]``), ``depth = p_cam.z``,
  ``(u, v) = (K p_cam)[:2] / depth`` with u = column, v = row; pixel (row i, col j) has its
  centre at (u = j, v = i) — exactly :func:`pyssl.ops.reference.project_points`.
* Cameras (default 6, nuScenes layout and order): CAM_FRONT, CAM_FRONT_LEFT, CAM_FRONT_RIGHT,
  CAM_BACK, CAM_BACK_LEFT, CAM_BACK_RIGHT, each ``hfov_deg`` (70) wide; the names are in
  ``SyntheticWorld.camera_names`` and in each cached sequence's meta.json.
* LiDAR: ``lidar_beams`` (32) beams evenly spaced from ``lidar_fov_up_deg`` (+10) to
  ``lidar_fov_down_deg`` (-30), ``lidar_azimuths`` (1080) firings per turn; the sweep is
  instantaneous at the frame's time (no rolling-shutter / motion distortion). Returns between
  ``lidar_min_range`` and ``lidar_max_range`` (0.5-70 m) are kept, with Gaussian range noise
  (``lidar_range_noise``, 1 cm) and random dropout (``lidar_dropout``, 5%).

Sample (``SyntheticWorld.render``, ``SyntheticWorldDataset`` in ``mode="sample"``)
-----------------------------------------------------------------------------------------
C cameras, H x W images, P LiDAR returns (P varies per frame)::

    images        uint8   [C, 3, H, W]  RGB, 0-255
    labels        int64   [C, H, W]     class id per pixel (see classes.py; 0 = sky/ignore)
    depth         float32 [C, H, W]     z-depth along the optical axis (camera z), metres;
                                        0 where there is no surface (sky, beyond camera_far)
    intrinsics    float32 [C, 3, 3]     pinhole K, last row [0, 0, 1]
    lidar_to_cam  float32 [C, 4, 4]     LiDAR frame -> camera frame
    points        float32 [P, 4]        x, y, z (LiDAR frame, metres), intensity in [0, 1]
                                        (nuScenes' 0-255 / 255); sweep order (azimuth-major,
                                        beams top to bottom)
    point_labels  int64   [P]           class id per return (never 0)
    ego_pose      float32 [4, 4]        LiDAR frame -> world frame
    timestamp     int64   []            microseconds since the first frame
    frame         int64   []            frame index in the sequence

Intensity = material/class reflectivity x (0.35 + 0.65 |cos incidence|) x exp(-range / 120 m)
x U(0.9, 1.1): lane markings and signs are bright (retro-reflective), glass and tyres dark.

Pair (``SyntheticWorld.pair``, ``SyntheticWorldDataset`` in ``mode="pair"``)
----------------------------------------------------------------------------
::

    t0, t1          dict    the samples of frames k and k+1 (keys above)
    flow_fw         float32 [C, 2, H, W]  frame k -> k+1, pixels; channel 0 = u (columns),
                                          channel 1 = v (rows): pixel p of frame k is at
                                          p + flow_fw(p) in frame k+1 (same camera)
    flow_bw         float32 [C, 2, H, W]  frame k+1 -> k, likewise
    flow_fw_valid   bool    [C, H, W]     True where the pixel's surface point (frame k) is
                                          visible in frame k+1: in front of the camera,
                                          inside the image, and not occluded (its depth
                                          agrees with frame k+1's depth map at the target
                                          within 1.5%; see SyntheticWorld.flow)
    flow_bw_valid   bool    [C, H, W]     the same from frame k+1 to frame k

Flow is exact (float64 geometry, stored as float32) for every pixel whose surface point stays
in front of the camera, visible or not, inside the image or not (then it points outside); it
is 0 only where the point goes behind the camera. Sky pixels carry the
rotation-only flow of directions at infinity and are valid where they land on sky.
Batches: :func:`collate` stacks every fixed-size tensor and keeps ``points`` /
``point_labels`` as lists (their length varies).

Classes: :mod:`.classes` (``CLASS_NAMES``, ``CLASS_COLORS``), defined once for the package.

Checks and measurements: :mod:`.checks` holds self-consistency checks that only read the
sample format (LiDAR->camera depth/label agreement, flow warp error, forward-backward
consistency), so a real-data loader can be held to them too; ``python -m
pyssl.data.synthetic_world.report`` prints them with render times at any size.
:func:`.figure.save_figure` draws a pair (what ``pyssl data synth`` writes).

Not modelled: shadows, specular reflections, lens distortion, motion blur, rolling shutter,
LiDAR motion distortion within a sweep, intersections, turning or lane-changing traffic.
"""

from .classes import CLASS_COLORS, CLASS_NAMES, NUM_CLASSES, class_table
from .config import WorldConfig
from .world import SyntheticWorld

__all__ = [
    "CLASS_COLORS", "CLASS_NAMES", "NUM_CLASSES", "class_table", "WorldConfig",
    "SyntheticWorld", "generate_sequence", "read_sequence_meta", "load_frame",
    "SyntheticWorldDataset", "collate", "save_figure",
]


def __getattr__(name):  # lazy: cache / dataset / figure pull in numpy IO and matplotlib
    if name in ("generate_sequence", "read_sequence_meta", "load_frame"):
        from . import cache
        return getattr(cache, name)
    if name in ("SyntheticWorldDataset", "collate"):
        from . import dataset
        return getattr(dataset, name)
    if name == "save_figure":
        from .figure import save_figure
        return save_figure
    raise AttributeError(name)
