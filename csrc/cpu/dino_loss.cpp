// Torch-free CPU chunk kernels of the fused DINO loss; see csrc/cpu/dino_loss.h.
#include "cpu/dino_loss.h"

#include "cpu/simd.h"

namespace pyssl::cpu {
namespace {

template <typename acc_t>
PYSSL_INLINE void load_body(const void* x, DType dt, int64_t n, acc_t* out) {
  if (dt == DType::kFloat32) {
    const float* p = static_cast<const float*>(x);
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<acc_t>(p[k]);
  } else if (dt == DType::kFloat64) {
    const double* p = static_cast<const double*>(x);
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<acc_t>(p[k]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(x);
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<acc_t>(bf16_to_float(p[k]));
  }
}

template <typename acc_t>
PYSSL_INLINE void add_body(acc_t* dst, const acc_t* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

// Lane-wise max over a chunk: element k goes to lane k % kLanes, lanes combine in order.
// Vector max instructions drop NaNs, so a parallel probe (x * 0 is NaN exactly for NaN and
// +-inf; -inf is probed as 0) makes the result NaN whenever the chunk holds a NaN or +inf:
// such logits give a NaN loss, never a silently finite one. -inf is an ordinary logit of
// probability 0 (a masked prototype), as in torch's softmax and logsumexp.
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
PYSSL_INLINE void teacher_body(acc_t* buf, const acc_t* center, int64_t n, acc_t inv_temp,
                               acc_t* m_out, acc_t* z_out) {
  for (int64_t k = 0; k < n; ++k) buf[k] = (buf[k] - center[k]) * inv_temp;
  const acc_t m = lane_max(buf, n);
  const acc_t shift = m == -INFINITY ? acc_t(0) : m;
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t e = exp_approx(buf[k + j] - shift);
      buf[k + j] = e;
      lanes[j] += e;
    }
  for (int j = 0; k + j < n; ++j) {
    const acc_t e = exp_approx(buf[k + j] - shift);
    buf[k + j] = e;
    lanes[j] += e;
  }
  acc_t z = 0;
  for (int j = 0; j < kLanes; ++j) z += lanes[j];
  *m_out = m;
  *z_out = z;
}

template <typename acc_t>
PYSSL_INLINE void student_body(const acc_t* s, int64_t n, acc_t inv_temp, acc_t* m_out,
                               acc_t* z_out) {
  const acc_t m = lane_max(s, n) * inv_temp;
  const acc_t shift = m == -INFINITY ? acc_t(0) : m;
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += exp_approx(s[k + j] * inv_temp - shift);
  for (int j = 0; k + j < n; ++j) lanes[j] += exp_approx(s[k + j] * inv_temp - shift);
  acc_t z = 0;
  for (int j = 0; j < kLanes; ++j) z += lanes[j];
  *m_out = m;
  *z_out = z;
}

template <typename acc_t>
PYSSL_INLINE acc_t dot_body(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[k + j] * b[k + j];
  for (int j = 0; k + j < n; ++j) lanes[j] += a[k + j] * b[k + j];
  acc_t s = 0;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
}

template <typename acc_t>
PYSSL_INLINE void probs_body(acc_t* buf, const acc_t* center, int64_t n, acc_t inv_temp,
                             acc_t lse) {
  for (int64_t k = 0; k < n; ++k) buf[k] = exp_approx((buf[k] - center[k]) * inv_temp - lse);
}

template <typename acc_t>
PYSSL_INLINE void grad_body(const acc_t* s, int64_t n, acc_t inv_temp, acc_t lse, const acc_t* Q,
                            acc_t n_v, acc_t coef, void* out, DType dt) {
  if (dt == DType::kFloat32) {
    float* o = static_cast<float*>(out);
    for (int64_t k = 0; k < n; ++k)
      o[k] = static_cast<float>(coef * (n_v * exp_approx(s[k] * inv_temp - lse) - Q[k]));
  } else if (dt == DType::kFloat64) {
    double* o = static_cast<double*>(out);
    for (int64_t k = 0; k < n; ++k)
      o[k] = static_cast<double>(coef * (n_v * exp_approx(s[k] * inv_temp - lse) - Q[k]));
  } else {
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t k = 0; k < n; ++k)
      o[k] = float_to_bf16(static_cast<float>(coef * (n_v * exp_approx(s[k] * inv_temp - lse) - Q[k])));
  }
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

// Multiversioned entry points (float bodies get an AVX2+FMA build; double ones too, cheaply).
#define PYSSL_DINO_ENTRY(T)                                                                      \
  PYSSL_MULTIVERSION(void, load_##T, (const void* x, DType dt, int64_t n, T* out),              \
                     (x, dt, n, out), load_body<T>)                                              \
  PYSSL_MULTIVERSION(void, add_##T, (T * dst, const T* src, int64_t n), (dst, src, n),           \
                     add_body<T>)                                                                \
  PYSSL_MULTIVERSION(void, teacher_##T,                                                          \
                     (T * buf, const T* c, int64_t n, T inv, T* m, T* z),                        \
                     (buf, c, n, inv, m, z), teacher_body<T>)                                    \
  PYSSL_MULTIVERSION(void, student_##T, (const T* s, int64_t n, T inv, T* m, T* z),             \
                     (s, n, inv, m, z), student_body<T>)                                         \
  PYSSL_MULTIVERSION(T, dot_##T, (const T* a, const T* b, int64_t n), (a, b, n), dot_body<T>)    \
  PYSSL_MULTIVERSION(void, probs_##T, (T * buf, const T* c, int64_t n, T inv, T lse),            \
                     (buf, c, n, inv, lse), probs_body<T>)                                       \
  PYSSL_MULTIVERSION(void, grad_##T,                                                             \
                     (const T* s, int64_t n, T inv, T lse, const T* Q, T n_v, T coef, void* out, \
                      DType dt),                                                                 \
                     (s, n, inv, lse, Q, n_v, coef, out, dt), grad_body<T>)                     \
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
  void load_row(const void* x, DType dt, int64_t n, T* out) { load_##T(x, dt, n, out); }      \
  void add_into(T* dst, const T* src, int64_t n) { add_##T(dst, src, n); }                    \
  void teacher_chunk(T* buf, const T* c, int64_t n, T inv, T* m, T* z) {                      \
    teacher_##T(buf, c, n, inv, m, z);                                                        \
  }                                                                                           \
  void student_chunk(const T* s, int64_t n, T inv, T* m, T* z) { student_##T(s, n, inv, m, z); } \
  T dot(const T* a, const T* b, int64_t n) { return dot_##T(a, b, n); }                        \
  void teacher_probs(T* buf, const T* c, int64_t n, T inv, T lse) { probs_##T(buf, c, n, inv, lse); } \
  void dino_grad(const T* s, int64_t n, T inv, T lse, const T* Q, T n_v, T coef, void* out,    \
                 DType dt) {                                                                  \
    grad_##T(s, n, inv, lse, Q, n_v, coef, out, dt);                                          \
  }                                                                                           \
  void affine_offsets(T* buf, int64_t n, T scale, const T* col, T row) {                      \
    affine_##T(buf, n, scale, col, row);                                                      \
  }                                                                                           \
  void max_sumexp(const T* buf, int64_t n, T* m, T* z) { mse_##T(buf, n, m, z); }              \
  void max_into(T* m, const T* buf, int64_t n) { maxinto_##T(m, buf, n); }                     \
  void sumexp_into(T* z, const T* buf, const T* m, int64_t n) { seinto_##T(z, buf, m, n); }

PYSSL_DINO_EXPORT(float)
PYSSL_DINO_EXPORT(double)

}  // namespace pyssl::cpu
