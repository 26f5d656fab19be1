// Channels-last band kernels for dense bilinear sampling (see csrc/cpu/sample_dense.h).
//
// Why: in NCHW every tap of every channel is a separate access into a separate plane, and the
// planes of a large-C feature map do not stay in cache while a block of points walks them (the
// planar kernels run at about 6 ns per sample here, whatever the instruction mix). The points of
// a block of output pixels read a narrow band of source rows, so the band is transposed once
// into a ring of channels-last rows [W][16] and each tap becomes two 8-float loads (forward) or
// two 8-float read-modify-writes (feature gradient). Tap arithmetic is the one of taps_loop
// (sample_dense.cpp); the weighted sum of the four taps runs in the same order with separate
// multiply and add, so results equal the planar kernels bit for bit (forward).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu/sample_dense.h"
#include "cpu/simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "cpu/avx2_lanes.h"
#define PYSSL_BAND_KERNELS 1
#endif

namespace pyssl::cpu {

constexpr int kS = static_cast<int>(kBandChannels);
constexpr int kTile = 256;                      // points per block
constexpr int64_t kRingBytes = int64_t{2} << 20;  // per ring

struct BandScratch {
  int64_t W = 0;
  int K = 0;                       // rows in each ring
  float* fring = nullptr;  // [K][W][16] feature rows (the caller's memory)
  float* gring = nullptr;  // [K][W][16] gradient accumulator rows (the caller's memory)
  int64_t ftag[64], gtag[64];      // source row held by each slot, -1: none
  alignas(32) float zero[kS];      // read by taps outside the image (weight 0)
  alignas(32) float tile[kTile][kS];
  alignas(32) float tile2[kTile][kS];  // the fused loss: online rows, then their gradient
  int32_t row[kTile][4], col[kTile][4];
  float w[kTile][4], dx[kTile][4], dy[kTile][4];
  // planar fallback taps ([4][n] layout)
  int32_t pindex[4 * kTile];
  float pweight[4 * kTile], pdx[4 * kTile], pdy[4 * kTile];
};

namespace {
int ring_rows(int64_t W) {
  const int64_t per_row = W * kS * static_cast<int64_t>(sizeof(float));
  return static_cast<int>(std::clamp<int64_t>(kRingBytes / std::max<int64_t>(per_row, 1), 4, 64));
}
}  // namespace

int64_t band_ring_floats(int64_t W) { return 2 * int64_t{ring_rows(W)} * W * kS; }

BandScratch* band_scratch_new(int64_t W, float* rings) {
  auto* s = new BandScratch;
  s->W = W;
  s->K = ring_rows(W);
  // uninitialised: only the slots a band uses are touched (and written before being read)
  s->fring = rings;
  s->gring = rings + int64_t{s->K} * W * kS;
  std::fill(s->zero, s->zero + kS, 0.0f);
  return s;
}
void band_scratch_free(BandScratch* s) { delete s; }

// ---------------------------------------------------------------------------------------------
// The fused dense loss (pyssl.ops.dense_correspondence_loss), planar: any number of channels, a
// point's channels one plane after the other. It serves the channels left after the 16-channel
// slices, CPUs without AVX2, and the band kernels' blocks whose band does not fit the ring.
// ---------------------------------------------------------------------------------------------
namespace {

inline float value1(const float* p) { return *p; }
inline float value1(const uint16_t* p) { return bf16_to_float(*p); }
inline void put1(float* p, float v) { *p = v; }
inline void put1(uint16_t* p, float v) { *p = float_to_bf16(v); }

// sum_k weight[k][j] * plane[pxs * index[k][j]] over the corners inside the image, in corner
// order (pxs: the pixel stride, 1 in NCHW, C in channels-last)
template <typename F>
inline float planar_tap(const F* plane, int64_t pxs, const DenseTaps& t, int64_t n, int64_t j) {
  float acc = 0.0f;
  for (int k = 0; k < 4; ++k) {
    const int32_t i = t.index[k * n + j];
    if (i >= 0) acc += t.weight[k * n + j] * value1(plane + pxs * i);
  }
  return acc;
}

// sums[0], sums[ss], sums[2 * ss] = (sum t^2, sum o^2, sum t o) over channels c < C in order,
// t = tv(c), o = ov(c)
template <typename T, typename V>
inline void point_sums(int64_t C, const T& tv, const V& ov, float* sums, int64_t ss) {
  float tt = 0.0f, oo = 0.0f, to = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float t = tv(c), o = ov(c);
    tt += t * t;
    oo += o * o;
    to += t * o;
  }
  sums[0] = tt;
  sums[ss] = oo;
  sums[2 * ss] = to;
}

// fn(p0, n, taps) for each block of kTile points of coords [P, 2], with the block's taps
template <typename Fn>
void planar_blocks(const float* coords, int64_t P, int64_t H, int64_t W, const Fn& fn) {
  int32_t index[4 * kTile];
  float weight[4 * kTile];
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const int64_t n = std::min<int64_t>(kTile, P - p0);
    const DenseTaps t{index, weight, nullptr, nullptr};
    dense_taps(coords + 2 * p0, n, H, W, t);
    fn(p0, n, t);
  }
}

