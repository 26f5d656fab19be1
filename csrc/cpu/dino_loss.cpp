// Torch-free CPU chunk kernels of the fused DINO loss; see csrc/cpu/dino_loss.h.
#include "cpu/dino_loss.h"

#include "cpu/simd.h"

namespace pyssl::cpu {
namespace {

// float16 rows: their bits, a type of their own beside bfloat16's uint16_t.
struct Half16 {
  uint16_t bits;
};

// Element k of a row of dtype In, converted to acc_t.
template <typename acc_t>
PYSSL_INLINE acc_t ld(const Half16* p, int64_t k) { return static_cast<acc_t>(half_to_float(p[k].bits)); }
template <typename acc_t>
PYSSL_INLINE acc_t ld(const float* p, int64_t k) { return static_cast<acc_t>(p[k]); }
template <typename acc_t>
PYSSL_INLINE acc_t ld(const double* p, int64_t k) { return static_cast<acc_t>(p[k]); }
template <typename acc_t>
PYSSL_INLINE acc_t ld(const uint16_t* p, int64_t k) { return static_cast<acc_t>(bf16_to_float(p[k])); }

template <typename acc_t>
PYSSL_INLINE void st(float* p, int64_t k, acc_t x) { p[k] = static_cast<float>(x); }
template <typename acc_t>
PYSSL_INLINE void st(double* p, int64_t k, acc_t x) { p[k] = static_cast<double>(x); }
template <typename acc_t>
PYSSL_INLINE void st(uint16_t* p, int64_t k, acc_t x) { p[k] = float_to_bf16(static_cast<float>(x)); }
template <typename acc_t>
PYSSL_INLINE void st(Half16* p, int64_t k, acc_t x) { p[k].bits = float_to_half(static_cast<float>(x)); }

// Runs the statement given last with p_ bound to the row as a typed pointer (float, double,
// float16 or bf16 bits). A macro, not a lambda, so that the call is inlined into each ISA build
// of the caller.
#define PYSSL_DINO_DISPATCH(dt, ptr, ...)                                           \
  do {                                                                              \
    if ((dt) == DType::kFloat32) {                                                  \
      const float* p_ = static_cast<const float*>(ptr);                             \
      __VA_ARGS__;                                                                  \
    } else if ((dt) == DType::kFloat64) {                                           \
      const double* p_ = static_cast<const double*>(ptr);                           \
      __VA_ARGS__;                                                                  \
    } else if ((dt) == DType::kFloat16) {                                           \
      const Half16* p_ = static_cast<const Half16*>(ptr);                           \
      __VA_ARGS__;                                                                  \
    } else {                                                                        \
      const uint16_t* p_ = static_cast<const uint16_t*>(ptr);                       \
      __VA_ARGS__;                                                                  \
    }                                                                               \
  } while (0)

// Lanes of the row passes below: 32, so that bf16 rows (16-bit loads) still fill 512-bit
// vectors in the AVX-512 build (GCC sizes the vectors of a lane loop by its narrowest type),
// and the dot products run several independent accumulator chains.
constexpr int kRowLanes = 32;

template <typename acc_t>
PYSSL_INLINE acc_t lanes_max(const acc_t* lanes) {
  acc_t m = lanes[0];
  for (int j = 1; j < kRowLanes; ++j) m = max_of(m, lanes[j]);
  return m;
}
template <typename acc_t>
PYSSL_INLINE acc_t lanes_sum(const acc_t* lanes) {
  acc_t s = 0;
  for (int j = 0; j < kRowLanes; ++j) s += lanes[j];
  return s;
}

// sum_k exp(x_k * scale - shift) (scale = 1 when x is already scaled), lane-wise.
template <typename acc_t, typename In>
PYSSL_INLINE acc_t sum_exp(const In* __restrict x, int64_t n, acc_t scale, acc_t shift) {
  acc_t lanes[kRowLanes] = {};
  int64_t k = 0;
  for (; k + kRowLanes <= n; k += kRowLanes)
    for (int j = 0; j < kRowLanes; ++j) lanes[j] += exp_approx(ld<acc_t>(x, k + j) * scale - shift);
  for (int j = 0; k + j < n; ++j) lanes[j] += exp_approx(ld<acc_t>(x, k + j) * scale - shift);
  return lanes_sum(lanes);
}

// NaN and +inf need no probe in these maxima (unlike lane_max below): the exp pass that follows
// over the same values turns a NaN, or a +inf max (inf - inf), into a NaN sum, and so a NaN loss.
template <typename acc_t, typename In>
PYSSL_INLINE void teacher_forward_typed(const In* __restrict t, const acc_t* __restrict c,
                                        int64_t n, acc_t inv, acc_t* __restrict colsum,
                                        acc_t* __restrict e, acc_t* m_out, acc_t* z_out) {
  acc_t mx[kRowLanes];
  for (int j = 0; j < kRowLanes; ++j) mx[j] = -INFINITY;
  int64_t k = 0;
  for (; k + kRowLanes <= n; k += kRowLanes)
    for (int j = 0; j < kRowLanes; ++j) {
      const acc_t x = ld<acc_t>(t, k + j);
      colsum[k + j] += x;
      e[k + j] = (x - c[k + j]) * inv;
      mx[j] = max_of(mx[j], e[k + j]);
    }
  for (int j = 0; k + j < n; ++j) {
    const acc_t x = ld<acc_t>(t, k + j);
    colsum[k + j] += x;
    e[k + j] = (x - c[k + j]) * inv;
    mx[j] = max_of(mx[j], e[k + j]);
  }
  const acc_t m = lanes_max(mx);
  const acc_t shift = m == -INFINITY ? acc_t(0) : m;
  acc_t lanes[kRowLanes] = {};
  k = 0;
  for (; k + kRowLanes <= n; k += kRowLanes)
    for (int j = 0; j < kRowLanes; ++j) {
      e[k + j] = exp_approx(e[k + j] - shift);
      lanes[j] += e[k + j];
    }
  for (int j = 0; k + j < n; ++j) {
    e[k + j] = exp_approx(e[k + j] - shift);
    lanes[j] += e[k + j];
  }
  *m_out = m;
  *z_out = lanes_sum(lanes);
}

template <typename acc_t>
PYSSL_INLINE void teacher_forward_body(const void* t, DType dt, const acc_t* c, int64_t n,
                                       acc_t inv, acc_t* colsum, acc_t* e, acc_t* m, acc_t* z) {
  PYSSL_DINO_DISPATCH(dt, t, teacher_forward_typed<acc_t>(p_, c, n, inv, colsum, e, m, z));
}

// One pass for the max and the dots with the first teacher rows (NE = 2: DINO's two global crops;
// NE = 1: one teacher row, as iBOT's patches), one pass per further teacher row, then the exp
// pass.
template <typename acc_t, int NE, typename In>
PYSSL_INLINE void student_forward_typed(const In* __restrict s, int64_t n, acc_t inv,
                                        const acc_t* __restrict e, int64_t lde, int64_t n_e,
                                        acc_t* dots, acc_t* m_out, acc_t* z_out) {
  const acc_t* __restrict e0 = e;
  const acc_t* __restrict e1 = e + (NE > 1 ? lde : 0);
  acc_t mx[kRowLanes], d0[kRowLanes] = {}, d1[kRowLanes] = {};
  for (int j = 0; j < kRowLanes; ++j) mx[j] = -INFINITY;
  int64_t k = 0;
  for (; k + kRowLanes <= n; k += kRowLanes)
    for (int j = 0; j < kRowLanes; ++j) {
      const acc_t x = ld<acc_t>(s, k + j);
      mx[j] = max_of(mx[j], x);
      d0[j] += e0[k + j] * x;
      if (NE > 1) d1[j] += e1[k + j] * x;
    }
  for (int j = 0; k + j < n; ++j) {
    const acc_t x = ld<acc_t>(s, k + j);
    mx[j] = max_of(mx[j], x);
    d0[j] += e0[k + j] * x;
    if (NE > 1) d1[j] += e1[k + j] * x;
  }
  dots[0] = lanes_sum(d0);
  if (NE > 1) dots[1] = lanes_sum(d1);
  for (int64_t i = NE; i < n_e; ++i) {
    const acc_t* __restrict ei = e + i * lde;
    acc_t d[kRowLanes] = {};
    k = 0;
    for (; k + kRowLanes <= n; k += kRowLanes)
      for (int j = 0; j < kRowLanes; ++j) d[j] += ei[k + j] * ld<acc_t>(s, k + j);
    for (int j = 0; k + j < n; ++j) d[j] += ei[k + j] * ld<acc_t>(s, k + j);
    dots[i] = lanes_sum(d);
  }
  const acc_t m = lanes_max(mx) * inv;
  const acc_t shift = m == -INFINITY ? acc_t(0) : m;
  *m_out = m;
  *z_out = sum_exp(s, n, inv, shift);
}

template <typename acc_t>
PYSSL_INLINE void student_forward_body(const void* s, DType dt, int64_t n, acc_t inv,
                                       const acc_t* e, int64_t lde, int64_t n_e, acc_t* dots,
                                       acc_t* m, acc_t* z) {
  if (n_e >= 2) {  // n_e >= 1: n_teacher_crops >= 1
    PYSSL_DINO_DISPATCH(dt, s, student_forward_typed<acc_t, 2>(p_, n, inv, e, lde, n_e, dots, m, z));
  } else {
    PYSSL_DINO_DISPATCH(dt, s, student_forward_typed<acc_t, 1>(p_, n, inv, e, lde, n_e, dots, m, z));
  }
}

template <typename acc_t, typename In>
PYSSL_INLINE void teacher_probs_typed(const In* __restrict t, const acc_t* __restrict c, int64_t n,
                                      acc_t inv, acc_t lse, acc_t* __restrict q) {
  for (int64_t k = 0; k < n; ++k) q[k] = exp_approx((ld<acc_t>(t, k) - c[k]) * inv - lse);
}

template <typename acc_t>
PYSSL_INLINE void teacher_probs_body(const void* t, DType dt, const acc_t* c, int64_t n,
                                     acc_t inv, acc_t lse, acc_t* q) {
  PYSSL_DINO_DISPATCH(dt, t, teacher_probs_typed<acc_t>(p_, c, n, inv, lse, q));
}

template <typename acc_t>
PYSSL_INLINE void sum_rows_body(const acc_t* src, int64_t lds, int64_t n_src, int64_t skip,
                                int64_t n, acc_t* __restrict dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = 0;
  for (int64_t i = 0; i < n_src; ++i) {
    if (i == skip) continue;
    const acc_t* __restrict r = src + i * lds;
    for (int64_t k = 0; k < n; ++k) dst[k] += r[k];
  }
}

template <typename acc_t, typename In>
PYSSL_INLINE void grad_typed(const In* __restrict s, int64_t n, acc_t inv, acc_t lse,
                             const acc_t* __restrict Q, acc_t n_v, acc_t coef, In* __restrict o) {
  for (int64_t k = 0; k < n; ++k)
    st<acc_t>(o, k, coef * (n_v * exp_approx(ld<acc_t>(s, k) * inv - lse) - Q[k]));
}

template <typename acc_t>
PYSSL_INLINE void grad_body(const void* s, DType dt, int64_t n, acc_t inv, acc_t lse,
                            const acc_t* Q, acc_t n_v, acc_t coef, void* out) {
  if (dt == DType::kFloat32) {
    grad_typed<acc_t>(static_cast<const float*>(s), n, inv, lse, Q, n_v, coef, static_cast<float*>(out));
  } else if (dt == DType::kFloat64) {
    grad_typed<acc_t>(static_cast<const double*>(s), n, inv, lse, Q, n_v, coef, static_cast<double*>(out));
  } else if (dt == DType::kFloat16) {
    grad_typed<acc_t>(static_cast<const Half16*>(s), n, inv, lse, Q, n_v, coef, static_cast<Half16*>(out));
  } else {
    grad_typed<acc_t>(static_cast<const uint16_t*>(s), n, inv, lse, Q, n_v, coef,
                      static_cast<uint16_t*>(out));
  }
}

// Lane-wise max over a chunk: element k goes to lane k % kLanes, lanes combine in order.
// Vector max instructions drop NaNs, so a parallel probe (x * 0 is NaN exactly for NaN and
// +-inf; -inf is probed as 0) makes the result NaN whenever the chunk holds a NaN or +inf:
// such logits give a NaN log-sum-exp, never a silently finite one. -inf is an ordinary logit
// of probability 0 (a masked prototype), as in torch's softmax and logsumexp.
template <typename acc_t>
PYSSL_INLINE acc_t lane_max(const acc_t* x, int64_t n) {
  acc_t lanes[kLanes], probe[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    lanes[j] = -INFINITY;
    probe[j] = 0;
  }
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      lanes[j] = max_of(lanes[j], x[k + j]);
      probe[j] += (x[k + j] == -INFINITY ? acc_t(0) : x[k + j]) * acc_t(0);
    }
  for (int j = 0; k + j < n; ++j) {
    lanes[j] = max_of(lanes[j], x[k + j]);
    probe[j] += (x[k + j] == -INFINITY ? acc_t(0) : x[k + j]) * acc_t(0);
  }
  acc_t m = lanes[0], p = probe[0];
  for (int j = 1; j < kLanes; ++j) {
    m = max_of(m, lanes[j]);
    p += probe[j];
  }
  return m + p;
}

template <typename acc_t>
PYSSL_INLINE void load_body(const void* x, DType dt, int64_t n, acc_t* out) {
  PYSSL_DINO_DISPATCH(dt, x, for (int64_t k = 0; k < n; ++k) out[k] = ld<acc_t>(p_, k));
}

template <typename acc_t>
PYSSL_INLINE void affine_body(acc_t* buf, int64_t n, acc_t scale, const acc_t* col, acc_t row) {
  if (col) {
    for (int64_t k = 0; k < n; ++k) buf[k] = buf[k] * scale - col[k] - row;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = buf[k] * scale - row;
  }
}

template <typename acc_t>
PYSSL_INLINE void max_sumexp_body(const acc_t* buf, int64_t n, acc_t* m_out, acc_t* z_out) {
  const acc_t m = lane_max(buf, n);
  const acc_t shift = m == -INFINITY ? acc_t(0) : m;
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += exp_approx(buf[k + j] - shift);
  for (int j = 0; k + j < n; ++j) lanes[j] += exp_approx(buf[k + j] - shift);
  acc_t z = 0;
  for (int j = 0; j < kLanes; ++j) z += lanes[j];
  *m_out = m;
  *z_out = z;
}

template <typename acc_t>
PYSSL_INLINE void max_into_body(acc_t* m, const acc_t* buf, int64_t n) {
  for (int64_t k = 0; k < n; ++k) m[k] = max_of(m[k], buf[k]);
}

template <typename acc_t>
PYSSL_INLINE void sumexp_into_body(acc_t* z, const acc_t* buf, const acc_t* m, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t shift = m[k] == -INFINITY ? acc_t(0) : m[k];
    z[k] += exp_approx(buf[k] - shift);
  }
}

