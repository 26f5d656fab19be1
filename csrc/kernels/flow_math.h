// Optical-flow correspondence for one pixel, shared by the CPU and CUDA kernels (torch-free).
// Pixel (row i, col j) is centred at x = j, y = i; flow channel 0 = u (x), 1 = v (y).
#pragma once

#include <math.h>

#include "kernels/common.h"
#include "kernels/sampling_math.h"

namespace pyssl {

template <typename T>
struct FlowMatch {
  T x, y;      // target coordinates in the second frame
  bool valid;  // inside the frame and (with a backward flow) forward-backward consistent
};

// fw: this pixel's forward flow (u, v). bw, bw_sH, bw_sW, bw_sC: the backward flow map of this
// image ([2, H, W] with element strides), or null. Forward-backward check of Sundaram et al.
// (2010) as in UnFlow: |F + B~|^2 <= alpha1 (|F|^2 + |B~|^2) + alpha2, B~ = bilinear(B, target).
template <typename T, typename BW>
PYSSL_HD FlowMatch<T> flow_match(int64_t i, int64_t j, T u, T v, const BW* bw, int64_t sC,
                                 int64_t sH, int64_t sW, int64_t H, int64_t W, T alpha1, T alpha2) {
  FlowMatch<T> r;
  r.x = T(j) + u;
  r.y = T(i) + v;
  const bool finite = (u - u) == T(0) && (v - v) == T(0);
  r.valid = finite && r.x >= T(0) && r.x <= T(W - 1) && r.y >= T(0) && r.y <= T(H - 1);
  if (r.valid && bw) {
    const Taps<T> t = sample_taps<T>(r.x, r.y, H, W, kBilinear);
    T bu = 0, bv = 0;
    for (int c = 0; c < 4; ++c) {
      if (t.offset[c] < 0 || t.weight[c] == T(0)) continue;  // a NaN neighbour with weight 0 is not read
      const int64_t po = tap_offset(t.offset[c], W, sH, sW);
      bu += t.weight[c] * static_cast<T>(bw[po]);
      bv += t.weight[c] * static_cast<T>(bw[sC + po]);
    }
    const T du = u + bu, dv = v + bv;
    const T lhs = du * du + dv * dv;
    const T rhs = alpha1 * (u * u + v * v + bu * bu + bv * bv) + alpha2;
    r.valid = lhs <= rhs;  // a NaN backward flow fails the check
  }
  return r;
}

// Source-pixel coordinates of output pixel (i, j) of a view made by the affine map theta
// (row-major 2x3, normalised coordinates, align_corners=True) = F.affine_grid, unnormalised.
template <typename T>
PYSSL_HD void affine_source(const T* theta, int64_t i, int64_t j, int64_t Hin, int64_t Win,
                            int64_t Hout, int64_t Wout, T* x, T* y) {
  const T xn = Wout > 1 ? T(2) * T(j) / T(Wout - 1) - T(1) : T(0);
  const T yn = Hout > 1 ? T(2) * T(i) / T(Hout - 1) - T(1) : T(0);
  const T xs = theta[0] * xn + theta[1] * yn + theta[2];
  const T ys = theta[3] * xn + theta[4] * yn + theta[5];
  *x = (xs + T(1)) * T(0.5) * T(Win - 1);
  *y = (ys + T(1)) * T(0.5) * T(Hin - 1);
}

}  // namespace pyssl