template <typename F, typename O>
void planar_loss_forward_impl(const F* f, int64_t C, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                              const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                              float* sums, int64_t ss) {
  planar_blocks(coords, P, H, W, [&](int64_t p0, int64_t n, const DenseTaps& t) {
    for (int64_t j = 0; j < n; ++j) {
      point_sums(C, [&](int64_t c) { return planar_tap(f + c * chs, pxs, t, n, j); },
                 [&](int64_t c) { return value1(o + c * os + (p0 + j) * ops); }, sums + p0 + j, ss);
    }
  });
}

template <typename F, typename O>
void planar_loss_backward_impl(const F* f, int64_t C, int64_t H, int64_t W, int64_t chs,
                               int64_t pxs, const float* coords, int64_t P, const O* o, int64_t os,
                               int64_t ops, const float* coef, int64_t cs, O* go, float* gf) {
  planar_blocks(coords, P, H, W, [&](int64_t p0, int64_t n, const DenseTaps& t) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = p0 + j;
      const float cf1 = coef[p], cf2 = coef[cs + p], cg1 = coef[2 * cs + p], cg2 = coef[3 * cs + p];
      const bool adds = gf && !(cf1 == 0.0f && cf2 == 0.0f);  // zero weight: no add
      for (int64_t c = 0; c < C; ++c) {
        const float tv = planar_tap(f + c * chs, pxs, t, n, j), ov = value1(o + c * os + p * ops);
        if (go) put1(go + c * os + p * ops, cg1 * ov + cg2 * tv);
        if (!adds) continue;
        const float r = cf1 * tv + cf2 * ov;
        float* plane = gf + c * chs;
        for (int k = 0; k < 4; ++k) {
          const int32_t i = t.index[k * n + j];
          if (i >= 0) plane[pxs * i] += t.weight[k * n + j] * r;
        }
      }
    }
  });
}

// The band kernels' fallback for blocks taller than the ring when the features are not planes
// (pxs > 1, channels-last): out[c * os + j] over the 16 channels, the planar kernels' arithmetic
template <typename F>
void strided_gather(const F* f, int64_t chs, int64_t pxs, int64_t C, const DenseTaps& t,
                    int64_t n, F* out, int64_t os) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; ++j) put1(out + c * os + j, planar_tap(f + c * chs, pxs, t, n, j));
}
// and the backward: gf (the layout of f) += weight * g (point, corner order), gx / gy += the
// coordinate gradient (in channel order, as the planar kernels' backward_body)
template <typename F>
void strided_backward(const F* f, int64_t chs, int64_t pxs, int64_t C, const float* g, int64_t gs,
                      const DenseTaps& t, int64_t n, float* gf, float* gx, float* gy) {
  for (int64_t j = 0; j < n; ++j) {
    if (gf) {
      for (int64_t c = 0; c < C; ++c) {
        const float gj = g[c * gs + j];
        for (int k = 0; k < 4; ++k) {
          const int32_t i = t.index[k * n + j];
          if (i >= 0) gf[c * chs + pxs * i] += t.weight[k * n + j] * gj;
        }
      }
    }
    if (gx) {
      float ax = gx[j], ay = gy[j];
      for (int64_t c = 0; c < C; ++c) {
        float sx = 0.0f, sy = 0.0f;
        for (int k = 0; k < 4; ++k) {
          const int32_t i = t.index[k * n + j];
          const float v = i < 0 ? 0.0f : value1(f + c * chs + pxs * i);
          sx += i < 0 ? 0.0f : t.dwdx[k * n + j] * v;
          sy += i < 0 ? 0.0f : t.dwdy[k * n + j] * v;
        }
        ax += g[c * gs + j] * sx;
        ay += g[c * gs + j] * sy;
      }
      gx[j] = ax;
      gy[j] = ay;
    }
  }
}

}  // namespace

template <typename F, typename O>
void planar_loss_forward(const F* f, int64_t C, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                         const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                         float* sums, int64_t ss) {
  planar_loss_forward_impl(f, C, H, W, chs, pxs, coords, P, o, os, ops, sums, ss);
}
template <typename F, typename O>
void planar_loss_backward(const F* f, int64_t C, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                          const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                          const float* coef, int64_t cs, O* go, float* gf) {
  planar_loss_backward_impl(f, C, H, W, chs, pxs, coords, P, o, os, ops, coef, cs, go, gf);
}
#define PYSSL_PLANAR_LOSS(F, O)                                                                   \
  template void planar_loss_forward<F, O>(const F*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                          const float*, int64_t, const O*, int64_t, int64_t,     \
                                          float*, int64_t);                                      \
  template void planar_loss_backward<F, O>(const F*, int64_t, int64_t, int64_t, int64_t, int64_t,\
                                           const float*, int64_t, const O*, int64_t, int64_t,    \
                                           const float*, int64_t, O*, float*);
