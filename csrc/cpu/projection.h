// Torch-free CPU kernel of the point projection (csrc/ops/projection.cpp parallelises it over
// blocks of points). Vectorisable, built for AVX-512, AVX2+FMA and the baseline (simd.h).
#pragma once

#include <cstdint>

namespace pyssl::cpu {

#define PYSSL_PROJECT_DECLARE(T)                                                               \
  /* Projects n points, coordinates in separate contiguous arrays x, y, z, with one camera: M  \
     row-major 4x4 lidar_to_cam, K row-major 3x3; writes pixels [n, 2] (u, v), depth [n] and   \
     valid [n] exactly as pyssl/kernels/projection_math.h (rounding 0 none, 1 floor, 2         \
     half-even). */                                                                           \
  void project_block(const T* x, const T* y, const T* z, int64_t n, const T* M, const T* K, T H, \
                     T W, T min_depth, T margin, int rounding, T* pixels, T* depth, bool* valid);

PYSSL_PROJECT_DECLARE(float)
PYSSL_PROJECT_DECLARE(double)

}  // namespace pyssl::cpu
