// Torch-free dense bilinear sampling kernels; see csrc/cpu/sample_dense.h. Semantics equal
// kernels/sampling_math.h (sample_taps): far or non-finite coordinates touch nothing; corners
// outside the image contribute nothing (not even 0 * NaN); inside corners contribute w * v.
#include "cpu/sample_dense.h"

#include "cpu/simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "cpu/avx2_lanes.h"
#define PYSSL_HAVE_AVX2_TAPS 1
#endif

namespace pyssl::cpu {
namespace {

// Branch-free, one point per iteration, so the loop vectorises; `grads` is a compile-time
// choice (two instantiations) rather than a test inside the loop.
template <bool grads>
PYSSL_INLINE void taps_loop(const float* __restrict coords, int64_t n, int64_t H, int64_t W, DenseTaps t) {
  const float Wf = static_cast<float>(W), Hf = static_cast<float>(H);
  const int32_t Wi = static_cast<int32_t>(W), Hi = static_cast<int32_t>(H);
  int32_t* __restrict i0 = t.index;
  int32_t* __restrict i1 = t.index + n;
  int32_t* __restrict i2 = t.index + 2 * n;
  int32_t* __restrict i3 = t.index + 3 * n;
  float* __restrict w0 = t.weight;
  float* __restrict w1 = t.weight + n;
  float* __restrict w2 = t.weight + 2 * n;
  float* __restrict w3 = t.weight + 3 * n;
  float* __restrict dx = t.dwdx;
  float* __restrict dy = t.dwdy;
  for (int64_t j = 0; j < n; ++j) {
    const float x = coords[2 * j], y = coords[2 * j + 1];
    const bool near = x > -2.0f & x < Wf + 1.0f & y > -2.0f & y < Hf + 1.0f;  // false for NaN
    const float xs = near ? x : 0.0f, ys = near ? y : 0.0f;
    const float fx = std::floor(xs), fy = std::floor(ys);
    const float ax = xs - fx, ay = ys - fy;
    const int32_t x0 = static_cast<int32_t>(fx), y0 = static_cast<int32_t>(fy);
    const bool vx0 = x0 >= 0 & x0 < Wi, vx1 = x0 + 1 >= 0 & x0 + 1 < Wi;
    const bool vy0 = y0 >= 0 & y0 < Hi, vy1 = y0 + 1 >= 0 & y0 + 1 < Hi;
    const bool in0 = near & vx0 & vy0, in1 = near & vx1 & vy0;
    const bool in2 = near & vx0 & vy1, in3 = near & vx1 & vy1;
    const int32_t base = y0 * Wi + x0;
    i0[j] = in0 ? base : -1;
    i1[j] = in1 ? base + 1 : -1;
    i2[j] = in2 ? base + Wi : -1;
    i3[j] = in3 ? base + Wi + 1 : -1;
    w0[j] = in0 ? (1.0f - ax) * (1.0f - ay) : 0.0f;
    w1[j] = in1 ? ax * (1.0f - ay) : 0.0f;
    w2[j] = in2 ? (1.0f - ax) * ay : 0.0f;
    w3[j] = in3 ? ax * ay : 0.0f;
    if constexpr (grads) {
      dx[j] = in0 ? -(1.0f - ay) : 0.0f;
      dx[n + j] = in1 ? 1.0f - ay : 0.0f;
      dx[2 * n + j] = in2 ? -ay : 0.0f;
      dx[3 * n + j] = in3 ? ay : 0.0f;
      dy[j] = in0 ? -(1.0f - ax) : 0.0f;
      dy[n + j] = in1 ? -ax : 0.0f;
      dy[2 * n + j] = in2 ? 1.0f - ax : 0.0f;
      dy[3 * n + j] = in3 ? ax : 0.0f;
    }
  }
}


#ifdef PYSSL_HAVE_AVX2_TAPS
// The taps of 8 points at a time with AVX2 intrinsics (GCC does not vectorise taps_loop): the same
// operations in the same order as taps_loop (no FMA contraction), hence bitwise identical.
__attribute__((target("avx2,fma"))) inline __m256i inside8(__m256i v, __m256i bound) {
  return _mm256_and_si256(_mm256_cmpgt_epi32(v, _mm256_set1_epi32(-1)), _mm256_cmpgt_epi32(bound, v));
}  // 0 <= v < bound, lane-wise

template <bool grads>
__attribute__((target("avx2,fma"))) void taps_avx2(const float* coords, int64_t n, int64_t H,
                                                   int64_t W, DenseTaps t) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 lo = _mm256_set1_ps(-2.0f);
  const __m256 xhi = _mm256_set1_ps(static_cast<float>(W) + 1.0f);
  const __m256 yhi = _mm256_set1_ps(static_cast<float>(H) + 1.0f);
  const __m256i Wi = _mm256_set1_epi32(static_cast<int32_t>(W));
  const __m256i Hi = _mm256_set1_epi32(static_cast<int32_t>(H));
  const __m256i minus1 = _mm256_set1_epi32(-1), ione = _mm256_set1_epi32(1);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_loadu_ps(coords + 2 * j), b = _mm256_loadu_ps(coords + 2 * j + 8);
    const __m256 xp = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 yp = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    const __m256 x = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xp), _MM_SHUFFLE(3, 1, 2, 0)));
    const __m256 y = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(yp), _MM_SHUFFLE(3, 1, 2, 0)));
    const __m256 near = _mm256_and_ps(
        _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GT_OQ), _mm256_cmp_ps(x, xhi, _CMP_LT_OQ)),
        _mm256_and_ps(_mm256_cmp_ps(y, lo, _CMP_GT_OQ), _mm256_cmp_ps(y, yhi, _CMP_LT_OQ)));
    const __m256 xs = _mm256_and_ps(near, x), ys = _mm256_and_ps(near, y);
    const __m256 fx = _mm256_floor_ps(xs), fy = _mm256_floor_ps(ys);
    const __m256 ax = _mm256_sub_ps(xs, fx), ay = _mm256_sub_ps(ys, fy);
    const __m256i x0 = _mm256_cvttps_epi32(fx), y0 = _mm256_cvttps_epi32(fy);
    const __m256i x1 = _mm256_add_epi32(x0, ione), y1 = _mm256_add_epi32(y0, ione);
    const __m256i nearm = _mm256_castps_si256(near);
    const __m256i vx0 = inside8(x0, Wi), vx1 = inside8(x1, Wi), vy0 = inside8(y0, Hi), vy1 = inside8(y1, Hi);
    const __m256i in[4] = {_mm256_and_si256(nearm, _mm256_and_si256(vx0, vy0)),
                           _mm256_and_si256(nearm, _mm256_and_si256(vx1, vy0)),
                           _mm256_and_si256(nearm, _mm256_and_si256(vx0, vy1)),
                           _mm256_and_si256(nearm, _mm256_and_si256(vx1, vy1))};
    const __m256i base = _mm256_add_epi32(_mm256_mullo_epi32(y0, Wi), x0);
    const __m256i offs[4] = {base, _mm256_add_epi32(base, ione), _mm256_add_epi32(base, Wi),
                             _mm256_add_epi32(_mm256_add_epi32(base, Wi), ione)};
    const __m256 omx = _mm256_sub_ps(one, ax), omy = _mm256_sub_ps(one, ay);
    const __m256 w[4] = {_mm256_mul_ps(omx, omy), _mm256_mul_ps(ax, omy), _mm256_mul_ps(omx, ay),
                         _mm256_mul_ps(ax, ay)};
    for (int k = 0; k < 4; ++k) {
      const __m256i idx = _mm256_blendv_epi8(minus1, offs[k], in[k]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.index + k * n + j), idx);
      _mm256_storeu_ps(t.weight + k * n + j, _mm256_and_ps(_mm256_castsi256_ps(in[k]), w[k]));
    }
    if constexpr (grads) {
      const __m256 dxv[4] = {_mm256_sub_ps(zero, omy), omy, _mm256_sub_ps(zero, ay), ay};
      const __m256 dyv[4] = {_mm256_sub_ps(zero, omx), _mm256_sub_ps(zero, ax), omx, ax};
      for (int k = 0; k < 4; ++k) {
        const __m256 m = _mm256_castsi256_ps(in[k]);
        _mm256_storeu_ps(t.dwdx + k * n + j, _mm256_and_ps(m, dxv[k]));
        _mm256_storeu_ps(t.dwdy + k * n + j, _mm256_and_ps(m, dyv[k]));
      }
    }
  }
  if (j < n) {  // the tail, scalar, into the same [4][n] layout
    const int64_t r = n - j;
    int32_t ti[4 * 8];
    float tw[4 * 8], tdx[4 * 8], tdy[4 * 8];
    taps_loop<grads>(coords + 2 * j, r, H, W, DenseTaps{ti, tw, grads ? tdx : nullptr, grads ? tdy : nullptr});
    for (int k = 0; k < 4; ++k)
      for (int64_t q = 0; q < r; ++q) {
        t.index[k * n + j + q] = ti[k * r + q];
        t.weight[k * n + j + q] = tw[k * r + q];
        if (grads) {
          t.dwdx[k * n + j + q] = tdx[k * r + q];
          t.dwdy[k * n + j + q] = tdy[k * r + q];
        }
      }
  }
}
#endif

