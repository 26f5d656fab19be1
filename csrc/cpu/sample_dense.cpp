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
template <bool grads, bool fracs = false>
PYSSL_INLINE void taps_loop(const float* __restrict coords, int64_t n, int64_t H, int64_t W,
                            int64_t pitch, DenseTaps t) {
  const float Wf = static_cast<float>(W), Hf = static_cast<float>(H);
  const int32_t Wi = static_cast<int32_t>(W), Hi = static_cast<int32_t>(H);
  const int32_t Pi = static_cast<int32_t>(pitch);
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
  float* __restrict fxs = t.fx;
  float* __restrict fys = t.fy;
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
    const int32_t base = y0 * Pi + x0;
    i0[j] = in0 ? base : -1;
    i1[j] = in1 ? base + 1 : -1;
    i2[j] = in2 ? base + Pi : -1;
    i3[j] = in3 ? base + Pi + 1 : -1;
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
    if constexpr (fracs) {
      fxs[j] = ax;
      fys[j] = ay;
    }
  }
}


#ifdef PYSSL_HAVE_AVX2_TAPS
// The taps of 8 points at a time with AVX2 intrinsics (GCC does not vectorise taps_loop): the same
// operations in the same order as taps_loop (no FMA contraction), hence bitwise identical.
__attribute__((target("avx2,fma"))) inline __m256i inside8(__m256i v, __m256i bound) {
  return _mm256_and_si256(_mm256_cmpgt_epi32(v, _mm256_set1_epi32(-1)), _mm256_cmpgt_epi32(bound, v));
}  // 0 <= v < bound, lane-wise