// Multiversioned entry points: the row passes get an AVX-512 build too (they are exp-bound:
// 512-bit vectors halve their instruction count); double bodies are built alike, cheaply.
#define PYSSL_DINO_ENTRY(T)                                                                      \
  PYSSL_MULTIVERSION_AVX512(void, tfwd_##T,                                                      \
                            (const void* t, DType dt, const T* c, int64_t n, T inv, T* cs, T* e,  \
                             T* m, T* z),                                                         \
                            (t, dt, c, n, inv, cs, e, m, z), teacher_forward_body<T>)             \
  PYSSL_MULTIVERSION_AVX512(void, sfwd_##T,                                                      \
                            (const void* s, DType dt, int64_t n, T inv, const T* e, int64_t lde,  \
                             int64_t n_e, T* dots, T* m, T* z),                                   \
                            (s, dt, n, inv, e, lde, n_e, dots, m, z), student_forward_body<T>)    \
  PYSSL_MULTIVERSION_AVX512(void, probs_##T,                                                     \
                            (const void* t, DType dt, const T* c, int64_t n, T inv, T lse, T* q), \
                            (t, dt, c, n, inv, lse, q), teacher_probs_body<T>)                    \
  PYSSL_MULTIVERSION_AVX512(void, sumrows_##T,                                                   \
                            (const T* src, int64_t lds, int64_t n_src, int64_t skip, int64_t n,   \
                             T* dst),                                                             \
                            (src, lds, n_src, skip, n, dst), sum_rows_body<T>)                    \
  PYSSL_MULTIVERSION_AVX512(void, grad_##T,                                                      \
                            (const void* s, DType dt, int64_t n, T inv, T lse, const T* Q, T n_v, \
                             T coef, void* out),                                                  \
                            (s, dt, n, inv, lse, Q, n_v, coef, out), grad_body<T>)                \
  PYSSL_MULTIVERSION(void, load_##T, (const void* x, DType dt, int64_t n, T* out),              \
                     (x, dt, n, out), load_body<T>)                                              \
  PYSSL_MULTIVERSION(void, affine_##T, (T * buf, int64_t n, T scale, const T* col, T row),       \
                     (buf, n, scale, col, row), affine_body<T>)                                  \
  PYSSL_MULTIVERSION(void, mse_##T, (const T* buf, int64_t n, T* m, T* z), (buf, n, m, z),       \
                     max_sumexp_body<T>)                                                         \
  PYSSL_MULTIVERSION(void, maxinto_##T, (T * m, const T* buf, int64_t n), (m, buf, n),           \
                     max_into_body<T>)                                                           \
  PYSSL_MULTIVERSION(void, seinto_##T, (T * z, const T* buf, const T* m, int64_t n),             \
                     (z, buf, m, n), sumexp_into_body<T>)