PYSSL_INLINE float load_value(const float* p, int64_t i) { return p[i]; }
PYSSL_INLINE float load_value(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
PYSSL_INLINE void store_value(float* p, int64_t i, float v) { p[i] = v; }
PYSSL_INLINE void store_value(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

#ifdef PYSSL_HAVE_AVX2_TAPS
// The 4 corner values of 8 points, from the [4][n] taps at point j. When all 32 corners are
// inside the image (the common case), each point's two horizontal neighbours are adjacent in
// memory (index[1] = index[0] + 1, index[3] = index[2] + 1), so four 4-lane 64-bit gathers fetch
// the pairs: half the gathered elements of four 8-lane 32-bit gathers, which cost about 25
// cycles each on Zen 3. Otherwise masked 32-bit gathers, corners outside the image read as 0.
// Either way the same values, so results do not depend on the path.
__attribute__((target("avx2,fma"))) inline void split_pairs(__m256d a, __m256d b, __m256* even,
                                                            __m256* odd) {
  const __m256 x = _mm256_castpd_ps(a), y = _mm256_castpd_ps(b);
  const __m256 e = _mm256_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 o = _mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1));
  *even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
  *odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}

struct Corners8 {
  __m256i ix[4];
  __m256 mask[4];
  bool inside;           // all 32 corners inside the image
  const int32_t* index;  // index[k * n + q]: corner k of point q (q < 8) of these 8 points
  int64_t n;
};

