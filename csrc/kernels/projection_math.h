// Projection of one LiDAR point into one calibrated pinhole camera, shared by the CPU and CUDA
// kernels (torch-free). Contract: pyssl/ops/projection.py (nuscenes-devkit's view_points with
// normalize=True, then depth and image-border masks).
#pragma once

#include <math.h>

#include "kernels/common.h"

namespace pyssl {

enum Rounding : int { kRoundNone = 0, kRoundFloor = 1, kRoundNearest = 2 };

template <typename T>
struct Projection {
  T u, v, depth;
  bool valid;
};

// Image sides beyond 2^31 count as 2^31, so that a valid pixel always fits int64 (and int32
// rows/cols downstream); a NaN side stays NaN and validates nothing.
template <typename T>
PYSSL_HD T clamp_image_side(T side) {
  const T max_side = T(2147483648.0);
  return side > max_side ? max_side : side;
}

// M: row-major 4x4 lidar_to_cam (the top 3 rows are used), K: row-major 3x3 intrinsics.
template <typename T>
PYSSL_HD Projection<T> project_point(T x, T y, T z, const T* M, const T* K, T H, T W,
                                     T min_depth, T margin, int rounding) {
  const T cx = M[0] * x + M[1] * y + M[2] * z + M[3];
  const T cy = M[4] * x + M[5] * y + M[6] * z + M[7];
  const T cz = M[8] * x + M[9] * y + M[10] * z + M[11];
  const T px = K[0] * cx + K[1] * cy + K[2] * cz;
  const T py = K[3] * cx + K[4] * cy + K[5] * cz;
  Projection<T> r;
  r.depth = cz;
  r.u = px / cz;
  r.v = py / cz;
  if (rounding == kRoundFloor) {
    r.u = floor(r.u);
    r.v = floor(r.v);
  } else if (rounding == kRoundNearest) {
    r.u = rint(r.u);
    r.v = rint(r.v);
  }
  H = clamp_image_side(H);
  W = clamp_image_side(W);
  const bool finite = isfinite(r.u) && isfinite(r.v) && isfinite(r.depth);
  r.valid = finite && r.depth > min_depth && r.u >= margin && r.u <= W - T(1) - margin &&
            r.v >= margin && r.v <= H - T(1) - margin;
  return r;
}

// Which of `nvalid` >= 1 valid cameras the uniform draw r in [0, 1) picks (cameras="random").
// A draw outside [0, 1) is clamped and NaN picks the first, the same on both devices.
PYSSL_HD int64_t pick_camera(double r, int64_t nvalid) {
  if (!(r > 0.0)) return 0;
  if (!(r < 1.0)) return nvalid - 1;
  const int64_t k = static_cast<int64_t>(r * static_cast<double>(nvalid));
  return k < nvalid - 1 ? k : nvalid - 1;
}

}  // namespace pyssl
