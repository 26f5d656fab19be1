// Torch-free CPU building blocks of the fused DINO loss (csrc/ops/dino_loss.cpp orchestrates
// them over (batch, K-chunk) tasks). acc_t is float (fp32/bf16 inputs) or double (fp64).
// Each function works on one chunk of one row; n is the chunk length.
#pragma once

#include <cstdint>

#include "kernels/common.h"

namespace pyssl::cpu {

#define PYSSL_DINO_CPU_DECLARE(T)                                                              \
  /* out[k] = x[k] converted to T; x has dtype dt (kFloat32, kFloat64 or kBFloat16). */        \
  void load_row(const void* x, DType dt, int64_t n, T* out);                                   \
  /* dst[k] += src[k] */                                                                       \
  void add_into(T* dst, const T* src, int64_t n);                                              \
  /* In: buf = teacher logits; a_k = (t_k - center_k) * inv_temp. Out: buf_k = exp(a_k - m),   \
     *m = max_k a_k, *z = sum_k buf_k. */                                                      \
  void teacher_chunk(T* buf, const T* center, int64_t n, T inv_temp, T* m, T* z);              \
  /* *m = max_k s_k * inv_temp, *z = sum_k exp(s_k * inv_temp - *m)  (inv_temp > 0). */        \
  void student_chunk(const T* s, int64_t n, T inv_temp, T* m, T* z);                           \
  /* sum_k a_k * b_k in a fixed order. */                                                      \
  T dot(const T* a, const T* b, int64_t n);                                                    \
  /* In: buf = teacher logits. Out: buf_k = exp((t_k - center_k) * inv_temp - lse). */         \
  void teacher_probs(T* buf, const T* center, int64_t n, T inv_temp, T lse);                   \
  /* out_k = coef * (n_v * exp(s_k * inv_temp - lse) - Q_k), stored with dtype dt. */          \
  void dino_grad(const T* s, int64_t n, T inv_temp, T lse, const T* Q, T n_v, T coef,          \
                 void* out, DType dt);                                                         \
  /* buf_k = buf_k * scale - col_offset_k - row_offset (col_offset may be null). */            \
  void affine_offsets(T* buf, int64_t n, T scale, const T* col_offset, T row_offset);          \
  /* *m = max_k buf_k, *z = sum_k exp(buf_k - *m). */                                          \
  void max_sumexp(const T* buf, int64_t n, T* m, T* z);                                        \
  /* m_k = max(m_k, buf_k) */                                                                  \
  void max_into(T* m, const T* buf, int64_t n);                                                \
  /* z_k += exp(buf_k - m_k) (m_k = -inf contributes 0) */                                     \
  void sumexp_into(T* z, const T* buf, const T* m, int64_t n);

PYSSL_DINO_CPU_DECLARE(float)
PYSSL_DINO_CPU_DECLARE(double)

}  // namespace pyssl::cpu