PYSSL_PLANAR_LOSS(float, float)
PYSSL_PLANAR_LOSS(float, uint16_t)
PYSSL_PLANAR_LOSS(uint16_t, float)
PYSSL_PLANAR_LOSS(uint16_t, uint16_t)
#undef PYSSL_PLANAR_LOSS

#ifdef PYSSL_BAND_KERNELS
namespace {

bool band_ok() { return cpu_has_avx2_fma(); }

PYSSL_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = float_to_bf16(v); }
inline void move1(float* p, float v) { *p = v; }
inline void move1(uint16_t* p, float v) {  // v holds a bfloat16 exactly: its upper 16 bits
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *p = static_cast<uint16_t>(u >> 16);
}

// tile[i][c] = src[c * stride + i] for i < n and the 16 channels (float32 or bfloat16 planes into
// channels-last rows: a block's points, or an image row's pixels), 8 x 8 transposes
template <typename T>
PYSSL_AVX2 void planes_to_tile(const T* src, int64_t stride, int64_t n, float (*tile)[kS]) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int h = 0; h < 2; ++h) {
      __m256 a[8];
      for (int q = 0; q < 8; ++q) a[q] = load8(src + (h * 8 + q) * stride + i);
      transpose8(a);
      for (int q = 0; q < 8; ++q) _mm256_storeu_ps(tile[i + q] + h * 8, a[q]);
    }
  }
  for (; i < n; ++i)
    for (int c = 0; c < kS; ++c) tile[i][c] = load1(src + c * stride + i);
}
// row r of the 16 planes gf [16][HW] += src [W][16]
PYSSL_AVX2 void flush_row(const float* src, int64_t HW, int64_t W, int64_t r, float* gf) {
  float* base = gf + r * W;
  int64_t x = 0;
  for (; x + 8 <= W; x += 8) {
    for (int h = 0; h < 2; ++h) {
      __m256 a[8];
      for (int q = 0; q < 8; ++q) a[q] = _mm256_loadu_ps(src + (x + q) * kS + h * 8);
      transpose8(a);
      for (int q = 0; q < 8; ++q) {
        float* p = base + (h * 8 + q) * HW + x;
        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), a[q]));
      }
    }
  }
  for (; x < W; ++x)
    for (int c = 0; c < kS; ++c) base[c * HW + x] += src[x * kS + c];
}

// tile[i][c] = src[i * stride + c] for i < n and the 16 channels (channels-last rows of a map
// whose pixels are `stride` apart: a block's points, or an image row's pixels)
template <typename T>
PYSSL_AVX2 void rows_to_tile(const T* src, int64_t stride, int64_t n, float (*tile)[kS]) {
  for (int64_t i = 0; i < n; ++i) {
    _mm256_storeu_ps(tile[i], load8(src + i * stride));
    _mm256_storeu_ps(tile[i] + 8, load8(src + i * stride + 8));
  }
}
// and back: dst[i * stride + c] = tile[i][c] (bfloat16: rounded to nearest even; kMove: the
// tile holds values of T exactly, whose bits are moved as they are, move8)
template <bool kMove = false, typename T>
PYSSL_AVX2 void tile_to_rows(const float (*tile)[kS], int64_t n, T* dst, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_loadu_ps(tile[i] + h * 8);
      if constexpr (kMove) {
        move8(dst + i * stride + h * 8, v);
      } else {
        store8(dst + i * stride + h * 8, v);
      }
    }
  }
}

// A 16-channel slice of n points in either layout, src[c * chs + i * pxs]: planes (pxs == 1,
// planes chs apart) or channels-last rows (chs == 1, points pxs apart, the map's channel count)
template <typename T>
PYSSL_AVX2 void slice_to_tile(const T* src, int64_t chs, int64_t pxs, int64_t n, float (*tile)[kS]) {
  if (pxs == 1) {
    planes_to_tile(src, chs, n, tile);
  } else {
    rows_to_tile(src, pxs, n, tile);
  }
}

PYSSL_AVX2 void flush_row_cl(const float* src, int64_t pxs, int64_t W, int64_t r, float* gf) {
  for (int64_t x = 0; x < W; ++x) {
    float* p = gf + (r * W + x) * pxs;
    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(src + x * kS)));
    _mm256_storeu_ps(p + 8, _mm256_add_ps(_mm256_loadu_ps(p + 8), _mm256_loadu_ps(src + x * kS + 8)));
  }
}
// row r of a 16-channel slice of gf, in either layout (slice_to_tile), += src [W][16]
PYSSL_AVX2 void flush_slice_row(const float* src, int64_t chs, int64_t pxs, int64_t W, int64_t r,
                                float* gf) {
  if (pxs == 1) {
    flush_row(src, chs, W, r, gf);
  } else {
    flush_row_cl(src, pxs, W, r, gf);
  }
}