__attribute__((target("avx2,fma"))) inline Corners8 corners8(const DenseTaps& t, int64_t n,
                                                             int64_t j) {
  Corners8 c;
  c.index = t.index + j;
  c.n = n;
  const __m256i minus1 = _mm256_set1_epi32(-1);
  __m256i any = _mm256_setzero_si256();
  for (int k = 0; k < 4; ++k) {
    c.ix[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.index + k * n + j));
    c.mask[k] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(c.ix[k], minus1));
    any = _mm256_or_si256(any, c.ix[k]);
  }
  c.inside = _mm256_movemask_ps(_mm256_castsi256_ps(any)) == 0;  // no index is -1
  return c;
}

__attribute__((target("avx2,fma"))) inline void corner_values8(const float* plane,
                                                               const Corners8& c, __m256 v[4]) {
  if (c.inside) {
    const double* base = reinterpret_cast<const double*>(plane);
    for (int r = 0; r < 2; ++r) {  // top pair (corners 0, 1), bottom pair (corners 2, 3)
      const __m256i ix = c.ix[2 * r];
      const __m256d a = _mm256_i32gather_pd(base, _mm256_castsi256_si128(ix), 4);
      const __m256d b = _mm256_i32gather_pd(base, _mm256_extracti128_si256(ix, 1), 4);
      split_pairs(a, b, &v[2 * r], &v[2 * r + 1]);
    }
    return;
  }
  for (int k = 0; k < 4; ++k)
    v[k] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), plane, c.ix[k], c.mask[k], 4);
}