template <bool grads, bool fracs = false>
__attribute__((target("avx2,fma"))) void taps_avx2(const float* coords, int64_t n, int64_t H,
                                                   int64_t W, int64_t pitch, DenseTaps t) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 lo = _mm256_set1_ps(-2.0f);
  const __m256 xhi = _mm256_set1_ps(static_cast<float>(W) + 1.0f);
  const __m256 yhi = _mm256_set1_ps(static_cast<float>(H) + 1.0f);
  const __m256i Wi = _mm256_set1_epi32(static_cast<int32_t>(W));
  const __m256i Hi = _mm256_set1_epi32(static_cast<int32_t>(H));
  const __m256i Pi = _mm256_set1_epi32(static_cast<int32_t>(pitch));
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
    const __m256i base = _mm256_add_epi32(_mm256_mullo_epi32(y0, Pi), x0);
    const __m256i offs[4] = {base, _mm256_add_epi32(base, ione), _mm256_add_epi32(base, Pi),
                             _mm256_add_epi32(_mm256_add_epi32(base, Pi), ione)};
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
    if constexpr (fracs) {
      _mm256_storeu_ps(t.fx + j, ax);
      _mm256_storeu_ps(t.fy + j, ay);
    }
  }
  if (j < n) {  // the tail, scalar, into the same [4][n] layout
    const int64_t r = n - j;
    int32_t ti[4 * 8];
    float tw[4 * 8], tdx[4 * 8], tdy[4 * 8];
    taps_loop<grads, fracs>(coords + 2 * j, r, H, W, pitch,
                            DenseTaps{ti, tw, grads ? tdx : nullptr, grads ? tdy : nullptr,
                                      fracs ? t.fx + j : nullptr, fracs ? t.fy + j : nullptr});
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

// The scalar bodies, for planar images (channel stride cs = H*W, pixel stride ps = 1) and the
// pixel-interleaved quad images (cs = 1, ps = 4): the AVX2 kernels' tails and the baseline build.
template <typename F>
PYSSL_INLINE float tap(const F* plane, int64_t ps, const DenseTaps& t, int64_t n, int k, int64_t j,
                       const float* w) {
  const int32_t i = t.index[k * n + j];
  const float v = load_value(plane, ps * (i < 0 ? 0 : i));
  return i < 0 ? 0.0f : w[k * n + j] * v;
}

// points [j0, n): out[c * out_stride + j] for c < C. In: float, or uint16_t holding bfloat16 (read
// as float); Out likewise (results rounded to nearest even)
template <typename In, typename Out>
PYSSL_INLINE void gather_body(const In* f, int64_t C, int64_t cs, int64_t ps, const DenseTaps& t,
                              int64_t n, Out* out, int64_t out_stride, int64_t j0 = 0) {
  const int32_t* __restrict i0 = t.index;
  const int32_t* __restrict i1 = t.index + n;
  const int32_t* __restrict i2 = t.index + 2 * n;
  const int32_t* __restrict i3 = t.index + 3 * n;
  const float* __restrict w0 = t.weight;
  const float* __restrict w1 = t.weight + n;
  const float* __restrict w2 = t.weight + 2 * n;
  const float* __restrict w3 = t.weight + 3 * n;
  for (int64_t c = 0; c < C; ++c) {
    const In* __restrict plane = f + c * cs;
    Out* __restrict o = out + c * out_stride;
    for (int64_t j = j0; j < n; ++j) {
      // corners outside the image (index -1) read pixel 0 and are masked out
      const float v0 = load_value(plane, ps * (i0[j] < 0 ? 0 : i0[j]));
      const float v1 = load_value(plane, ps * (i1[j] < 0 ? 0 : i1[j]));
      const float v2 = load_value(plane, ps * (i2[j] < 0 ? 0 : i2[j]));
      const float v3 = load_value(plane, ps * (i3[j] < 0 ? 0 : i3[j]));
      float acc = 0.0f;
      acc += i0[j] < 0 ? 0.0f : w0[j] * v0;
      acc += i1[j] < 0 ? 0.0f : w1[j] * v1;
      acc += i2[j] < 0 ? 0.0f : w2[j] * v2;
      acc += i3[j] < 0 ? 0.0f : w3[j] * v3;
      store_value(o, j, acc);
    }
  }
}

// The backward of points [j0, n) of a block over C channels in one pass (points outer,
// channels inner: a point's taps are read once for all channels and both gradients). For each
// (channel, pixel) the feature-gradient contributions (gf: the layout of f) still arrive in
// (point, corner) order, the same result as scattering one plane after the other. gx[j] (and
// gy[j]) accumulate sum_c g_c[j] * sum_k dw/dx f_c[index] in channel order. The output
// gradient (float, or uint16_t bfloat16) may have channel stride gs = 0 (an expanded gradient).
template <typename F, typename G>
PYSSL_INLINE void backward_body(const F* f, int64_t C, int64_t cs, int64_t ps, const G* g,
                                int64_t gs, const DenseTaps& t, int64_t n, float* gf, float* gx,
                                float* gy, int64_t j0 = 0) {
  for (int64_t j = j0; j < n; ++j) {
    if (gf) {
      for (int64_t c = 0; c < C; ++c) {
        const float gj = load_value(g + c * gs, j);
        float* plane = gf + c * cs;
        for (int k = 0; k < 4; ++k) {
          const int32_t i = t.index[k * n + j];
          if (i >= 0) plane[ps * i] += t.weight[k * n + j] * gj;
        }
      }
    }
    if (gx) {
      float ax = gx[j], ay = gy[j];
      for (int64_t c = 0; c < C; ++c) {
        const F* plane = f + c * cs;
        float sx = 0.0f, sy = 0.0f;
        for (int k = 0; k < 4; ++k) {
          sx += tap(plane, ps, t, n, k, j, t.dwdx);
          sy += tap(plane, ps, t, n, k, j, t.dwdy);
        }
        ax += load_value(g + c * gs, j) * sx;
        ay += load_value(g + c * gs, j) * sy;
      }
      gx[j] = ax;
      gy[j] = ay;
    }
  }
}

// The quad backward with the coordinate gradient from the fractions (t.fx, t.fy) instead of the
// derivatives of the weights: per channel, with corner values v0..v3 (0 outside the image),
//   d/dx = (1 - fy) top + fy bottom, top = v1 - v0, bottom = v3 - v2
//   d/dy = (1 - fx) left + fx right, left = v2 - v0, right = v3 - v1
// which is sum_k dwdx[k] v_k (dwdy) with the differences taken first: 10 operations instead of
// 16 per channel, and the same infinities and NaNs (not a lerp top + fy (bottom - top), which
// gives NaN for an infinite corner). The feature-gradient scatter is backward_body's. Points
// [j0, n).
template <typename G>
PYSSL_INLINE void quad_backward_body(const float* q, int64_t C, const G* g, int64_t gs,
                                          const DenseTaps& t, int64_t n, float* acc, float* gx,
                                          float* gy, int64_t j0 = 0) {
  backward_body(q, C, 1, 4, g, gs, t, n, acc, nullptr, nullptr, j0);
  if (!gx) return;
  for (int64_t j = j0; j < n; ++j) {
    float ax = 0.0f, ay = 0.0f;  // all channels here: gx, gy written, not accumulated
    for (int64_t c = 0; c < C; ++c) {
      float v[4];
      for (int k = 0; k < 4; ++k) {
        const int32_t i = t.index[k * n + j];
        v[k] = i < 0 ? 0.0f : q[4 * static_cast<int64_t>(i) + c];
      }
      const float top = v[1] - v[0], bottom = v[3] - v[2];
      const float left = v[2] - v[0], right = v[3] - v[1];
      const float sx = (1.0f - t.fy[j]) * top + t.fy[j] * bottom;
      const float sy = (1.0f - t.fx[j]) * left + t.fx[j] * right;
      ax += load_value(g + c * gs, j) * sx;
      ay += load_value(g + c * gs, j) * sy;
    }
    gx[j] = ax;
    gy[j] = ay;
  }
}

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
  gather_body(f, C, HW, 1, t, n, out, os, j);  // the tail
}
#endif