// and back: dst[c * stride + i] = tile[i][c] (bfloat16: rounded to nearest even; kMove: the
// tile holds values of T exactly, whose bits are moved as they are, move8)
template <bool kMove = false, typename T>
PYSSL_AVX2 void tile_to_planes(const float (*tile)[kS], int n, T* dst, int64_t stride) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int h = 0; h < 2; ++h) {
      __m256 a[8];
      for (int q = 0; q < 8; ++q) a[q] = _mm256_load_ps(tile[i + q] + h * 8);
      transpose8(a);  // shuffles: the bits as they are
      for (int q = 0; q < 8; ++q) {
        if constexpr (kMove) {
          move8(dst + (h * 8 + q) * stride + i, a[q]);
        } else {
          store8(dst + (h * 8 + q) * stride + i, a[q]);
        }
      }
    }
  }
  for (; i < n; ++i) {
    for (int c = 0; c < kS; ++c) {
      if constexpr (kMove) {
        move1(dst + c * stride + i, tile[i][c]);
      } else {
        store1(dst + c * stride + i, tile[i][c]);
      }
    }
  }
}
// and back into either layout (tile_to_planes, tile_to_rows)
template <bool kMove = false, typename T>
PYSSL_AVX2 void tile_to_slice(const float (*tile)[kS], int n, T* dst, int64_t chs, int64_t pxs) {
  if (pxs == 1) {
    tile_to_planes<kMove>(tile, n, dst, chs);
  } else {
    tile_to_rows<kMove>(tile, n, dst, pxs);
  }
}

// The samples of a block's n points, channels-last (its band's rows in the ring, its taps in s):
// the four taps weighted and summed in corner order, corners outside the image read as zeros
// with weight 0 (+ 0, as the planar kernels' select)
PYSSL_AVX2 void band_sample_tile(const BandScratch* s, int n, int64_t W, float (*tile)[kS]) {
  const int K = s->K;
  for (int i = 0; i < n; ++i) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      const int32_t r = s->row[i][k];
      const float* p = r < 0 ? s->zero : s->fring + ((r % K) * W + s->col[i][k]) * kS;
      const __m256 wv = _mm256_set1_ps(s->w[i][k]);
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(wv, _mm256_loadu_ps(p)));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(wv, _mm256_loadu_ps(p + 8)));
    }
    _mm256_store_ps(tile[i], a0);
    _mm256_store_ps(tile[i] + 8, a1);
  }
}

// Rows [rmin, rmax] of the features in the ring (rows already there are kept)
template <typename F>
PYSSL_AVX2 void ring_load(BandScratch* s, const F* f, int64_t chs, int64_t pxs, int64_t W,
                          int64_t rmin, int64_t rmax) {
  for (int64_t r = rmin; r <= rmax; ++r) {
    const int slot = static_cast<int>(r % s->K);
    if (s->ftag[slot] != r) {
      float* row = s->fring + slot * W * kS;
      slice_to_tile(f + r * W * pxs, chs, pxs, W, reinterpret_cast<float (*)[kS]>(row));
      s->ftag[slot] = r;
    }
  }
}
// Rows [rmin, rmax] of the gradient ring claimed and zeroed; a slot's previous row is added into
// gf (the layout chs, pxs) first
PYSSL_AVX2 void ring_claim(BandScratch* s, float* gf, int64_t chs, int64_t pxs, int64_t W,
                           int64_t rmin, int64_t rmax) {
  float* gring = s->gring;
  for (int64_t r = rmin; r <= rmax; ++r) {
    const int slot = static_cast<int>(r % s->K);
    if (s->gtag[slot] != r) {
      if (s->gtag[slot] >= 0) flush_slice_row(gring + slot * W * kS, chs, pxs, W, s->gtag[slot], gf);
      std::memset(gring + slot * W * kS, 0, sizeof(float) * W * kS);
      s->gtag[slot] = r;
    }
  }
}
// Every row left in the gradient ring added into gf
PYSSL_AVX2 void ring_flush(BandScratch* s, float* gf, int64_t chs, int64_t pxs, int64_t W) {
  for (int slot = 0; slot < s->K; ++slot)
    if (s->gtag[slot] >= 0) flush_slice_row(s->gring + slot * W * kS, chs, pxs, W, s->gtag[slot], gf);
}

