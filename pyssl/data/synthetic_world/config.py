"""Configuration of a synthetic sequence (every parameter, validated with errors that name it)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name, value, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a generated sequence (with the seed, bit for bit).

    Sensors follow nuScenes: 6 cameras around the car, a 32-beam spinning LiDAR on the roof.
    The LiDAR frame (x forward, y left, z up, metres; origin at the LiDAR, ``lidar_height``
    above the ground) is the sensor frame every sample refers to.
    """

    seed: int = 0
    frames: int = 10                 #: time steps in the sequence
    dt: float = 0.1                  #: seconds between consecutive frames
    cameras: int = 6                 #: 6 = nuScenes rig; other counts: evenly spaced yaws
    height: int = 224                #: image rows
    width: int = 448                 #: image columns
    hfov_deg: float = 70.0           #: horizontal field of view of each camera (degrees)
    camera_far: float = 250.0        #: beyond this a ray sees sky (metres)
    lidar_beams: int = 32
    lidar_azimuths: int = 1080       #: firings per revolution (0.33 deg steps by default)
    lidar_fov_up_deg: float = 10.0   #: elevation of the top beam (degrees)
    lidar_fov_down_deg: float = -30.0  #: elevation of the bottom beam (degrees)
    lidar_min_range: float = 0.5     #: metres
    lidar_max_range: float = 70.0    #: metres
    lidar_dropout: float = 0.05      #: probability that a return is dropped at random
    lidar_range_noise: float = 0.01  #: std of Gaussian range noise (metres)
    lidar_height: float = 1.84       #: LiDAR above the ground (metres; nuScenes: 1.84)
    ego_speed: float | None = None   #: m/s; None: drawn from the seed in [5, 12]
    traffic: float = 1.0             #: density multiplier for vehicles
    pedestrians: float = 1.0         #: density multiplier for pedestrians

    def __post_init__(self):
        _check_int("seed", self.seed, 0)
        _check_int("frames", self.frames, 1)
        _check_float("dt", self.dt, 0.0, low_open=True)
        _check_int("cameras", self.cameras, 1)
        _check_int("height", self.height, 1)
        _check_int("width", self.width, 1)
        _check_float("hfov_deg", self.hfov_deg, 0.0, 170.0, low_open=True)
        _check_float("camera_far", self.camera_far, 1.0, low_open=True)
        _check_int("lidar_beams", self.lidar_beams, 1)
        _check_int("lidar_azimuths", self.lidar_azimuths, 1)
        _check_float("lidar_fov_up_deg", self.lidar_fov_up_deg, -89.0, 89.0)
        _check_float("lidar_fov_down_deg", self.lidar_fov_down_deg, -89.0, 89.0)
        if self.lidar_beams > 1 and not self.lidar_fov_down_deg < self.lidar_fov_up_deg:
            raise ValueError(
                f"lidar_fov_down_deg ({self.lidar_fov_down_deg}) must be below "
                f"lidar_fov_up_deg ({self.lidar_fov_up_deg})")
        _check_float("lidar_min_range", self.lidar_min_range, 0.0)
        _check_float("lidar_max_range", self.lidar_max_range, 0.0, low_open=True)
        if not self.lidar_max_range > self.lidar_min_range:
            raise ValueError(f"lidar_max_range ({self.lidar_max_range}) must exceed "
                             f"lidar_min_range ({self.lidar_min_range})")
        _check_float("lidar_dropout", self.lidar_dropout, 0.0, 1.0, high_open=True)
        _check_float("lidar_range_noise", self.lidar_range_noise, 0.0)
        _check_float("lidar_height", self.lidar_height, 0.0, low_open=True)
        if self.ego_speed is not None:
            _check_float("ego_speed", self.ego_speed, 0.0, 40.0)
        _check_float("traffic", self.traffic, 0.0, 10.0)
        _check_float("pedestrians", self.pedestrians, 0.0, 10.0)

    def replace(self, **changes) -> "WorldConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown WorldConfig fields: {sorted(unknown)}")
        return cls(**d)