PYSSL_INLINE void taps_body(const float* coords, int64_t n, int64_t H, int64_t W, int64_t pitch,
                            DenseTaps t) {
  if (t.dwdx) {
    if (t.fx) return taps_loop<true, true>(coords, n, H, W, pitch, t);
    taps_loop<true>(coords, n, H, W, pitch, t);
  } else if (t.fx) {
    taps_loop<false, true>(coords, n, H, W, pitch, t);
  } else {
    taps_loop<false>(coords, n, H, W, pitch, t);
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

// The quad kernels' pack and unpack (sample_dense.h), scalar; their gather and backward are
// gather_body and backward_body with cs = 1, ps = 4.
template <typename F>
PYSSL_INLINE void quad_pack_body(const F* f, int64_t C, int64_t HW, int64_t p0, int64_t p1,
                                 float* q) {  // pixels p0 <= p < p1 of one row, q at p0
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t l = 0; l < kQuadChannels; ++l) q[4 * (p - p0) + l] = l < C ? load_value(f + l * HW, p) : 0.0f;
}

template <typename F>
PYSSL_INLINE void quad_unpack_body(const float* acc, int64_t HW, int64_t C, F* gf, int64_t p0,
                                   int64_t p1) {  // pixels p0 <= p < p1 of one row, acc at p0
  for (int64_t p = p0; p < p1; ++p) {
    const float* a = acc + 4 * (p - p0);
    for (int64_t c = 0; c < C; ++c) store_value(gf + c * HW, p, a[c]);
  }
}

#ifdef PYSSL_HAVE_AVX2_TAPS
// 8 lanes of each of 4 vectors (channels) -> 8 vectors of 4 lanes (points), and back
__attribute__((target("avx2,fma"))) inline void planes_to_quads(const __m256 c[4], __m128 q[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(c[0], c[1]), t1 = _mm256_unpackhi_ps(c[0], c[1]);
  const __m256 t2 = _mm256_unpacklo_ps(c[2], c[3]), t3 = _mm256_unpackhi_ps(c[2], c[3]);
  const __m256 p[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                       _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm256_castps256_ps128(p[i]);
    q[i + 4] = _mm256_extractf128_ps(p[i], 1);
  }
}
__attribute__((target("avx2,fma"))) inline void quads_to_planes(__m128 q[8], __m256 c[4]) {
  _MM_TRANSPOSE4_PS(q[0], q[1], q[2], q[3]);
  _MM_TRANSPOSE4_PS(q[4], q[5], q[6], q[7]);
  for (int i = 0; i < 4; ++i) c[i] = _mm256_set_m128(q[i + 4], q[i]);
}

// 8 pixels at a time: C planes loaded as 8-lane vectors, transposed into 8 quads (pixels
// p0 <= p < p1 of one row, q at p0)
template <typename F>
__attribute__((target("avx2,fma"))) void quad_pack_avx2(const F* f, int64_t C, int64_t HW,
                                                        int64_t p0, int64_t p1, float* q) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t p = p0;
  for (; p + 8 <= p1; p += 8) {
    __m256 c[4];
    for (int l = 0; l < 4; ++l) c[l] = l < C ? load8(f + l * HW + p) : zero;
    __m128 v[8];
    planes_to_quads(c, v);
    for (int i = 0; i < 8; ++i) _mm_store_ps(q + 4 * (p - p0 + i), v[i]);
  }
  quad_pack_body(f, C, HW, p, p1, q + 4 * (p - p0));  // the tail
}

// The 4 corner values (all channels) of point j: zero for corners outside the image
__attribute__((target("avx2,fma"))) inline void quad_corners(const float* q, const DenseTaps& t,
                                                             int64_t n, int64_t j, __m128 v[4]) {
  for (int k = 0; k < 4; ++k) {
    const int32_t i = t.index[k * n + j];
    v[k] = i < 0 ? _mm_setzero_ps() : _mm_load_ps(q + 4 * static_cast<int64_t>(i));
  }
}

template <typename F>
__attribute__((target("avx2,fma"))) void quad_gather_avx2(const float* q, int64_t C,
                                                          const DenseTaps& t, int64_t n, F* out,
                                                          int64_t os) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m128 r[8];
    for (int p = 0; p < 8; ++p) {
      __m128 v[4];
      quad_corners(q, t, n, j + p, v);
      __m128 acc = _mm_setzero_ps();
      for (int k = 0; k < 4; ++k) acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(t.weight[k * n + j + p]), v[k]));
      r[p] = acc;
    }
    __m256 c[4];
    quads_to_planes(r, c);
    for (int64_t l = 0; l < C; ++l) store8(out + l * os + j, c[l]);
  }
  gather_body(q, C, 1, 4, t, n, out, os, j);  // the tail
}