// Taps of points [p0, p0 + n) as taps_loop computes them; row -1 for corners outside the image.
// Returns the band [rmin, rmax] of rows touched (rmax = -1: none).
PYSSL_AVX2 void block_taps(BandScratch* s, const float* coords, int64_t p0, int n, int64_t H,
                           int64_t W, bool grads, int64_t* rmin, int64_t* rmax) {
  const float Wf = static_cast<float>(W), Hf = static_cast<float>(H);
  int64_t lo = INT64_MAX, hi = -1;
  for (int i = 0; i < n; ++i) {
    const float x = coords[2 * (p0 + i)], y = coords[2 * (p0 + i) + 1];
    const bool near = x > -2.0f & x < Wf + 1.0f & y > -2.0f & y < Hf + 1.0f;  // false for NaN
    const float xs = near ? x : 0.0f, ys = near ? y : 0.0f;
    const float fx = std::floor(xs), fy = std::floor(ys);
    const float ax = xs - fx, ay = ys - fy;
    const int32_t x0 = static_cast<int32_t>(fx), y0 = static_cast<int32_t>(fy);
    const int32_t cx[4] = {x0, x0 + 1, x0, x0 + 1}, cy[4] = {y0, y0, y0 + 1, y0 + 1};
    const float wk[4] = {(1.0f - ax) * (1.0f - ay), ax * (1.0f - ay), (1.0f - ax) * ay, ax * ay};
    const float dxk[4] = {-(1.0f - ay), 1.0f - ay, -ay, ay};
    const float dyk[4] = {-(1.0f - ax), -ax, 1.0f - ax, ax};
    for (int k = 0; k < 4; ++k) {
      const bool in = near & cx[k] >= 0 & cx[k] < W & cy[k] >= 0 & cy[k] < H;
      s->row[i][k] = in ? cy[k] : -1;
      s->col[i][k] = cx[k];
      s->w[i][k] = in ? wk[k] : 0.0f;
      if (grads) {
        s->dx[i][k] = in ? dxk[k] : 0.0f;
        s->dy[i][k] = in ? dyk[k] : 0.0f;
      }
      if (in) {
        lo = std::min<int64_t>(lo, cy[k]);
        hi = std::max<int64_t>(hi, cy[k]);
      }
    }
  }
  *rmin = lo;
  *rmax = hi;
}

// The block of points [p0, p0 + n), n <= kTile, its taps in s: whether its band of rows
// [rmin, rmax] fits the ring (else the kernels take their planar fallback for it)
struct BandBlock {
  int n;
  int64_t rmin, rmax;
  bool fits;
};
PYSSL_AVX2 BandBlock band_block(BandScratch* s, const float* coords, int64_t p0, int64_t P,
                                int64_t H, int64_t W, bool grads) {
  BandBlock b;
  b.n = static_cast<int>(std::min<int64_t>(kTile, P - p0));
  block_taps(s, coords, p0, b.n, H, W, grads, &b.rmin, &b.rmax);
  b.fits = !(b.rmax >= 0 && b.rmax - b.rmin + 1 > s->K);
  return b;
}
// An empty ring (no row held), at the start of each kernel call
inline void ring_reset(BandScratch* s) {
  std::fill(s->ftag, s->ftag + s->K, int64_t{-1});
  std::fill(s->gtag, s->gtag + s->K, int64_t{-1});
}

template <typename F>
PYSSL_AVX2 void gather_impl(const F* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                            const float* coords, int64_t P, F* out, int64_t os, BandScratch* s) {
  ring_reset(s);
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const BandBlock b = band_block(s, coords, p0, P, H, W, false);
    const int n = b.n;
    if (!b.fits) {  // band taller than the ring: planar kernels
      const DenseTaps t{s->pindex, s->pweight, nullptr, nullptr};
      dense_taps(coords + 2 * p0, n, H, W, t);
      if (pxs == 1) {
        dense_gather(f, kS, chs, t, n, out + p0, os);
      } else {
        strided_gather(f, chs, pxs, kS, t, n, out + p0, os);
      }
      continue;
    }
    ring_load(s, f, chs, pxs, W, b.rmin, b.rmax);
    band_sample_tile(s, n, W, s->tile);
    tile_to_planes(s->tile, n, out + p0, os);
  }
}

PYSSL_AVX2 inline float hsum(__m256 v) {  // fixed order: halves, then pairs
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 1)));
}

// A block's output gradient as float32 planes for the planar fallback kernels: g itself (float32),
// or its n points of the 16 channels widened into buf [16][kTile] (bfloat16)
inline const float* float_block(const float* g, int64_t gs, int, float*, int64_t* stride) {
  *stride = gs;
  return g;
}
inline const float* float_block(const uint16_t* g, int64_t gs, int n, float* buf, int64_t* stride) {
  for (int c = 0; c < kS; ++c)
    for (int j = 0; j < n; ++j) buf[c * kTile + j] = bf16_to_float(g[c * gs + j]);
  *stride = kTile;
  return buf;
}

