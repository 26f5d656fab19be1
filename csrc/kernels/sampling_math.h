// Pixel sampling shared by the CPU and CUDA kernels (torch-free): pixel (row i, col j) has its
// centre at x = j, y = i. Bilinear sampling with zeros outside equals
// grid_sample(align_corners=True, padding_mode="zeros") after normalisation; nearest rounds
// half to even (as grid_sample's nearest mode).
#pragma once

#include <math.h>

#include "kernels/common.h"

namespace pyssl {

enum SampleMode : int { kBilinear = 0, kNearest = 1 };

// Up to four (pixel offset, weight) taps of one sample; offset = y * W + x, -1 when outside.
template <typename T>
struct Taps {
  int64_t offset[4];
  T weight[4];
  // d weight / dx and d weight / dy of each tap (bilinear only)
  T dwdx[4];
  T dwdy[4];
};

template <typename T>
PYSSL_HD Taps<T> sample_taps(T x, T y, int64_t H, int64_t W, int mode) {
  Taps<T> t;
  for (int c = 0; c < 4; ++c) {
    t.offset[c] = -1;
    t.weight[c] = T(0);
    t.dwdx[c] = T(0);
    t.dwdy[c] = T(0);
  }
  // Non-finite or far-away coordinates touch no pixel (also keeps floor() in int range).
  if (!(x > T(-2) && x < T(W + 1) && y > T(-2) && y < T(H + 1))) return t;
  if (mode == kNearest) {
    const int64_t ix = static_cast<int64_t>(rint(x)), iy = static_cast<int64_t>(rint(y));
    if (ix >= 0 && ix < W && iy >= 0 && iy < H) {
      t.offset[0] = iy * W + ix;
      t.weight[0] = T(1);
    }
    return t;
  }
  const T fx0 = floor(x), fy0 = floor(y);
  const int64_t x0 = static_cast<int64_t>(fx0), y0 = static_cast<int64_t>(fy0);
  const T ax = x - fx0, ay = y - fy0;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const T w[4] = {(T(1) - ax) * (T(1) - ay), ax * (T(1) - ay), (T(1) - ax) * ay, ax * ay};
  const T dx[4] = {-(T(1) - ay), T(1) - ay, -ay, ay};
  const T dy[4] = {-(T(1) - ax), -ax, T(1) - ax, ax};
  for (int c = 0; c < 4; ++c) {
    if (xs[c] >= 0 && xs[c] < W && ys[c] >= 0 && ys[c] < H) {
      t.offset[c] = ys[c] * W + xs[c];
      t.weight[c] = w[c];
      t.dwdx[c] = dx[c];
      t.dwdy[c] = dy[c];
    }
  }
  return t;
}

// Element offset of tap offset = y * W + x in an image with row / column strides sH, sW; the
// common dense layouts (NCHW, channels-last) have sH == W * sW and need no division.
PYSSL_HD int64_t tap_offset(int64_t offset, int64_t W, int64_t sH, int64_t sW) {
  if (offset < 0) return -1;
  return sH == W * sW ? offset * sW : (offset / W) * sH + (offset % W) * sW;
}

// Where channel d of per-point row m lives in a [M, D] matrix (Ho = Wo = 1) or in a dense map
// [N, D, Ho, Wo] whose pixels are the rows (m = (n * Ho + i) * Wo + j), any strides.
struct RowLayout {
  int64_t Ho, Wo;
  int64_t sN, sD, sH, sW;

  PYSSL_HD int64_t base(int64_t m) const {
    const int64_t per = Ho * Wo, r = m % per;
    return (m / per) * sN + (r / Wo) * sH + (r % Wo) * sW;
  }
};

}  // namespace pyssl