// quad_backward_body 8 points at a time, one pass over each point's corners: the index of a
// corner is read once for the scatter and the corner read
template <typename G>
__attribute__((target("avx2,fma"))) void quad_backward_avx2(const float* q, int64_t C,
                                                                 const G* g, int64_t gs,
                                                                 const DenseTaps& t, int64_t n,
                                                                 float* acc, float* gx, float* gy) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 gc[4];
    for (int l = 0; l < 4; ++l) gc[l] = l < C ? load8(g + l * gs + j) : zero;
    __m128 gq[8];
    planes_to_quads(gc, gq);
    const int32_t* __restrict ix = t.index + j;
    const float* __restrict wt = t.weight + j;
    __m128 sxq[8], syq[8];
    for (int p = 0; p < 8; ++p) {
      int32_t i[4];
      for (int k = 0; k < 4; ++k) i[k] = ix[k * n + p];
      if (acc) {
        __m128 d[4];
        for (int k = 0; k < 4; ++k) d[k] = _mm_mul_ps(_mm_set1_ps(wt[k * n + p]), gq[p]);
        for (int k = 0; k < 4; ++k) {
          if (i[k] < 0) continue;
          float* a = acc + 4 * static_cast<int64_t>(i[k]);
          _mm_store_ps(a, _mm_add_ps(_mm_load_ps(a), d[k]));
        }
      }
      if (gx) {
        __m128 v[4];
        for (int k = 0; k < 4; ++k)
          v[k] = i[k] < 0 ? _mm_setzero_ps() : _mm_load_ps(q + 4 * static_cast<int64_t>(i[k]));
        const __m128 top = _mm_sub_ps(v[1], v[0]), bottom = _mm_sub_ps(v[3], v[2]);
        const __m128 left = _mm_sub_ps(v[2], v[0]), right = _mm_sub_ps(v[3], v[1]);
        const float fx = t.fx[j + p], fy = t.fy[j + p];
        sxq[p] = _mm_add_ps(_mm_mul_ps(_mm_set1_ps(1.0f - fy), top),
                            _mm_mul_ps(_mm_set1_ps(fy), bottom));
        syq[p] = _mm_add_ps(_mm_mul_ps(_mm_set1_ps(1.0f - fx), left),
                            _mm_mul_ps(_mm_set1_ps(fx), right));
      }
    }
    if (!gx) continue;
    __m256 sx[4], sy[4];
    quads_to_planes(sxq, sx);
    quads_to_planes(syq, sy);
    __m256 ax = _mm256_setzero_ps(), ay = _mm256_setzero_ps();
    for (int64_t l = 0; l < C; ++l) {
      ax = _mm256_add_ps(ax, _mm256_mul_ps(gc[l], sx[l]));
      ay = _mm256_add_ps(ay, _mm256_mul_ps(gc[l], sy[l]));
    }
    _mm256_storeu_ps(gx + j, ax);
    _mm256_storeu_ps(gy + j, ay);
  }
  quad_backward_body(q, C, g, gs, t, n, acc, gx, gy, j);  // the tail
}