// bfloat16 planes: one 8-lane 32-bit gather per image row reads each point's two horizontal
// neighbours at once (2 x 16 bits); blocks with a corner outside the image read scalar (a 32-bit
// read of a single bfloat16 could pass the end of the plane).
__attribute__((target("avx2,fma"))) inline void corner_values8(const uint16_t* plane,
                                                               const Corners8& c, __m256 v[4]) {
  if (c.inside) {
    const int* base = reinterpret_cast<const int*>(plane);
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int r = 0; r < 2; ++r) {
      const __m256i pair = _mm256_i32gather_epi32(base, c.ix[2 * r], 2);
      v[2 * r] = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
      v[2 * r + 1] = _mm256_castsi256_ps(_mm256_and_si256(pair, high));
    }
    return;
  }
  alignas(32) float tmp[4][8];
  for (int k = 0; k < 4; ++k) {
    for (int q = 0; q < 8; ++q) {
      const int32_t i = c.index[k * c.n + q];
      tmp[k][q] = i < 0 ? 0.0f : bf16_to_float(plane[i]);
    }
    v[k] = _mm256_load_ps(tmp[k]);
  }
}

// The planar float32 gather, 8 points at a time (GCC does not emit gathers for gather_body):
// the same products summed in the same order; corners outside the image are not read (read as
// 0 with weight 0: + 0, as the select in gather_body).
template <typename F>
__attribute__((target("avx2,fma"))) void gather_avx2(const F* f, int64_t C, int64_t HW,
                                                     const DenseTaps& t, int64_t n, F* out,
                                                     int64_t os) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const Corners8 cr = corners8(t, n, j);
    __m256 w[4];
    for (int k = 0; k < 4; ++k) w[k] = _mm256_loadu_ps(t.weight + k * n + j);
    for (int64_t c = 0; c < C; ++c) {
      __m256 v[4];
      corner_values8(f + c * HW, cr, v);
      __m256 acc = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) acc = _mm256_add_ps(acc, _mm256_mul_ps(w[k], v[k]));
      store8(out + c * os + j, acc);
    }
  }
  for (int64_t c = 0; c < C; ++c) {  // the tail
    const F* plane = f + c * HW;
    for (int64_t q = j; q < n; ++q) {
      float acc = 0.0f;
      for (int k = 0; k < 4; ++k) {
        const int32_t i = t.index[k * n + q];
        acc += i < 0 ? 0.0f : t.weight[k * n + q] * load_value(plane, i);
      }
      store_value(out + c * os, q, acc);
    }
  }
}
#endif

PYSSL_INLINE void taps_body(const float* coords, int64_t n, int64_t H, int64_t W, DenseTaps t) {
  if (t.dwdx) {
    taps_loop<true>(coords, n, H, W, t);
  } else {
    taps_loop<false>(coords, n, H, W, t);
  }
}


template <typename F>
PYSSL_INLINE float tap(const F* plane, const DenseTaps& t, int64_t n, int k, int64_t j,
                       const float* w) {
  const int32_t i = t.index[k * n + j];
  const float v = load_value(plane, i < 0 ? 0 : i);
  return i < 0 ? 0.0f : w[k * n + j] * v;
}

// F: float, or uint16_t holding bfloat16 (read as float, results rounded to nearest even)
template <typename F>
PYSSL_INLINE void gather_body(const F* f, int64_t C, int64_t HW, const DenseTaps& t,
                              int64_t n, F* out, int64_t out_stride) {
  const int32_t* __restrict i0 = t.index;
  const int32_t* __restrict i1 = t.index + n;
  const int32_t* __restrict i2 = t.index + 2 * n;
  const int32_t* __restrict i3 = t.index + 3 * n;
  const float* __restrict w0 = t.weight;
  const float* __restrict w1 = t.weight + n;
  const float* __restrict w2 = t.weight + 2 * n;
  const float* __restrict w3 = t.weight + 3 * n;
  for (int64_t c = 0; c < C; ++c) {
    const F* __restrict plane = f + c * HW;
    F* __restrict o = out + c * out_stride;
    for (int64_t j = 0; j < n; ++j) {
      // corners outside the image (index -1) read pixel 0 and are masked out
      const float v0 = load_value(plane, i0[j] < 0 ? 0 : i0[j]), v1 = load_value(plane, i1[j] < 0 ? 0 : i1[j]);
      const float v2 = load_value(plane, i2[j] < 0 ? 0 : i2[j]), v3 = load_value(plane, i3[j] < 0 ? 0 : i3[j]);
      float acc = 0.0f;
      acc += i0[j] < 0 ? 0.0f : w0[j] * v0;
      acc += i1[j] < 0 ? 0.0f : w1[j] * v1;
      acc += i2[j] < 0 ? 0.0f : w2[j] * v2;
      acc += i3[j] < 0 ? 0.0f : w3[j] * v3;
      store_value(o, j, acc);
    }
  }
}

