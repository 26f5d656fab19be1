// Torch-free CPU kernels for dense bilinear sampling of one float32 image (the fast path of
// pyssl.ops.sample_features): features [C, H, W] planes, coordinates [P, 2] (x, y) in pixels,
// output [C, P] planes. Built for AVX2+FMA and the baseline (simd.h); the gathers vectorise over
// points, one channel plane at a time.
#pragma once

#include <cstdint>

namespace pyssl::cpu {

// Per-point taps of a block of points: for each of the 4 corners an int32 pixel index (y*W + x)
// and a weight (0 for corners outside the image, whose index is then 0), plus d(weight)/dx and
// d(weight)/dy. Layout: [4][n] arrays.
struct DenseTaps {
  int32_t* index;  // [4 * n]
  float* weight;   // [4 * n]
  float* dwdx;     // [4 * n], may be null when not needed
  float* dwdy;     // [4 * n]
};

void dense_taps(const float* coords, int64_t n, int64_t H, int64_t W, DenseTaps taps);

// out[c * out_stride + j] = sum_k weight[k][j] * f[c * HW + index[k][j]], j < n
void dense_gather(const float* f, int64_t C, int64_t HW, const DenseTaps& taps, int64_t n,
                  float* out, int64_t out_stride);

// grad_f[index[k][j]] += weight[k][j] * g[j] over j < n (one plane; in point order)
void dense_scatter(const float* g, const DenseTaps& taps, int64_t n, float* grad_f);

// gxy[2j] += sum_c g[c][j] * sum_k dwdx[k][j] f_c[index[k][j]] (and y), j < n
void dense_coord_grad(const float* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                      const DenseTaps& taps, int64_t n, float* gxy);

}  // namespace pyssl::cpu