// 8 pixels at a time: transposed into planes, C of them stored (bfloat16: rounded) (pixels
// p0 <= p < p1 of one row, acc at p0)
template <typename F>
__attribute__((target("avx2,fma"))) void quad_unpack_avx2(const float* acc, int64_t HW, int64_t C,
                                                          F* gf, int64_t p0, int64_t p1) {
  int64_t p = p0;
  for (; p + 8 <= p1; p += 8) {
    __m128 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm_load_ps(acc + 4 * (p - p0 + i));
    __m256 c[4];
    quads_to_planes(r, c);
    for (int64_t l = 0; l < C; ++l) store8(gf + l * HW + p, c[l]);
  }
  quad_unpack_body(acc + 4 * (p - p0), HW, C, gf, p, p1);  // the tail
}
#endif

#ifdef PYSSL_HAVE_AVX2_TAPS
// The backward for float32 or bfloat16 features: the feature gradient by scatter_runs (AVX2 has
// no scatter), the coordinate gradient 8 points at a time (corner_values8; corners outside the
// image read 0 and have derivative 0) with the same products summed in the same order as
// backward_body, hence bitwise identical to it.
template <typename F>
__attribute__((target("avx2,fma"))) void backward_avx2(const F* f, int64_t C, int64_t HW,
                                                       const float* g, int64_t gs,
                                                       const DenseTaps& t, int64_t n, float* gf,
                                                       float* gx, float* gy) {
  if (gf) scatter_runs(g, gs, C, HW, t, n, gf);
  if (!gx) return;
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const Corners8 cr = corners8(t, n, j);
    __m256 dx[4], dy[4];
    for (int k = 0; k < 4; ++k) {
      dx[k] = _mm256_loadu_ps(t.dwdx + k * n + j);
      dy[k] = _mm256_loadu_ps(t.dwdy + k * n + j);
    }
    __m256 ax = _mm256_loadu_ps(gx + j), ay = _mm256_loadu_ps(gy + j);
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
    _mm256_storeu_ps(gx + j, ax);
    _mm256_storeu_ps(gy + j, ay);
  }
  backward_body(f, C, HW, 1, g, gs, t, n, nullptr, gx, gy, j);  // the tail
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