// The backward of points [j0, n) of a block over C channel planes in one pass (points outer,
// channels inner: a point's taps are read once for all channels and both gradients). For each
// (channel, pixel) the feature-gradient contributions still arrive in (point, corner) order,
// the same result as scattering one plane after the other. gxy[2j] (and y) accumulate
// sum_c g_c[j] * sum_k dw/dx f_c[index] in channel order. The output gradient's channel
// stride gs may be 0 (an expanded gradient).
template <typename F>
PYSSL_INLINE void backward_body(const F* f, int64_t C, int64_t HW, const float* g, int64_t gs,
                                const DenseTaps& t, int64_t n, float* gf, float* gxy,
                                int64_t j0 = 0) {
  for (int64_t j = j0; j < n; ++j) {
    if (gf) {
      for (int64_t c = 0; c < C; ++c) {
        const float gj = g[c * gs + j];
        float* plane = gf + c * HW;
        for (int k = 0; k < 4; ++k) {
          const int32_t i = t.index[k * n + j];
          if (i >= 0) plane[i] += t.weight[k * n + j] * gj;
        }
      }
    }
    if (gxy) {
      float ax = gxy[2 * j], ay = gxy[2 * j + 1];
      for (int64_t c = 0; c < C; ++c) {
        const F* plane = f + c * HW;
        float sx = 0.0f, sy = 0.0f;
        for (int k = 0; k < 4; ++k) {
          sx += tap(plane, t, n, k, j, t.dwdx);
          sy += tap(plane, t, n, k, j, t.dwdy);
        }
        ax += g[c * gs + j] * sx;
        ay += g[c * gs + j] * sy;
      }
      gxy[2 * j] = ax;
      gxy[2 * j + 1] = ay;
    }
  }
}

// The feature-gradient scatter of a block of points, one channel plane at a time, with the
// contributions to the pixel last touched in each of the two image rows of a point's corners
// (top: corners 0, 1; bottom: 2, 3) summed in a register until the row moves on: neighbouring
// points of a smooth flow share a corner (the right corner of one is the left corner of the
// next), so each pixel is read and written once per run instead of once per corner, and a
// point's read of a pixel no longer waits on (or is speculated past) the previous point's
// store to it. Contributions to a pixel are still added in point order, grouped by run.
PYSSL_INLINE void scatter_runs(const float* g, int64_t gs, int64_t C, int64_t HW,
                               const DenseTaps& t, int64_t n, float* gf) {
  const int32_t* __restrict idx = t.index;
  const float* __restrict w = t.weight;
  for (int64_t c = 0; c < C; ++c) {
    float* __restrict plane = gf + c * HW;
    const float* __restrict gc = g + c * gs;
    int32_t pend[2] = {-1, -1};
    float sum[2] = {0.0f, 0.0f};
    for (int64_t j = 0; j < n; ++j) {
      const float gj = gc[j];
      for (int k = 0; k < 4; ++k) {
        const int32_t i = idx[k * n + j];
        if (i < 0) continue;
        const int r = k >> 1;
        const float a = w[k * n + j] * gj;
        if (i == pend[r]) {
          sum[r] += a;
        } else {
          if (pend[r] >= 0) plane[pend[r]] += sum[r];
          pend[r] = i;
          sum[r] = a;
        }
      }
    }
    for (int r = 0; r < 2; ++r)
      if (pend[r] >= 0) plane[pend[r]] += sum[r];
  }
}