PYSSL_DINO_ENTRY(float)
PYSSL_DINO_ENTRY(double)

}  // namespace

#define PYSSL_DINO_EXPORT(T)                                                                    \
  void teacher_forward(const void* t, DType dt, const T* c, int64_t n, T inv, T* cs, T* e, T* m, \
                       T* z) {                                                                \
    tfwd_##T(t, dt, c, n, inv, cs, e, m, z);                                                  \
  }                                                                                           \
  void student_forward(const void* s, DType dt, int64_t n, T inv, const T* e, int64_t lde,    \
                       int64_t n_e, T* dots, T* m, T* z) {                                    \
    sfwd_##T(s, dt, n, inv, e, lde, n_e, dots, m, z);                                         \
  }                                                                                           \
  void teacher_probs(const void* t, DType dt, const T* c, int64_t n, T inv, T lse, T* q) {    \
    probs_##T(t, dt, c, n, inv, lse, q);                                                      \
  }                                                                                           \
  void sum_rows(const T* src, int64_t lds, int64_t n_src, int64_t skip, int64_t n, T* dst) {  \
    sumrows_##T(src, lds, n_src, skip, n, dst);                                               \
  }                                                                                           \
  void dino_grad(const void* s, DType dt, int64_t n, T inv, T lse, const T* Q, T n_v, T coef, \
                 void* out) {                                                                 \
    grad_##T(s, dt, n, inv, lse, Q, n_v, coef, out);                                          \
  }                                                                                           \
  void load_row(const void* x, DType dt, int64_t n, T* out) { load_##T(x, dt, n, out); }      \
  void affine_offsets(T* buf, int64_t n, T scale, const T* col, T row) {                      \
    affine_##T(buf, n, scale, col, row);                                                      \
  }                                                                                           \
  void max_sumexp(const T* buf, int64_t n, T* m, T* z) { mse_##T(buf, n, m, z); }              \
  void max_into(T* m, const T* buf, int64_t n) { maxinto_##T(m, buf, n); }                     \
  void sumexp_into(T* z, const T* buf, const T* m, int64_t n) { seinto_##T(z, buf, m, n); }

PYSSL_DINO_EXPORT(float)
PYSSL_DINO_EXPORT(double)

}  // namespace pyssl::cpu