// pixels j0 <= j < W of the row (taps in the [4][W] layout); the backward flow interleaved,
// qb [H*W][2] = (bu, bv) per pixel (pair_pack)
PYSSL_INLINE void flow_check_body(const float* u, const float* v, const float* qb, int64_t j0,
                                  int64_t W, float alpha1, float alpha2, const DenseTaps& t,
                                  bool* valid) {
  for (int64_t j = j0; j < W; ++j) {
    float bu = 0.0f, bv = 0.0f;
    for (int k = 0; k < 4; ++k) {
      const int32_t idx = t.index[k * W + j];
      const float w = t.weight[k * W + j];
      const bool read = idx >= 0 & w != 0.0f;
      const int64_t at = 2 * static_cast<int64_t>(read ? idx : 0);
      bu += read ? w * qb[at] : 0.0f;
      bv += read ? w * qb[at + 1] : 0.0f;
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

// pair_pack for 8 pixels at a time; returns the first pixel left for the scalar tail
__attribute__((target("avx2,fma"))) int64_t pair_pack_avx2(const float* f, int64_t HW, int64_t p0,
                                                           int64_t p1, float* q) {
  int64_t p = p0;
  for (; p + 8 <= p1; p += 8) {
    const __m256 a = _mm256_loadu_ps(f + p), b = _mm256_loadu_ps(f + HW + p);
    const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);
    _mm256_storeu_ps(q + 2 * p, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(q + 2 * p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  return p;
}

// flow_check_body for 8 pixels at a time: per pixel the 4 corners' (bu, bv) as 64-bit reads of
// the interleaved backward flow (into lanes 0, 1), weighted and summed in corner order (corners outside the image
// or with weight 0 are not read: a NaN or inf neighbour with weight 0 does not poison the
// sample), transposed into bu and bv lanes for the check; then the scalar body for the tail
__attribute__((target("avx2,fma"))) void flow_check_avx2(const float* u, const float* v,
                                                         const float* qb, int64_t W, float alpha1,
                                                         float alpha2, const DenseTaps& t,
                                                         bool* valid) {
  const __m256 a1 = _mm256_set1_ps(alpha1), a2 = _mm256_set1_ps(alpha2);
  int64_t j = 0;
  const __m256 zero8 = _mm256_setzero_ps();
  for (; j + 8 <= W; j += 8) {
    // all 32 corners inside the image with a nonzero weight (the common case): each point's
    // horizontal pair of corners is one 128-bit read (bu0, bv0, bu1, bv1), and the weighted
    // sums run over 8 points at a time
    __m256i any = _mm256_setzero_si256();
    __m256 wzero = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      any = _mm256_or_si256(any, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.index + k * W + j)));
      wzero = _mm256_or_ps(wzero, _mm256_cmp_ps(_mm256_loadu_ps(t.weight + k * W + j), zero8, _CMP_EQ_OQ));
    }
    const bool fast = _mm256_movemask_ps(_mm256_or_ps(_mm256_castsi256_ps(any), wzero)) == 0;
    __m256 bu, bv;
    if (fast) {
      // the 8 points' top and bottom pairs transposed into lanes: (bu, bv) of corners 0, 1
      // (top) and 2, 3 (bottom) for 8 points each, then summed in corner order in 8 lanes
      __m128 top[8], bottom[8];
      for (int p = 0; p < 8; ++p) {
        top[p] = _mm_loadu_ps(qb + 2 * static_cast<int64_t>(t.index[j + p]));
        bottom[p] = _mm_loadu_ps(qb + 2 * static_cast<int64_t>(t.index[2 * W + j + p]));
      }
      __m256 c01[4], c23[4];  // bu0, bv0, bu1, bv1 (and bu2, bv2, bu3, bv3)
      quads_to_planes(top, c01);
      quads_to_planes(bottom, c23);
      __m256 w[4];
      for (int k = 0; k < 4; ++k) w[k] = _mm256_loadu_ps(t.weight + k * W + j);
      bu = _mm256_add_ps(zero8, _mm256_mul_ps(w[0], c01[0]));
      bv = _mm256_add_ps(zero8, _mm256_mul_ps(w[0], c01[1]));
      bu = _mm256_add_ps(bu, _mm256_mul_ps(w[1], c01[2]));
      bv = _mm256_add_ps(bv, _mm256_mul_ps(w[1], c01[3]));
      bu = _mm256_add_ps(bu, _mm256_mul_ps(w[2], c23[0]));
      bv = _mm256_add_ps(bv, _mm256_mul_ps(w[2], c23[1]));
      bu = _mm256_add_ps(bu, _mm256_mul_ps(w[3], c23[2]));
      bv = _mm256_add_ps(bv, _mm256_mul_ps(w[3], c23[3]));
    } else {
      __m128 r[8];
      for (int p = 0; p < 8; ++p) {
        __m128 acc = _mm_setzero_ps();
        for (int k = 0; k < 4; ++k) {
          const int32_t idx = t.index[k * W + j + p];
          const float w = t.weight[k * W + j + p];
          if (idx >= 0 && w != 0.0f)
            acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(w), _mm_castpd_ps(_mm_load_sd(
                                      reinterpret_cast<const double*>(qb + 2 * static_cast<int64_t>(idx))))));
          else
            acc = _mm_add_ps(acc, _mm_setzero_ps());
        }
        r[p] = acc;
      }
      __m256 b[4];
      quads_to_planes(r, b);
      bu = b[0], bv = b[1];
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
  flow_check_body(u, v, qb, j, W, alpha1, alpha2, t, valid);  // the tail
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
  gather_body(f, C, HW, 1, taps, n, out, out_stride);
}

template <typename F>
void backward_dispatch(const F* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                       const DenseTaps& taps, int64_t n, float* grad_f, float* gx, float* gy) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) return backward_avx2(f, C, HW, g, g_stride, taps, n, grad_f, gx, gy);
#endif
  backward_body(f, C, HW, 1, g, g_stride, taps, n, grad_f, gx, gy);
}

}  // namespace