#ifdef PYSSL_HAVE_AVX2_TAPS
// The backward for float32 or bfloat16 features: the feature gradient by scatter_runs (AVX2 has
// no scatter), the coordinate gradient 8 points at a time (corner_values8; corners outside the
// image read 0 and have derivative 0) with the same products summed in the same order as
// backward_body, hence bitwise identical to it.
template <typename F>
__attribute__((target("avx2,fma"))) void backward_avx2(const F* f, int64_t C, int64_t HW,
                                                       const float* g, int64_t gs,
                                                       const DenseTaps& t, int64_t n, float* gf,
                                                       float* gxy) {
  if (gf) scatter_runs(g, gs, C, HW, t, n, gf);
  if (!gxy) return;
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const Corners8 cr = corners8(t, n, j);
    __m256 dx[4], dy[4];
    for (int k = 0; k < 4; ++k) {
      dx[k] = _mm256_loadu_ps(t.dwdx + k * n + j);
      dy[k] = _mm256_loadu_ps(t.dwdy + k * n + j);
    }
    // gxy [8, 2] -> x and y lanes in point order
    const __m256 a = _mm256_loadu_ps(gxy + 2 * j), b = _mm256_loadu_ps(gxy + 2 * j + 8);
    const __m256 xp = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 yp = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    __m256 ax = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xp), _MM_SHUFFLE(3, 1, 2, 0)));
    __m256 ay = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(yp), _MM_SHUFFLE(3, 1, 2, 0)));
    for (int64_t c = 0; c < C; ++c) {
      __m256 v[4];
      corner_values8(f + c * HW, cr, v);
      __m256 sx = zero, sy = zero;
      for (int k = 0; k < 4; ++k) {
        sx = _mm256_add_ps(sx, _mm256_mul_ps(dx[k], v[k]));
        sy = _mm256_add_ps(sy, _mm256_mul_ps(dy[k], v[k]));
      }
      const __m256 gc = _mm256_loadu_ps(g + c * gs + j);
      ax = _mm256_add_ps(ax, _mm256_mul_ps(gc, sx));
      ay = _mm256_add_ps(ay, _mm256_mul_ps(gc, sy));
    }
    const __m256 lo = _mm256_unpacklo_ps(ax, ay), hi = _mm256_unpackhi_ps(ax, ay);
    _mm256_storeu_ps(gxy + 2 * j, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(gxy + 2 * j + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  backward_body<F>(f, C, HW, g, gs, t, n, nullptr, gxy, j);  // the tail
}
#endif

// One image row of flow_correspondence, in two passes around the taps of the targets:
// coordinates (j + u, i + v) and the inside-the-frame test, then the forward-backward check
// against the backward flow bilinearly sampled at the target. The same operations in the same
// order as kernels/flow_math.h (flow_match); taps with weight 0 are not read (a NaN neighbour
// with weight 0 does not poison the sample).
PYSSL_INLINE void flow_coords_body(const float* u, const float* v, int64_t i, int64_t W, int64_t H,
                                   float* coords, bool* valid, int64_t j0 = 0) {
  const float Wm1 = static_cast<float>(W - 1), Hm1 = static_cast<float>(H - 1);
  const float fi = static_cast<float>(i);
  for (int64_t j = j0; j < W; ++j) {
    const float x = static_cast<float>(j) + u[j], y = fi + v[j];
    coords[2 * j] = x;
    coords[2 * j + 1] = y;
    const bool finite = (u[j] - u[j]) == 0.0f & (v[j] - v[j]) == 0.0f;
    valid[j] = finite & x >= 0.0f & x <= Wm1 & y >= 0.0f & y <= Hm1;
  }
}

// pixels j0 <= j < W of the row (taps in the [4][W] layout)
PYSSL_INLINE void flow_check_body(const float* u, const float* v, const float* bu_plane,
                                  const float* bv_plane, int64_t j0, int64_t W, float alpha1,
                                  float alpha2, const DenseTaps& t, bool* valid) {
  for (int64_t j = j0; j < W; ++j) {
    float bu = 0.0f, bv = 0.0f;
    for (int k = 0; k < 4; ++k) {
      const int32_t idx = t.index[k * W + j];
      const float w = t.weight[k * W + j];
      const bool read = idx >= 0 & w != 0.0f;
      const int32_t at = read ? idx : 0;
      bu += read ? w * bu_plane[at] : 0.0f;
      bv += read ? w * bv_plane[at] : 0.0f;
    }
    const float du = u[j] + bu, dv = v[j] + bv;
    const float lhs = du * du + dv * dv;
    const float rhs = alpha1 * (u[j] * u[j] + v[j] * v[j] + bu * bu + bv * bv) + alpha2;
    valid[j] = valid[j] & (lhs <= rhs);
  }
}

#ifdef PYSSL_HAVE_AVX2_TAPS
// flow_coords_body for 8 pixels at a time (GCC does not vectorise the interleaved coordinate
// stores): the same operations, then the scalar body for the tail
__attribute__((target("avx2,fma"))) void flow_coords_avx2(const float* u, const float* v,
                                                          int64_t i, int64_t W, int64_t H,
                                                          float* coords, bool* valid) {
  const __m256 zero = _mm256_setzero_ps(), eight = _mm256_set1_ps(8.0f);
  const __m256 Wm1 = _mm256_set1_ps(static_cast<float>(W - 1));
  const __m256 Hm1 = _mm256_set1_ps(static_cast<float>(H - 1));
  const __m256 fi = _mm256_set1_ps(static_cast<float>(i));
  __m256 jv = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);  // exact: W < 2^24
  int64_t j = 0;
  for (; j + 8 <= W; j += 8, jv = _mm256_add_ps(jv, eight)) {
    const __m256 uu = _mm256_loadu_ps(u + j), vv = _mm256_loadu_ps(v + j);
    const __m256 x = _mm256_add_ps(jv, uu), y = _mm256_add_ps(fi, vv);
    const __m256 lo = _mm256_unpacklo_ps(x, y), hi = _mm256_unpackhi_ps(x, y);
    _mm256_storeu_ps(coords + 2 * j, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(coords + 2 * j + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    const __m256 finite = _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(uu, uu), zero, _CMP_EQ_OQ),
                                        _mm256_cmp_ps(_mm256_sub_ps(vv, vv), zero, _CMP_EQ_OQ));
    const __m256 in_x = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GE_OQ), _mm256_cmp_ps(x, Wm1, _CMP_LE_OQ));
    const __m256 in_y = _mm256_and_ps(_mm256_cmp_ps(y, zero, _CMP_GE_OQ), _mm256_cmp_ps(y, Hm1, _CMP_LE_OQ));
    const int ok = _mm256_movemask_ps(_mm256_and_ps(finite, _mm256_and_ps(in_x, in_y)));
    for (int q = 0; q < 8; ++q) valid[j + q] = ((ok >> q) & 1) != 0;
  }
  flow_coords_body(u, v, i, W, H, coords, valid, j);  // the tail
}

