// Torch-free CPU kernels for dense bilinear sampling of one float32 or bfloat16 image (the fast
// path of pyssl.ops.sample_features): features [C, H, W] planes, coordinates [P, 2] (x, y) in
// pixels, output [C, P] planes. Built for AVX2+FMA and the baseline (simd.h); with AVX2 the
// corner reads vectorise over 8 points (gathers; one gather element per horizontal pair of
// corners when all of them are inside the image), the feature-gradient scatter is scalar.
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

// out[c * out_stride + j] = sum_k weight[k][j] * f[c * HW + index[k][j]], j < n. The uint16_t
// overloads read and write bfloat16 (fp32 math, round to nearest even).
void dense_gather(const float* f, int64_t C, int64_t HW, const DenseTaps& taps, int64_t n,
                  float* out, int64_t out_stride);
void dense_gather(const uint16_t* f, int64_t C, int64_t HW, const DenseTaps& taps, int64_t n,
                  uint16_t* out, int64_t out_stride);

// The backward of a block of points over C planes (either output may be null):
//   grad_f[c * HW + index[k][j]] += weight[k][j] * g[c * g_stride + j]   (in point order)
//   gxy[2j] += sum_c g[c * g_stride + j] * sum_k dwdx[k][j] f[c * HW + index[k][j]]   (and y)
// The uint16_t overload reads bfloat16 features (fp32 math).
void dense_backward(const float* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                    const DenseTaps& taps, int64_t n, float* grad_f, float* gxy);
void dense_backward(const uint16_t* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                    const DenseTaps& taps, int64_t n, float* grad_f, float* gxy);

// One row i of flow_correspondence for float32 flows (u, v: the row of the forward flow's two
// planes; bu, bv: the backward flow's planes [H, W], or null): coords [W, 2] and valid [W],
// equal to kernels/flow_math.h (flow_match). `taps` holds room for W points.
void flow_row(const float* u, const float* v, const float* bu, const float* bv, int64_t i,
              int64_t W, int64_t H, float alpha1, float alpha2, const DenseTaps& taps,
              float* coords, bool* valid);

// Channels-last band kernels (csrc/cpu/sample_band.cpp) for kBandChannels channels at a time of
// one image, AVX2+FMA only (band_kernels_available()). The band of source rows a block of
// points touches is transposed into a ring of channels-last rows, so every tap reads (forward)
// or accumulates into (backward) 16 contiguous channels instead of 16 scattered planes; blocks
// whose band does not fit the ring fall back to the planar kernels above. Results equal the
// planar kernels: the same products summed in the same order (forward; the feature gradient up
// to the order of partial sums of rows that leave and re-enter the ring).
constexpr int64_t kBandChannels = 16;
bool band_kernels_available();
struct BandScratch;
BandScratch* band_scratch_new(int64_t W);
void band_scratch_free(BandScratch* s);
// out planes [16][os] (points j < P) from feature planes f [16][H*W] at coords [P, 2]
void band_gather(const float* f, int64_t H, int64_t W, const float* coords, int64_t P, float* out,
                 int64_t os, BandScratch* s);
void band_gather(const uint16_t* f, int64_t H, int64_t W, const float* coords, int64_t P,
                 uint16_t* out, int64_t os, BandScratch* s);
// gf planes [16][H*W] += feature gradient (gf may be null), gxy [P, 2] += coordinate gradient
// over these 16 channels (gxy and f may be null), from the output gradient planes g [16][gs]
void band_backward(const float* f, const float* g, int64_t gs, int64_t H, int64_t W,
                   const float* coords, int64_t P, float* gf, float* gxy, BandScratch* s);
void band_backward(const uint16_t* f, const float* g, int64_t gs, int64_t H, int64_t W,
                   const float* coords, int64_t P, float* gf, float* gxy, BandScratch* s);

}  // namespace pyssl::cpu