template <typename F, typename G>
PYSSL_AVX2 void backward_impl(const F* f, int64_t chs, int64_t pxs, const G* g, int64_t gs,
                              int64_t H, int64_t W, const float* coords, int64_t P, float* gf,
                              float* gx, float* gy, BandScratch* s) {
  const int64_t HW = H * W;
  const int K = s->K;
  const bool need_f = gf != nullptr, need_c = gx != nullptr;
  ring_reset(s);
  float* fring = s->fring;
  float* gring = s->gring;
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const BandBlock b = band_block(s, coords, p0, P, H, W, need_c);
    const int n = b.n;
    if (!b.fits) {  // band taller than the ring: planar kernels
      const DenseTaps t{s->pindex, s->pweight, need_c ? s->pdx : nullptr, need_c ? s->pdy : nullptr};
      dense_taps(coords + 2 * p0, n, H, W, t);
      int64_t bs;
      const float* gb = float_block(g + p0, gs, n, &s->tile2[0][0], &bs);
      if (pxs == 1) {
        dense_backward(f, kS, HW, gb, bs, t, n, gf, need_c ? gx + p0 : nullptr,
                       need_c ? gy + p0 : nullptr);
      } else {
        strided_backward(f, chs, pxs, kS, gb, bs, t, n, gf, need_c ? gx + p0 : nullptr,
                         need_c ? gy + p0 : nullptr);
      }
      continue;
    }
    planes_to_tile(g + p0, gs, n, s->tile);  // the gradient rows of the block, channels-last
    if (need_c) ring_load(s, f, chs, pxs, W, b.rmin, b.rmax);
    if (need_f) ring_claim(s, gf, chs, pxs, W, b.rmin, b.rmax);
    for (int j = 0; j < n; ++j) {
      const __m256 g0 = _mm256_load_ps(s->tile[j]), g1 = _mm256_load_ps(s->tile[j] + 8);
      __m256 sx0 = _mm256_setzero_ps(), sx1 = _mm256_setzero_ps();
      __m256 sy0 = _mm256_setzero_ps(), sy1 = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        const int32_t r = s->row[j][k];
        if (r < 0) continue;  // outside the image: weight and its derivatives are 0
        const int64_t at = ((r % K) * W + s->col[j][k]) * kS;
        if (need_f) {
          float* p = gring + at;
          const __m256 wv = _mm256_set1_ps(s->w[j][k]);
          _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_mul_ps(wv, g0)));
          _mm256_storeu_ps(p + 8, _mm256_add_ps(_mm256_loadu_ps(p + 8), _mm256_mul_ps(wv, g1)));
        }
        if (need_c) {
          const float* p = fring + at;
          const __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
          const __m256 dxv = _mm256_set1_ps(s->dx[j][k]), dyv = _mm256_set1_ps(s->dy[j][k]);
          sx0 = _mm256_add_ps(sx0, _mm256_mul_ps(dxv, v0));
          sx1 = _mm256_add_ps(sx1, _mm256_mul_ps(dxv, v1));
          sy0 = _mm256_add_ps(sy0, _mm256_mul_ps(dyv, v0));
          sy1 = _mm256_add_ps(sy1, _mm256_mul_ps(dyv, v1));
        }
      }
      if (need_c) {
        gx[p0 + j] += hsum(_mm256_add_ps(_mm256_mul_ps(g0, sx0), _mm256_mul_ps(g1, sx1)));
        gy[p0 + j] += hsum(_mm256_add_ps(_mm256_mul_ps(g0, sy0), _mm256_mul_ps(g1, sy1)));
      }
    }
  }
  if (need_f) ring_flush(s, gf, chs, pxs, W);
}

template <typename F, typename O>
PYSSL_AVX2 void loss_forward_impl(const F* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                                  const float* coords, int64_t P, const O* o, int64_t os,
                                  int64_t ops, float* sums, int64_t ss, BandScratch* s) {
  ring_reset(s);
  const bool rows = ops != 1;  // channels-last online map: its block's rows read as a tile
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const BandBlock b = band_block(s, coords, p0, P, H, W, false);
    const int n = b.n;
    if (!b.fits) {  // band taller than the ring: planar
      planar_loss_forward_impl(f, kS, H, W, chs, pxs, coords + 2 * p0, n, o + p0 * ops, os, ops,
                               sums + p0, ss);
      continue;
    }
    ring_load(s, f, chs, pxs, W, b.rmin, b.rmax);
    band_sample_tile(s, n, W, s->tile);
    if (rows) rows_to_tile(o + p0 * ops, ops, n, s->tile2);
    // per point, channel by channel in order: 8 points per vector
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 tt = _mm256_setzero_ps(), oo = _mm256_setzero_ps(), to = _mm256_setzero_ps();
      for (int h = 0; h < 2; ++h) {
        __m256 a[8], v[8];
        for (int q = 0; q < 8; ++q) a[q] = _mm256_load_ps(s->tile[i + q] + h * 8);
        transpose8(a);  // a[q]: channel h * 8 + q of the 8 points
        if (rows) {
          for (int q = 0; q < 8; ++q) v[q] = _mm256_load_ps(s->tile2[i + q] + h * 8);
          transpose8(v);
        } else {
          for (int q = 0; q < 8; ++q) v[q] = load8(o + (h * 8 + q) * os + p0 + i);
        }
        for (int q = 0; q < 8; ++q) {
          tt = _mm256_add_ps(tt, _mm256_mul_ps(a[q], a[q]));
          oo = _mm256_add_ps(oo, _mm256_mul_ps(v[q], v[q]));
          to = _mm256_add_ps(to, _mm256_mul_ps(a[q], v[q]));
        }
      }
      _mm256_storeu_ps(sums + p0 + i, tt);
      _mm256_storeu_ps(sums + ss + p0 + i, oo);
      _mm256_storeu_ps(sums + 2 * ss + p0 + i, to);
    }
    for (; i < n; ++i)
      point_sums(kS, [&](int64_t c) { return s->tile[i][c]; },
                 [&](int64_t c) { return value1(o + c * os + (p0 + i) * ops); }, sums + p0 + i, ss);
  }
}

