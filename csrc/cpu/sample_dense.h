// Torch-free CPU kernels for dense bilinear sampling of one float32 or bfloat16 image (the fast
// path of pyssl.ops.sample_features): features [C, H, W] planes, coordinates [P, 2] (x, y) in
// pixels, output [C, P] planes. Built for AVX2+FMA and the baseline (simd.h); with AVX2 the
// corner reads vectorise over 8 points (gathers; one gather element per horizontal pair of
// corners when all of them are inside the image), the feature-gradient scatter is scalar. For
// 3 or 4 channels the glue interleaves the image first (the "quad" kernels below): a corner is
// then one 4-lane read or update for all channels.
#pragma once

#include <cstdint>

namespace pyssl::cpu {

// Per-point taps of a block of points: for each of the 4 corners an int32 pixel index (y*W + x)
// and a weight (0 for corners outside the image, whose index is then 0), plus d(weight)/dx and
// d(weight)/dy. Layout: [4][n] arrays. Instead of the derivatives, the quad backward takes the
// fractional parts of the coordinates (fx, fy [n]: x - floor(x), y - floor(y); 0 for points far
// outside or not finite), from which they follow.
struct DenseTaps {
  int32_t* index;          // [4 * n]
  float* weight;           // [4 * n]
  float* dwdx;             // [4 * n], may be null when not needed
  float* dwdy;             // [4 * n]
  float* fx = nullptr;     // [n], may be null when not needed
  float* fy = nullptr;     // [n]
};

void dense_taps(const float* coords, int64_t n, int64_t H, int64_t W, DenseTaps taps);
// The same with indices y * pitch + x into an image whose rows are `pitch` >= W pixels apart
void dense_taps(const float* coords, int64_t n, int64_t H, int64_t W, int64_t pitch,
                DenseTaps taps);

// out[c * out_stride + j] = sum_k weight[k][j] * f[c * HW + index[k][j]], j < n. The uint16_t
// overloads read and write bfloat16 (fp32 math, round to nearest even).
void dense_gather(const float* f, int64_t C, int64_t HW, const DenseTaps& taps, int64_t n,
                  float* out, int64_t out_stride);
void dense_gather(const uint16_t* f, int64_t C, int64_t HW, const DenseTaps& taps, int64_t n,
                  uint16_t* out, int64_t out_stride);

// The backward of a block of points over C planes (grad_f may be null; gx and gy are both null
// or both set):
//   grad_f[c * HW + index[k][j]] += weight[k][j] * g[c * g_stride + j]   (in point order)
//   gx[j] += sum_c g[c * g_stride + j] * sum_k dwdx[k][j] f[c * HW + index[k][j]]   (gy: dwdy)
// The coordinate gradient is planar (gx and gy separate arrays), so 8 points load and store as
// one vector each. The uint16_t overload reads bfloat16 features (fp32 math).
void dense_backward(const float* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                    const DenseTaps& taps, int64_t n, float* grad_f, float* gx, float* gy);
void dense_backward(const uint16_t* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                    const DenseTaps& taps, int64_t n, float* grad_f, float* gx, float* gy);

// Pixel-interleaved ("quad") kernels for few channels (1 <= C <= kQuadChannels). A quad image
// q [H][pitch][4] floats (16-byte aligned) holds a pixel's channels side by side (lanes >= C
// and the padding pixels of a row are 0), so a corner of a point is one 4-lane read (features)
// or read-modify-write (feature gradient) for all channels, instead of C scattered ones, one per
// plane. Taps index it with dense_taps(..., pitch, ...). The forward and the feature gradient
// equal the scalar planar kernels bit for bit (the same products summed in the same order); the
// coordinate gradient takes corner differences first (below), equal up to rounding.
constexpr int64_t kQuadChannels = 4;
// The row pitch (pixels) of a quad image of width W: W, padded so that rows 1 to 4 apart are
// not within 128 bytes of a multiple of 4 KiB apart. Otherwise (e.g. W = 512: rows exactly 8 KiB
// apart) a read of one row may be taken to depend on the preceding write to the row above ("4K
// aliasing": cores compare the low 12 address bits first). A precaution: perf put the scatter's
// time on the bottom-row update, but the padding made no difference measurable through this
// machine's noise (benchmarks/RESULTS.md).
inline int64_t quad_pitch(int64_t W) {
  for (int64_t p = W;; ++p) {
    bool ok = true;
    for (int64_t r = 1; r <= 4 && ok; ++r) {
      const int64_t m = (r * p * kQuadChannels * 4) % 4096;
      ok = m >= 128 && m <= 4096 - 128;
    }
    if (ok) return p;
  }
}
// rows r0 <= r < r1 of q (pitch) from the planes f [C][H*W] (bfloat16 widened to float)
void quad_pack(const float* f, int64_t C, int64_t H, int64_t W, int64_t pitch, int64_t r0,
               int64_t r1, float* q);
void quad_pack(const uint16_t* f, int64_t C, int64_t H, int64_t W, int64_t pitch, int64_t r0,
               int64_t r1, float* q);
// out[c * out_stride + j] = sum_k weight[k][j] * q[4 * index[k][j] + c], c < C, j < n
void quad_gather(const float* q, int64_t C, const DenseTaps& taps, int64_t n, float* out,
                 int64_t out_stride);
void quad_gather(const float* q, int64_t C, const DenseTaps& taps, int64_t n, uint16_t* out,
                 int64_t out_stride);
// The backward of a block (acc, or gx and gy, may be null; q may be null without gx; the taps
// need fx and fy, not dwdx and dwdy, when gx is set):
//   acc[4 * index[k][j] + c] += weight[k][j] * g[c * g_stride + j]   (in point, corner order)
//   gx[j] = sum_c g[c * g_stride + j] * ((1 - fy[j]) * top + fy[j] * bottom)   (written)
//   gy[j] = sum_c g[c * g_stride + j] * ((1 - fx[j]) * left + fx[j] * right)
// with top = v1 - v0, bottom = v3 - v2, left = v2 - v0, right = v3 - v1 the differences of the
// corner values v_k = q[4 * index[k][j] + c] (0 outside the image): sum_k dwdx[k][j] v_k
// (dwdy) with 10 operations per channel instead of 16. The output gradient g is float32 or
// (uint16_t) bfloat16, read as float.
void quad_backward(const float* q, int64_t C, const float* g, int64_t g_stride,
                   const DenseTaps& taps, int64_t n, float* acc, float* gx, float* gy);
void quad_backward(const float* q, int64_t C, const uint16_t* g, int64_t g_stride,
                   const DenseTaps& taps, int64_t n, float* acc, float* gx, float* gy);
// rows r0 <= r < r1 of the planes gf [C][H*W] from the accumulator acc [H][pitch][4]
// (bfloat16: rounded to nearest even)
void quad_unpack(const float* acc, int64_t H, int64_t W, int64_t pitch, int64_t C, float* gf,
                 int64_t r0, int64_t r1);
void quad_unpack(const float* acc, int64_t H, int64_t W, int64_t pitch, int64_t C, uint16_t* gf,
                 int64_t r0, int64_t r1);
// The smallest y of the points coords [n, 2] (x, y), NaN ignored; +inf when there is none. A
// block's taps read no row above floor(min_y).
float min_y(const float* coords, int64_t n);

// The smallest index >= 0 (lo) and the largest index (hi) of index[0, m): hi < 0 when all are
// -1 (taps outside the image)
void index_range(const int32_t* index, int64_t m, int32_t* lo, int32_t* hi);

// q[2 * p + c] = f[c * HW + p] for pixels p0 <= p < p1: two planes (a flow's u, v) interleaved,
// so a bilinear corner of the flow is one 64-bit read
void pair_pack(const float* f, int64_t HW, int64_t p0, int64_t p1, float* q);
// One row i of flow_correspondence for float32 flows (u, v: the row of the forward flow's two
// planes; qb: the backward flow interleaved by pair_pack, or null): coords [W, 2] and valid
// [W], equal to kernels/flow_math.h (flow_match). `taps` holds room for W points.
void flow_row(const float* u, const float* v, const float* qb, int64_t i, int64_t W, int64_t H,
              float alpha1, float alpha2, const DenseTaps& taps, float* coords, bool* valid);

// Channels-last band kernels (csrc/cpu/sample_band.cpp) for kBandChannels channels at a time of
// one image, AVX2+FMA only (band_kernels_available()). The band of source rows a block of
// points touches is transposed into a ring of channels-last rows, so every tap reads (forward)
// or accumulates into (backward) 16 contiguous channels instead of 16 scattered planes; blocks
// whose band does not fit the ring fall back to the planar kernels above. Results equal the
// planar kernels: the same products summed in the same order (forward; the feature gradient up
// to the order of partial sums of rows that leave and re-enter the ring).
constexpr int64_t kBandChannels = 16;
bool band_kernels_available();
// dst[c * dchs + i * dpxs] = src[c * schs + i * spxs], c < 16, i < n: a 16-channel slice of n
// pixels from one layout to another, each planes (pxs = 1) or channels-last rows (chs = 1), the
// bits as they are (band_kernels_available() only)
void copy_slice(const float* src, int64_t schs, int64_t spxs, int64_t n, float* dst, int64_t dchs,
                int64_t dpxs);
void copy_slice(const uint16_t* src, int64_t schs, int64_t spxs, int64_t n, uint16_t* dst,
                int64_t dchs, int64_t dpxs);
struct BandScratch;
// The floats of a band scratch's row rings for rows of W pixels; band_scratch_new(W, rings)
// uses `rings` (that many floats, uninitialised, owned by the caller and outliving it).
int64_t band_ring_floats(int64_t W);
BandScratch* band_scratch_new(int64_t W, float* rings);
void band_scratch_free(BandScratch* s);
// The features f of the 16 channels hold channel c of pixel i at c * chs + i * pxs: planes
// (chs = H*W, pxs = 1) or channels-last (chs = 1, pxs = the map's channel count, f pointing at
// the slice's first channel).
// out planes [16][os] (points j < P) from the features f at coords [P, 2]
void band_gather(const float* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                 const float* coords, int64_t P, float* out, int64_t os, BandScratch* s);
void band_gather(const uint16_t* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                 const float* coords, int64_t P, uint16_t* out, int64_t os, BandScratch* s);
// gf (the layout of f) += feature gradient (gf may be null), gx, gy [P] += coordinate gradient
// over these 16 channels (gx, gy and f may be null), from the output gradient planes g [16][gs]
// (float32, or uint16_t holding bfloat16, read as float)
template <typename F, typename G>
void band_backward(const F* f, int64_t chs, int64_t pxs, const G* g, int64_t gs, int64_t H,
                   int64_t W, const float* coords, int64_t P, float* gf, float* gx, float* gy,
                   BandScratch* s);
// The fused dense loss of pyssl.ops.dense_correspondence_loss, per image: t[c][j] is the bilinear
// sample of the features f at coords[j] (float32 math, also for bfloat16 features), o the online
// map, points j < P: channel c of point j at o[c * os + j * ops], planes (ops = 1) or, for the
// band kernels only with os = 1, channels-last rows (ops = the map's channel count); go in the
// same layout. f (and gf) hold channel c of pixel i at c * chs + i * pxs:
// planes (chs = H*W, pxs = 1) or channels-last (chs = 1, pxs = the map's channel count), f
// pointing at the first channel of the slice. F and O: float, or uint16_t holding bfloat16 (read
// as float; go rounded to nearest even).
//   forward:  sums planes [3][ss] = (sum_c t^2, sum_c o^2, sum_c t o), channels in order (written)
//   backward: with coef planes [4][cs] = (cf1, cf2, cg1, cg2) per point,
//             go[c * os + j * ops] = cg1 o + cg2 t (written; go may be null),
//             gf += cf1 t + cf2 o scattered through the taps (gf may be null; points with
//             cf1 = cf2 = 0 add nothing)
// band_*: 16 channels through the ring of channels-last rows (band_kernels_available());
// planar_*: any C, a point's channels one after the other.
template <typename F, typename O>
void band_loss_forward(const F* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                       const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                       float* sums, int64_t ss, BandScratch* s);
template <typename F, typename O>
void band_loss_backward(const F* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                        const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                        const float* coef, int64_t cs, O* go, float* gf, BandScratch* s);
template <typename F, typename O>
void planar_loss_forward(const F* f, int64_t C, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                         const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                         float* sums, int64_t ss);
template <typename F, typename O>
void planar_loss_backward(const F* f, int64_t C, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                          const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                          const float* coef, int64_t cs, O* go, float* gf);
}  // namespace pyssl::cpu