template <typename F>
void quad_pack_rows(const F* f, int64_t C, int64_t H, int64_t W, int64_t pitch, int64_t r0,
                    int64_t r1, float* q) {
  const int64_t HW = H * W;
  for (int64_t r = r0; r < r1; ++r) {
    float* qr = q + 4 * r * pitch;
#ifdef PYSSL_HAVE_AVX2_TAPS
    if (cpu_has_avx2_fma()) {
      quad_pack_avx2(f, C, HW, r * W, (r + 1) * W, qr);
    } else
#endif
    {
      quad_pack_body(f, C, HW, r * W, (r + 1) * W, qr);
    }
    for (int64_t l = 4 * W; l < 4 * pitch; ++l) qr[l] = 0.0f;  // the row's padding
  }
}
void quad_pack(const float* f, int64_t C, int64_t H, int64_t W, int64_t pitch, int64_t r0,
               int64_t r1, float* q) {
  quad_pack_rows(f, C, H, W, pitch, r0, r1, q);
}
void quad_pack(const uint16_t* f, int64_t C, int64_t H, int64_t W, int64_t pitch, int64_t r0,
               int64_t r1, float* q) {
  quad_pack_rows(f, C, H, W, pitch, r0, r1, q);
}
template <typename F>
void quad_gather_dispatch(const float* q, int64_t C, const DenseTaps& taps, int64_t n, F* out,
                          int64_t out_stride) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) return quad_gather_avx2(q, C, taps, n, out, out_stride);
#endif
  gather_body(q, C, 1, 4, taps, n, out, out_stride);
}
void quad_gather(const float* q, int64_t C, const DenseTaps& taps, int64_t n, float* out,
                 int64_t out_stride) {
  quad_gather_dispatch(q, C, taps, n, out, out_stride);
}
void quad_gather(const float* q, int64_t C, const DenseTaps& taps, int64_t n, uint16_t* out,
                 int64_t out_stride) {
  quad_gather_dispatch(q, C, taps, n, out, out_stride);
}
template <typename G>
void quad_backward_dispatch(const float* q, int64_t C, const G* g, int64_t g_stride,
                            const DenseTaps& taps, int64_t n, float* acc, float* gx, float* gy) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) return quad_backward_avx2(q, C, g, g_stride, taps, n, acc, gx, gy);
#endif
  quad_backward_body(q, C, g, g_stride, taps, n, acc, gx, gy);
}
void quad_backward(const float* q, int64_t C, const float* g, int64_t g_stride,
                   const DenseTaps& taps, int64_t n, float* acc, float* gx, float* gy) {
  quad_backward_dispatch(q, C, g, g_stride, taps, n, acc, gx, gy);
}
void quad_backward(const float* q, int64_t C, const uint16_t* g, int64_t g_stride,
                   const DenseTaps& taps, int64_t n, float* acc, float* gx, float* gy) {
  quad_backward_dispatch(q, C, g, g_stride, taps, n, acc, gx, gy);
}
template <typename F>
void quad_unpack_rows(const float* acc, int64_t H, int64_t W, int64_t pitch, int64_t C, F* gf,
                      int64_t r0, int64_t r1) {
  const int64_t HW = H * W;
  for (int64_t r = r0; r < r1; ++r) {
    const float* ar = acc + 4 * r * pitch;
#ifdef PYSSL_HAVE_AVX2_TAPS
    if (cpu_has_avx2_fma()) {
      quad_unpack_avx2(ar, HW, C, gf, r * W, (r + 1) * W);
      continue;
    }
#endif
    quad_unpack_body(ar, HW, C, gf, r * W, (r + 1) * W);
  }
}
void quad_unpack(const float* acc, int64_t H, int64_t W, int64_t pitch, int64_t C, float* gf,
                 int64_t r0, int64_t r1) {
  quad_unpack_rows(acc, H, W, pitch, C, gf, r0, r1);
}
void quad_unpack(const float* acc, int64_t H, int64_t W, int64_t pitch, int64_t C, uint16_t* gf,
                 int64_t r0, int64_t r1) {
  quad_unpack_rows(acc, H, W, pitch, C, gf, r0, r1);
}