template <typename F, typename O>
PYSSL_AVX2 void loss_backward_impl(const F* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                                   const float* coords, int64_t P, const O* o, int64_t os,
                                   int64_t ops, const float* coef, int64_t cs, O* go, float* gf,
                                   BandScratch* s) {
  const int K = s->K;
  ring_reset(s);
  float* gring = s->gring;
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const BandBlock b = band_block(s, coords, p0, P, H, W, false);
    const int n = b.n;
    if (!b.fits) {  // band taller than the ring: planar
      planar_loss_backward_impl(f, kS, H, W, chs, pxs, coords + 2 * p0, n, o + p0 * ops, os, ops,
                                coef + p0, cs, go ? go + p0 * ops : nullptr, gf);
      continue;
    }
    ring_load(s, f, chs, pxs, W, b.rmin, b.rmax);
    if (gf) ring_claim(s, gf, chs, pxs, W, b.rmin, b.rmax);
    band_sample_tile(s, n, W, s->tile);
    slice_to_tile(o + p0 * ops, os, ops, n, s->tile2);  // the online rows of the block
    for (int j = 0; j < n; ++j) {
      const int64_t p = p0 + j;
      const float cf1 = coef[p], cf2 = coef[cs + p];
      const __m256 t0 = _mm256_load_ps(s->tile[j]), t1 = _mm256_load_ps(s->tile[j] + 8);
      const __m256 o0 = _mm256_load_ps(s->tile2[j]), o1 = _mm256_load_ps(s->tile2[j] + 8);
      if (gf && !(cf1 == 0.0f && cf2 == 0.0f)) {  // zero weight: no add
        const __m256 a = _mm256_set1_ps(cf1), b = _mm256_set1_ps(cf2);
        const __m256 r0 = _mm256_add_ps(_mm256_mul_ps(a, t0), _mm256_mul_ps(b, o0));
        const __m256 r1 = _mm256_add_ps(_mm256_mul_ps(a, t1), _mm256_mul_ps(b, o1));
        for (int k = 0; k < 4; ++k) {
          const int32_t r = s->row[j][k];
          if (r < 0) continue;  // outside the image
          float* q = gring + ((r % K) * W + s->col[j][k]) * kS;
          const __m256 wv = _mm256_set1_ps(s->w[j][k]);
          _mm256_storeu_ps(q, _mm256_add_ps(_mm256_loadu_ps(q), _mm256_mul_ps(wv, r0)));
          _mm256_storeu_ps(q + 8, _mm256_add_ps(_mm256_loadu_ps(q + 8), _mm256_mul_ps(wv, r1)));
        }
      }
      if (go) {  // d L / d o = cg1 o + cg2 t, into tile2 (o is no longer needed)
        const __m256 a = _mm256_set1_ps(coef[2 * cs + p]), b = _mm256_set1_ps(coef[3 * cs + p]);
        _mm256_store_ps(s->tile2[j], _mm256_add_ps(_mm256_mul_ps(a, o0), _mm256_mul_ps(b, t0)));
        _mm256_store_ps(s->tile2[j] + 8, _mm256_add_ps(_mm256_mul_ps(a, o1), _mm256_mul_ps(b, t1)));
      }
    }
    if (go) tile_to_slice(s->tile2, n, go + p0 * ops, os, ops);  // in the online's layout
  }
  if (gf) ring_flush(s, gf, chs, pxs, W);
}

// dst[c * dchs + i * dpxs] = src[c * schs + i * spxs] for the 16 channels and i < n, a block of
// points at a time through the tile (bfloat16 widened exactly and its bits moved back, NaN
// payloads too)
template <typename F>
PYSSL_AVX2 void copy_slice_impl(const F* src, int64_t schs, int64_t spxs, int64_t n, F* dst,
                                int64_t dchs, int64_t dpxs) {
  alignas(32) float tile[kTile][kS];
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int m = static_cast<int>(std::min<int64_t>(kTile, n - i0));
    slice_to_tile(src + i0 * spxs, schs, spxs, m, tile);
    tile_to_slice<true>(tile, m, dst + i0 * dpxs, dchs, dpxs);
  }
}

}  // namespace