// flow_check_body for 8 pixels at a time (masked gathers), then the scalar body for the tail
__attribute__((target("avx2,fma"))) void flow_check_avx2(const float* u, const float* v,
                                                         const float* bu_plane,
                                                         const float* bv_plane, int64_t W,
                                                         float alpha1, float alpha2,
                                                         const DenseTaps& t, bool* valid) {
  const __m256 zero = _mm256_setzero_ps(), a1 = _mm256_set1_ps(alpha1), a2 = _mm256_set1_ps(alpha2);
  int64_t j = 0;
  for (; j + 8 <= W; j += 8) {
    // corners with weight 0 may be read (a pair gather) but never add: their products are
    // masked off, so a NaN or inf neighbour with weight 0 does not poison the sample
    const Corners8 cr = corners8(t, W, j);
    __m256 su[4], sv[4];
    corner_values8(bu_plane, cr, su);
    corner_values8(bv_plane, cr, sv);
    __m256 bu = zero, bv = zero;
    for (int k = 0; k < 4; ++k) {
      const __m256 w = _mm256_loadu_ps(t.weight + k * W + j);
      const __m256 read = _mm256_and_ps(cr.mask[k], _mm256_cmp_ps(w, zero, _CMP_NEQ_UQ));
      bu = _mm256_add_ps(bu, _mm256_and_ps(read, _mm256_mul_ps(w, su[k])));
      bv = _mm256_add_ps(bv, _mm256_and_ps(read, _mm256_mul_ps(w, sv[k])));
    }
    const __m256 uu = _mm256_loadu_ps(u + j), vv = _mm256_loadu_ps(v + j);
    const __m256 du = _mm256_add_ps(uu, bu), dv = _mm256_add_ps(vv, bv);
    const __m256 lhs = _mm256_add_ps(_mm256_mul_ps(du, du), _mm256_mul_ps(dv, dv));
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(uu, uu), _mm256_mul_ps(vv, vv)),
                                                 _mm256_mul_ps(bu, bu)), _mm256_mul_ps(bv, bv));
    const __m256 rhs = _mm256_add_ps(_mm256_mul_ps(a1, s), a2);
    const int ok = _mm256_movemask_ps(_mm256_cmp_ps(lhs, rhs, _CMP_LE_OQ));
    for (int q = 0; q < 8; ++q) valid[j + q] = valid[j + q] & (((ok >> q) & 1) != 0);
  }
  flow_check_body(u, v, bu_plane, bv_plane, j, W, alpha1, alpha2, t, valid);  // the tail
}
#endif

