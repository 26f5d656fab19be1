// Torch-free CPU building blocks of the fused DINO loss (csrc/ops/dino_loss.cpp orchestrates
// them over (batch, K-chunk) tasks). acc_t is float (fp32/fp16/bf16 inputs) or double (fp64).
// Each function works on one chunk of one row; n is the chunk length. Rows given as `const
// void*` have dtype dt (kFloat32, kFloat64, kFloat16 or kBFloat16) and are read in place.
#pragma once

#include <cstdint>

#include "kernels/common.h"

namespace pyssl::cpu {

#define PYSSL_DINO_CPU_DECLARE(T)                                                              \
  /* Teacher row of the forward: a_k = (t_k - center_k) * inv_temp. colsum_k += t_k;           \
     e_k = exp(a_k - m) with *m = max_k a_k; *z = sum_k e_k. */                                \
  void teacher_forward(const void* t, DType dt, const T* center, int64_t n, T inv_temp,        \
                       T* colsum, T* e, T* m, T* z);                                           \
  /* Student row of the forward: *m = max_k s_k * inv_temp, *z = sum_k exp(s_k * inv_temp -   \
     *m) (inv_temp > 0), and dots[i] = sum_k e_ik * s_k for the n_e rows e_i = e + i * lde. */ \
  void student_forward(const void* s, DType dt, int64_t n, T inv_temp, const T* e, int64_t lde, \
                       int64_t n_e, T* dots, T* m, T* z);                                      \
  /* q_k = exp((t_k - center_k) * inv_temp - lse). */                                         \
  void teacher_probs(const void* t, DType dt, const T* center, int64_t n, T inv_temp, T lse,   \
                     T* q);                                                                    \
  /* dst_k = sum_i src_ik over the n_src rows src_i = src + i * lds (skipping row `skip`, or   \
     none when skip < 0), summed in row order from 0. */                                       \
  void sum_rows(const T* src, int64_t lds, int64_t n_src, int64_t skip, int64_t n, T* dst);     \
  /* out_k = coef * (n_v * exp(s_k * inv_temp - lse) - Q_k), stored with the dtype of s. */    \
  void dino_grad(const void* s, DType dt, int64_t n, T inv_temp, T lse, const T* Q, T n_v,      \
                 T coef, void* out);                                                           \
  /* out[k] = x[k] converted to T. */                                                          \
  void load_row(const void* x, DType dt, int64_t n, T* out);                                   \
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
