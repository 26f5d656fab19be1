// Torch-free CPU projection kernel; see csrc/cpu/projection.h.
#include "cpu/projection.h"

#include "cpu/simd.h"
#include "kernels/projection_math.h"

namespace pyssl::cpu {
namespace {

// x - x is 0 exactly for finite x (NaN for NaN and +-inf): a branch-free isfinite.
template <typename T> PYSSL_INLINE bool finite(T x) { return (x - x) == T(0); }

// R: rounding (0 none, 1 floor, 2 half-even), fixed per loop so that GCC vectorises it with
// plain loads from the separate coordinate arrays.
template <typename T, int R>
PYSSL_INLINE void project_loop(const T* px, const T* py, const T* pz, int64_t n, const T* M,
                               const T* K, T H, T W, T min_depth, T margin, T* pixels, T* depth,
                               bool* valid) {
  const T m0 = M[0], m1 = M[1], m2 = M[2], m3 = M[3], m4 = M[4], m5 = M[5], m6 = M[6], m7 = M[7];
  const T m8 = M[8], m9 = M[9], m10 = M[10], m11 = M[11];
  const T k0 = K[0], k1 = K[1], k2 = K[2], k3 = K[3], k4 = K[4], k5 = K[5];
  const T umax = clamp_image_side(W) - T(1) - margin, vmax = clamp_image_side(H) - T(1) - margin;
  for (int64_t i = 0; i < n; ++i) {
    const T x = px[i], y = py[i], z = pz[i];
    const T cx = m0 * x + m1 * y + m2 * z + m3;
    const T cy = m4 * x + m5 * y + m6 * z + m7;
    const T cz = m8 * x + m9 * y + m10 * z + m11;
    T u = (k0 * cx + k1 * cy + k2 * cz) / cz;
    T v = (k3 * cx + k4 * cy + k5 * cz) / cz;
    if constexpr (R == 1) {
      u = std::floor(u);
      v = std::floor(v);
    } else if constexpr (R == 2) {
      u = std::nearbyint(u);
      v = std::nearbyint(v);
    }
    pixels[2 * i] = u;
    pixels[2 * i + 1] = v;
    depth[i] = cz;
    valid[i] = finite(u) & finite(v) & finite(cz) & (cz > min_depth) & (u >= margin) &
               (u <= umax) & (v >= margin) & (v <= vmax);
  }
}

template <typename T>
PYSSL_INLINE void project_body(const T* x, const T* y, const T* z, int64_t n, const T* M,
                               const T* K, T H, T W, T min_depth, T margin, int rounding,
                               T* pixels, T* depth, bool* valid) {
  if (rounding == 1)
    project_loop<T, 1>(x, y, z, n, M, K, H, W, min_depth, margin, pixels, depth, valid);
  else if (rounding == 2)
    project_loop<T, 2>(x, y, z, n, M, K, H, W, min_depth, margin, pixels, depth, valid);
  else
    project_loop<T, 0>(x, y, z, n, M, K, H, W, min_depth, margin, pixels, depth, valid);
}

#define PYSSL_PROJECT_ENTRY(T)                                                                  \
  PYSSL_MULTIVERSION_AVX512(                                                                   \
      void, project_##T,                                                                       \
      (const T* x, const T* y, const T* z, int64_t n, const T* M, const T* K, T H, T W,        \
       T min_depth, T margin, int rounding, T* pixels, T* depth, bool* valid),                  \
      (x, y, z, n, M, K, H, W, min_depth, margin, rounding, pixels, depth, valid), project_body<T>)

PYSSL_PROJECT_ENTRY(float)
PYSSL_PROJECT_ENTRY(double)

}  // namespace

void project_block(const float* x, const float* y, const float* z, int64_t n, const float* M,
                   const float* K, float H, float W, float min_depth, float margin, int rounding,
                   float* pixels, float* depth, bool* valid) {
  project_float(x, y, z, n, M, K, H, W, min_depth, margin, rounding, pixels, depth, valid);
}

void project_block(const double* x, const double* y, const double* z, int64_t n, const double* M,
                   const double* K, double H, double W, double min_depth, double margin,
                   int rounding, double* pixels, double* depth, bool* valid) {
  project_double(x, y, z, n, M, K, H, W, min_depth, margin, rounding, pixels, depth, valid);
}

}  // namespace pyssl::cpu