// Dispatch: the AVX2 kernels above when the CPU has AVX2+FMA, else the scalar bodies (baseline
// build; every AVX2 kernel is bitwise equal to its body except scatter_runs' grouping of adds).
template <typename F>
void gather_dispatch(const F* f, int64_t C, int64_t HW, const DenseTaps& taps, int64_t n, F* out,
                     int64_t out_stride) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) return gather_avx2(f, C, HW, taps, n, out, out_stride);
#endif
  gather_body(f, C, HW, taps, n, out, out_stride);
}

template <typename F>
void backward_dispatch(const F* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                       const DenseTaps& taps, int64_t n, float* grad_f, float* gxy) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) return backward_avx2(f, C, HW, g, g_stride, taps, n, grad_f, gxy);
#endif
  backward_body(f, C, HW, g, g_stride, taps, n, grad_f, gxy);
}

}  // namespace

void dense_taps(const float* coords, int64_t n, int64_t H, int64_t W, DenseTaps taps) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) {
    if (taps.dwdx) {
      taps_avx2<true>(coords, n, H, W, taps);
    } else {
      taps_avx2<false>(coords, n, H, W, taps);
    }
    return;
  }
#endif
  taps_body(coords, n, H, W, taps);
}
void dense_gather(const float* f, int64_t C, int64_t HW, const DenseTaps& taps, int64_t n,
                  float* out, int64_t out_stride) {
  gather_dispatch(f, C, HW, taps, n, out, out_stride);
}
void dense_gather(const uint16_t* f, int64_t C, int64_t HW, const DenseTaps& taps, int64_t n,
                  uint16_t* out, int64_t out_stride) {
  gather_dispatch(f, C, HW, taps, n, out, out_stride);
}
void dense_backward(const float* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                    const DenseTaps& taps, int64_t n, float* grad_f, float* gxy) {
  backward_dispatch(f, C, HW, g, g_stride, taps, n, grad_f, gxy);
}
void dense_backward(const uint16_t* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                    const DenseTaps& taps, int64_t n, float* grad_f, float* gxy) {
  backward_dispatch(f, C, HW, g, g_stride, taps, n, grad_f, gxy);
}

void flow_row(const float* u, const float* v, const float* bu, const float* bv, int64_t i,
              int64_t W, int64_t H, float alpha1, float alpha2, const DenseTaps& taps,
              float* coords, bool* valid) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) {
    flow_coords_avx2(u, v, i, W, H, coords, valid);
    if (!bu) return;
    dense_taps(coords, W, H, W, taps);
    return flow_check_avx2(u, v, bu, bv, W, alpha1, alpha2, taps, valid);
  }
#endif
  flow_coords_body(u, v, i, W, H, coords, valid);
  if (!bu) return;
  dense_taps(coords, W, H, W, taps);
  flow_check_body(u, v, bu, bv, 0, W, alpha1, alpha2, taps, valid);
}

}  // namespace pyssl::cpu