// The smallest y of n points (coords [n, 2]), NaN ignored; +inf when there is none
PYSSL_INLINE float min_y_body(const float* coords, int64_t n) {
  float mn = INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float y = coords[2 * j + 1];
    mn = y < mn ? y : mn;
  }
  return mn;
}
#ifdef PYSSL_HAVE_AVX2_TAPS
__attribute__((target("avx2,fma"))) float min_y_avx2(const float* coords, int64_t n) {
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 mn = inf;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // (x, y) x 4; x lanes replaced by +inf
    const __m256 v = _mm256_blend_ps(inf, _mm256_loadu_ps(coords + 2 * j), 0xAA);
    mn = _mm256_min_ps(v, mn);  // min_ps returns its second operand when one is NaN
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, mn);
  float r = min_y_body(coords + 2 * j, n - j);
  for (float l : lanes) r = l < r ? l : r;
  return r;
}
#endif
float min_y(const float* coords, int64_t n) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) return min_y_avx2(coords, n);
#endif
  return min_y_body(coords, n);
}

void dense_taps(const float* coords, int64_t n, int64_t H, int64_t W, int64_t pitch,
                DenseTaps taps) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) {
    if (taps.dwdx) {
      if (taps.fx) return taps_avx2<true, true>(coords, n, H, W, pitch, taps);
      taps_avx2<true>(coords, n, H, W, pitch, taps);
    } else if (taps.fx) {
      taps_avx2<false, true>(coords, n, H, W, pitch, taps);
    } else {
      taps_avx2<false>(coords, n, H, W, pitch, taps);
    }
    return;
  }
#endif
  taps_body(coords, n, H, W, pitch, taps);
}
void dense_taps(const float* coords, int64_t n, int64_t H, int64_t W, DenseTaps taps) {
  dense_taps(coords, n, H, W, W, taps);
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
                    const DenseTaps& taps, int64_t n, float* grad_f, float* gx, float* gy) {
  backward_dispatch(f, C, HW, g, g_stride, taps, n, grad_f, gx, gy);
}
void dense_backward(const uint16_t* f, int64_t C, int64_t HW, const float* g, int64_t g_stride,
                    const DenseTaps& taps, int64_t n, float* grad_f, float* gx, float* gy) {
  backward_dispatch(f, C, HW, g, g_stride, taps, n, grad_f, gx, gy);
}

// min over the indices >= 0 (as unsigned: -1 is the largest) and max over all of them: two
// reductions the compiler vectorises (AVX2: vpminud, vpmaxsd)
PYSSL_INLINE void index_range_body(const int32_t* index, int64_t m, int32_t* lo, int32_t* hi) {
  uint32_t mn = UINT32_MAX;
  int32_t mx = -1;
  for (int64_t i = 0; i < m; ++i) {
    const int32_t v = index[i];
    const uint32_t u = static_cast<uint32_t>(v);
    mn = u < mn ? u : mn;
    mx = v > mx ? v : mx;
  }
  *lo = mx < 0 ? 0 : static_cast<int32_t>(mn);
  *hi = mx;
}
PYSSL_MULTIVERSION(void, index_range_mv,
                   (const int32_t* index, int64_t m, int32_t* lo, int32_t* hi), (index, m, lo, hi),
                   index_range_body)

void index_range(const int32_t* index, int64_t m, int32_t* lo, int32_t* hi) {
  index_range_mv(index, m, lo, hi);
}
void pair_pack(const float* f, int64_t HW, int64_t p0, int64_t p1, float* q) {
  int64_t p = p0;
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) p = pair_pack_avx2(f, HW, p0, p1, q);
#endif
  for (; p < p1; ++p) {
    q[2 * p] = f[p];
    q[2 * p + 1] = f[HW + p];
  }
}

void flow_row(const float* u, const float* v, const float* qb, int64_t i, int64_t W, int64_t H,
              float alpha1, float alpha2, const DenseTaps& taps, float* coords, bool* valid) {
#ifdef PYSSL_HAVE_AVX2_TAPS
  if (cpu_has_avx2_fma()) {
    flow_coords_avx2(u, v, i, W, H, coords, valid);
    if (!qb) return;
    dense_taps(coords, W, H, W, taps);
    return flow_check_avx2(u, v, qb, W, alpha1, alpha2, taps, valid);
  }
#endif
  flow_coords_body(u, v, i, W, H, coords, valid);
  if (!qb) return;
  dense_taps(coords, W, H, W, taps);
  flow_check_body(u, v, qb, 0, W, alpha1, alpha2, taps, valid);
}

}  // namespace pyssl::cpu