bool band_kernels_available() { return band_ok(); }
void copy_slice(const float* src, int64_t schs, int64_t spxs, int64_t n, float* dst, int64_t dchs,
                int64_t dpxs) {
  copy_slice_impl(src, schs, spxs, n, dst, dchs, dpxs);
}
void copy_slice(const uint16_t* src, int64_t schs, int64_t spxs, int64_t n, uint16_t* dst,
                int64_t dchs, int64_t dpxs) {
  copy_slice_impl(src, schs, spxs, n, dst, dchs, dpxs);
}
void band_gather(const float* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                 const float* coords, int64_t P, float* out, int64_t os, BandScratch* s) {
  gather_impl(f, H, W, chs, pxs, coords, P, out, os, s);
}
void band_gather(const uint16_t* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                 const float* coords, int64_t P, uint16_t* out, int64_t os, BandScratch* s) {
  gather_impl(f, H, W, chs, pxs, coords, P, out, os, s);
}
template <typename F, typename G>
void band_backward(const F* f, int64_t chs, int64_t pxs, const G* g, int64_t gs, int64_t H,
                   int64_t W, const float* coords, int64_t P, float* gf, float* gx, float* gy,
                   BandScratch* s) {
  backward_impl(f, chs, pxs, g, gs, H, W, coords, P, gf, gx, gy, s);
}

template <typename F, typename O>
void band_loss_forward(const F* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                       const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                       float* sums, int64_t ss, BandScratch* s) {
  loss_forward_impl(f, H, W, chs, pxs, coords, P, o, os, ops, sums, ss, s);
}
template <typename F, typename O>
void band_loss_backward(const F* f, int64_t H, int64_t W, int64_t chs, int64_t pxs,
                        const float* coords, int64_t P, const O* o, int64_t os, int64_t ops,
                        const float* coef, int64_t cs, O* go, float* gf, BandScratch* s) {
  loss_backward_impl(f, H, W, chs, pxs, coords, P, o, os, ops, coef, cs, go, gf, s);
}

#else  // no AVX2 build: callers use the planar kernels

bool band_kernels_available() { return false; }
// callers check band_kernels_available(): a call here would leave dst unwritten
void copy_slice(const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t) { std::abort(); }
void copy_slice(const uint16_t*, int64_t, int64_t, int64_t, uint16_t*, int64_t, int64_t) {
  std::abort();
}
void band_gather(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, float*,
                 int64_t, BandScratch*) {}
void band_gather(const uint16_t*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                 uint16_t*, int64_t, BandScratch*) {}
template <typename F, typename G>
void band_backward(const F*, int64_t, int64_t, const G*, int64_t, int64_t, int64_t, const float*,
                   int64_t, float*, float*, float*, BandScratch*) {}
template <typename F, typename O>
void band_loss_forward(const F*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const O*,
                       int64_t, int64_t, float*, int64_t, BandScratch*) {}
template <typename F, typename O>
void band_loss_backward(const F*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                        const O*, int64_t, int64_t, const float*, int64_t, O*, float*, BandScratch*) {}

#endif

template void band_backward<float, float>(const float*, int64_t, int64_t, const float*, int64_t,
                                          int64_t, int64_t, const float*, int64_t, float*, float*,
                                          float*, BandScratch*);
template void band_backward<float, uint16_t>(const float*, int64_t, int64_t, const uint16_t*,
                                             int64_t, int64_t, int64_t, const float*, int64_t,
                                             float*, float*, float*, BandScratch*);
template void band_backward<uint16_t, float>(const uint16_t*, int64_t, int64_t, const float*,
                                             int64_t, int64_t, int64_t, const float*, int64_t,
                                             float*, float*, float*, BandScratch*);
template void band_backward<uint16_t, uint16_t>(const uint16_t*, int64_t, int64_t, const uint16_t*,
                                                int64_t, int64_t, int64_t, const float*, int64_t,
                                                float*, float*, float*, BandScratch*);

#define PYSSL_BAND_LOSS(F, O)                                                                    \
  template void band_loss_forward<F, O>(const F*, int64_t, int64_t, int64_t, int64_t,            \
                                        const float*, int64_t, const O*, int64_t, int64_t,       \
                                        float*, int64_t, BandScratch*);                          \
  template void band_loss_backward<F, O>(const F*, int64_t, int64_t, int64_t, int64_t,           \
                                         const float*, int64_t, const O*, int64_t, int64_t,      \
                                         const float*, int64_t, O*, float*, BandScratch*);
PYSSL_BAND_LOSS(float, float)
PYSSL_BAND_LOSS(float, uint16_t)
PYSSL_BAND_LOSS(uint16_t, float)
PYSSL_BAND_LOSS(uint16_t, uint16_t)
#undef PYSSL_BAND_LOSS

}  // namespace pyssl::cpu
