// Fused DINO / iBOT loss and the log-domain reductions of Sinkhorn-Knopp centering:
// schemas and CPU implementations. Contracts: pyssl/ops/dino_loss.py.
//
// Algorithm (forward), for each image b and fixed chunks of the K prototypes:
//   teacher crop i: a = (t - c) / teacher_temp, chunk max m_i, e = exp(a - m_i), z_i = sum e
//   student crop v: chunk max and sum of exp(s / student_temp)      -> log-sum-exp per row
//   pair (i, v):    N_iv = sum_k e_k s_k                             -> <q_i, s_v> = N_iv / z_i
// then chunks are merged in a fixed order (online-softmax rescaling) and
//   CE(i, v, b) = LSE(s_vb / student_temp) - <q_ib, s_vb> / student_temp.
// Each input element is read from memory once (a student chunk takes two passes, the max and the
// dots with both teacher rows in one, the sum of exp in the second, while it is in cache); only
// per-row log-sum-exps are kept for backward, which recomputes p and q from them:
//   dL/ds_vbk = w_b / (n_terms * student_temp) * (n_v * p_vbk - sum_{i paired with v} q_ibk).
// Tasks are (block of 16 images, chunk of 4096 prototypes): a fixed partition, so results are
// bitwise identical for any number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/dino_loss.h"
#include "ops/dino_loss.h"

namespace pyssl::dino {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 4096;  // prototypes per task
constexpr int64_t kImageBlock = 16;

// max that propagates NaN (std::max drops it): a NaN chunk statistic must poison the row.
inline double nan_max(double a, double b) { return (b > a || b != b) ? b : a; }

template <typename acc_t>
void forward_impl(const Tensor& student, const Tensor& teacher, const Tensor& center,
                  const Tensor& weights, const DinoShape& d, bool skip, acc_t inv_ts, acc_t inv_tt,
                  Tensor& loss, Tensor& teacher_mean, Tensor& student_lse, Tensor& teacher_lse) {
  const int64_t B = d.B, S = d.S, T = d.T, K = d.K;
  const int64_t nk = (K + kChunk - 1) / kChunk;
  const int64_t nbb = (B + kImageBlock - 1) / kImageBlock;
  const DType st_dt = to_dtype(student.scalar_type()), te_dt = to_dtype(teacher.scalar_type());
  const auto* s_ptr = static_cast<const char*>(student.const_data_ptr());
  const auto* t_ptr = static_cast<const char*>(teacher.const_data_ptr());
  const int64_t s_es = student.element_size(), t_es = teacher.element_size();
  const acc_t* c = center.const_data_ptr<acc_t>();

  scratch_vector<acc_t> tm(T * B * nk), tz(T * B * nk), sm(S * B * nk), sz(S * B * nk);
  scratch_vector<acc_t> dots(T * S * B * nk), colsum(nbb * K);

  at::parallel_for(0, nbb * nk, 1, [&](int64_t begin, int64_t end) {
    scratch_vector<acc_t> tbuf(T * kChunk), sdots(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bb = task / nk, kc = task % nk;
      const int64_t k0 = kc * kChunk, n = std::min(kChunk, K - k0);
      acc_t* cs = colsum.data() + bb * K + k0;
      std::fill(cs, cs + n, acc_t(0));
      for (int64_t b = bb * kImageBlock; b < std::min(B, (bb + 1) * kImageBlock); ++b) {
        for (int64_t i = 0; i < T; ++i) {
          const int64_t row = i * B + b;
          cpu::teacher_forward(t_ptr + (row * K + k0) * t_es, te_dt, c + k0, n, inv_tt, cs,
                               tbuf.data() + i * kChunk, &tm[row * nk + kc], &tz[row * nk + kc]);
        }
        for (int64_t v = 0; v < S; ++v) {
          const int64_t row = v * B + b;
          cpu::student_forward(s_ptr + (row * K + k0) * s_es, st_dt, n, inv_ts, tbuf.data(), kChunk,
                               T, sdots.data(), &sm[row * nk + kc], &sz[row * nk + kc]);
          for (int64_t i = 0; i < T; ++i) dots[((i * S + v) * B + b) * nk + kc] = sdots[i];
        }
      }
    }
  });

  // Merge the chunks (fixed order, double precision) into per-row statistics and the loss.
  const acc_t* w = weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr;
  acc_t* s_lse = student_lse.mutable_data_ptr<acc_t>();
  acc_t* t_lse = teacher_lse.mutable_data_ptr<acc_t>();
  scratch_vector<double> loss_b(B);
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    scratch_vector<double> qdot(T * S), num(S);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < T; ++i) {
        const int64_t row = i * B + b;
        double M = -INFINITY;
        for (int64_t kc = 0; kc < nk; ++kc) M = nan_max(M, double(tm[row * nk + kc]));
        const double shift = M == -INFINITY ? 0.0 : M;
        double Z = 0;
        std::fill(num.begin(), num.end(), 0.0);
        for (int64_t kc = 0; kc < nk; ++kc) {
          const double f = std::exp(double(tm[row * nk + kc]) - shift);
          Z += double(tz[row * nk + kc]) * f;
          for (int64_t v = 0; v < S; ++v) num[v] += double(dots[((i * S + v) * B + b) * nk + kc]) * f;
        }
        t_lse[row] = static_cast<acc_t>(shift + std::log(Z));
        for (int64_t v = 0; v < S; ++v) qdot[i * S + v] = num[v] / Z;
      }
      double lb = 0;
      for (int64_t v = 0; v < S; ++v) {
        const int64_t row = v * B + b;
        double M = -INFINITY;
        for (int64_t kc = 0; kc < nk; ++kc) M = nan_max(M, double(sm[row * nk + kc]));
        const double shift = M == -INFINITY ? 0.0 : M;
        double Z = 0;
        for (int64_t kc = 0; kc < nk; ++kc) Z += double(sz[row * nk + kc]) * std::exp(double(sm[row * nk + kc]) - shift);
        const double lse = shift + std::log(Z);
        s_lse[row] = static_cast<acc_t>(lse);
        for (int64_t i = 0; i < T; ++i) {
          if (skip && i == v) continue;
          lb += lse - qdot[i * S + v] * double(inv_ts);
        }
      }
      loss_b[b] = lb * (w ? double(w[b]) : 1.0 / double(B));
    }
  });
  double total = 0;
  for (int64_t b = 0; b < B; ++b) total += loss_b[b];
  loss.fill_(total / double(d.n_terms));

  acc_t* tmean = teacher_mean.mutable_data_ptr<acc_t>();
  const double inv_rows = 1.0 / double(T * B);
  at::parallel_for(0, K, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t s = 0;
      for (int64_t bb = 0; bb < nbb; ++bb) s += colsum[bb * K + k];
      tmean[k] = static_cast<acc_t>(double(s) * inv_rows);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dino_loss_cpu(
    const Tensor& student, const Tensor& teacher, const Tensor& center,
    const std::optional<Tensor>& weights, int64_t n_teacher_crops, double student_temp,
    double teacher_temp, bool skip_same_view) {
  const DinoShape d = check_dino(student, teacher, center, weights, n_teacher_crops, student_temp,
                                 teacher_temp, skip_same_view);
  const auto acc = acc_type(student, teacher);
  const Tensor s = student.contiguous(), t = teacher.contiguous();  // any float dtype, read in place
  const Tensor c = center.to(acc).contiguous();
  const Tensor w = weights.has_value() ? weights->to(acc).contiguous() : Tensor();
  auto opts = student.options().dtype(acc);
  Tensor loss = at::empty({}, opts), teacher_mean = at::empty({d.K}, opts);
  Tensor student_lse = at::empty({d.S * d.B}, opts), teacher_lse = at::empty({d.T * d.B}, opts);
  if (acc == at::kDouble) {
    forward_impl<double>(s, t, c, w, d, skip_same_view, 1.0 / student_temp, 1.0 / teacher_temp,
                         loss, teacher_mean, student_lse, teacher_lse);
  } else {
    forward_impl<float>(s, t, c, w, d, skip_same_view, float(1.0 / student_temp),
                        float(1.0 / teacher_temp), loss, teacher_mean, student_lse, teacher_lse);
  }
  return {loss, teacher_mean, student_lse, teacher_lse};
}

template <typename acc_t>
void backward_impl(double grad, const Tensor& student, const Tensor& teacher, const Tensor& center,
                   const Tensor& weights, const Tensor& student_lse, const Tensor& teacher_lse,
                   const DinoShape& d, bool skip, acc_t inv_ts, acc_t inv_tt, Tensor& grad_student) {
  const int64_t B = d.B, S = d.S, T = d.T, K = d.K;
  const int64_t nk = (K + kChunk - 1) / kChunk;
  const DType st_dt = to_dtype(student.scalar_type()), te_dt = to_dtype(teacher.scalar_type());
  TORCH_INTERNAL_ASSERT(grad_student.scalar_type() == student.scalar_type());
  const auto* s_ptr = static_cast<const char*>(student.const_data_ptr());
  const auto* t_ptr = static_cast<const char*>(teacher.const_data_ptr());
  auto* g_ptr = static_cast<char*>(grad_student.mutable_data_ptr());
  const int64_t s_es = student.element_size(), t_es = teacher.element_size();
  const acc_t* c = center.const_data_ptr<acc_t>();
  const acc_t* w = weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr;
  const acc_t* s_lse = student_lse.const_data_ptr<acc_t>();
  const acc_t* t_lse = teacher_lse.const_data_ptr<acc_t>();
  at::parallel_for(0, B * nk, 1, [&](int64_t begin, int64_t end) {
    scratch_vector<acc_t> q(T * kChunk), Q_all(kChunk), Q_skip(kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nk, kc = task % nk;
      const int64_t k0 = kc * kChunk, n = std::min(kChunk, K - k0);
      for (int64_t i = 0; i < T; ++i) {
        const int64_t row = i * B + b;
        cpu::teacher_probs(t_ptr + (row * K + k0) * t_es, te_dt, c + k0, n, inv_tt, t_lse[row],
                           q.data() + i * kChunk);
      }
      // Q = sum of the teacher probabilities paired with crop v, summed in crop order: the same
      // for every crop but the teacher's own views when skip_same_view.
      const bool any_full = !skip || S > T;
      if (any_full) cpu::sum_rows(q.data(), kChunk, T, -1, n, Q_all.data());
      const double wb = w ? double(w[b]) : 1.0 / double(B);
      const acc_t coef = static_cast<acc_t>(grad * wb * double(inv_ts) / double(d.n_terms));
      for (int64_t v = 0; v < S; ++v) {
        const int64_t row = v * B + b;
        const acc_t* Q = Q_all.data();
        int64_t n_v = T;
        if (skip && v < T) {
          n_v = T - 1;
          if (T == 2) {
            Q = q.data() + (1 - v) * kChunk;  // 0 + q_other is q_other exactly
          } else {
            cpu::sum_rows(q.data(), kChunk, T, v, n, Q_skip.data());
            Q = Q_skip.data();
          }
        }
        cpu::dino_grad(s_ptr + (row * K + k0) * s_es, st_dt, n, inv_ts, s_lse[row], Q, acc_t(n_v),
                       coef, g_ptr + (row * K + k0) * s_es);
      }
    }
  });
}

Tensor dino_loss_backward_cpu(const Tensor& grad_loss, const Tensor& student,
                              const Tensor& teacher, const Tensor& center,
                              const std::optional<Tensor>& weights, const Tensor& student_lse,
                              const Tensor& teacher_lse, int64_t n_teacher_crops,
                              double student_temp, double teacher_temp, bool skip_same_view) {
  const DinoShape d = check_dino(student, teacher, center, weights, n_teacher_crops, student_temp,
                                 teacher_temp, skip_same_view);
  const auto acc = acc_type(student, teacher);
  check_dino_backward(grad_loss, student, student_lse, teacher_lse, d);
  const Tensor s = student.contiguous(), t = teacher.contiguous();  // any float dtype, read in place
  const Tensor c = center.to(acc).contiguous();
  const Tensor w = weights.has_value() ? weights->to(acc).contiguous() : Tensor();
  const Tensor sl = student_lse.to(acc).contiguous(), tl = teacher_lse.to(acc).contiguous();
  Tensor grad = empty_large(student.sizes(), student.options());
  const double g = grad_loss.item<double>();
  if (acc == at::kDouble) {
    backward_impl<double>(g, s, t, c, w, sl, tl, d, skip_same_view, 1.0 / student_temp,
                          1.0 / teacher_temp, grad);
  } else {
    backward_impl<float>(g, s, t, c, w, sl, tl, d, skip_same_view, float(1.0 / student_temp),
                         float(1.0 / teacher_temp), grad);
  }
  return grad;
}

// log-sum-exp along `dim` of y = x * scale - row_offset[:, None] - col_offset[None, :]
// (offsets optional). dim = 1: one value per row; dim = 0: one per column.
template <typename acc_t>
void offset_lse_impl(const Tensor& x, const Tensor& row_off, const Tensor& col_off, acc_t scale,
                     int64_t dim, Tensor& out) {
  const int64_t R = x.size(0), K = x.size(1);
  const DType dt = to_dtype(x.scalar_type());
  const auto* xp = static_cast<const char*>(x.const_data_ptr());
  const int64_t es = x.element_size();
  const acc_t* ro = row_off.defined() ? row_off.const_data_ptr<acc_t>() : nullptr;
  const acc_t* co = col_off.defined() ? col_off.const_data_ptr<acc_t>() : nullptr;
  acc_t* o = out.mutable_data_ptr<acc_t>();
  const int64_t nk = (K + kChunk - 1) / kChunk;
  if (dim == 1) {
    scratch_vector<acc_t> m(R * nk), z(R * nk);
    at::parallel_for(0, R * nk, 1, [&](int64_t begin, int64_t end) {
      scratch_vector<acc_t> buf(kChunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / nk, kc = task % nk;
        const int64_t k0 = kc * kChunk, n = std::min(kChunk, K - k0);
        cpu::load_row(xp + (r * K + k0) * es, dt, n, buf.data());
        cpu::affine_offsets(buf.data(), n, scale, co ? co + k0 : nullptr, ro ? ro[r] : acc_t(0));
        cpu::max_sumexp(buf.data(), n, &m[task], &z[task]);
      }
    });
    at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        double M = -INFINITY;
        for (int64_t kc = 0; kc < nk; ++kc) M = nan_max(M, double(m[r * nk + kc]));
        const double shift = M == -INFINITY ? 0.0 : M;
        double Z = 0;
        for (int64_t kc = 0; kc < nk; ++kc) Z += double(z[r * nk + kc]) * std::exp(double(m[r * nk + kc]) - shift);
        o[r] = static_cast<acc_t>(shift + std::log(Z));
      }
    });
  } else {
    at::parallel_for(0, nk, 1, [&](int64_t begin, int64_t end) {
      scratch_vector<acc_t> buf(kChunk), m(kChunk), z(kChunk);
      for (int64_t kc = begin; kc < end; ++kc) {
        const int64_t k0 = kc * kChunk, n = std::min(kChunk, K - k0);
        std::fill(m.begin(), m.begin() + n, acc_t(-INFINITY));
        std::fill(z.begin(), z.begin() + n, acc_t(0));
        for (int pass = 0; pass < 2; ++pass) {
          for (int64_t r = 0; r < R; ++r) {
            cpu::load_row(xp + (r * K + k0) * es, dt, n, buf.data());
            cpu::affine_offsets(buf.data(), n, scale, co ? co + k0 : nullptr, ro ? ro[r] : acc_t(0));
            if (pass == 0) {
              cpu::max_into(m.data(), buf.data(), n);
            } else {
              cpu::sumexp_into(z.data(), buf.data(), m.data(), n);
            }
          }
        }
        for (int64_t k = 0; k < n; ++k) {
          const acc_t shift = m[k] == -INFINITY ? acc_t(0) : m[k];
          o[k0 + k] = shift + std::log(z[k]);
        }
      }
    });
  }
}

Tensor offset_logsumexp_cpu(const Tensor& x, const std::optional<Tensor>& row_offset,
                            const std::optional<Tensor>& col_offset, double scale, int64_t dim) {
  check_offset_lse(x, row_offset, col_offset, dim);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor xc = x.contiguous();
  const Tensor ro = row_offset.has_value() ? row_offset->to(acc).contiguous() : Tensor();
  const Tensor co = col_offset.has_value() ? col_offset->to(acc).contiguous() : Tensor();
  Tensor out = at::empty({x.size(dim == 1 ? 0 : 1)}, x.options().dtype(acc));
  if (x.size(0) == 0 || x.size(1) == 0) return out.fill_(-INFINITY);
  if (acc == at::kDouble) {
    offset_lse_impl<double>(xc, ro, co, scale, dim, out);
  } else {
    offset_lse_impl<float>(xc, ro, co, float(scale), dim, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyssl, m) {
  m.def("dino_loss(Tensor student, Tensor teacher, Tensor center, Tensor? weights, int n_teacher_crops, float student_temp, float teacher_temp, bool skip_same_view) -> (Tensor loss, Tensor teacher_mean, Tensor student_lse, Tensor teacher_lse)");
  m.def("dino_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor center, Tensor? weights, Tensor student_lse, Tensor teacher_lse, int n_teacher_crops, float student_temp, float teacher_temp, bool skip_same_view) -> Tensor");
  m.def("offset_logsumexp(Tensor x, Tensor? row_offset, Tensor? col_offset, float scale, int dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("dino_loss", &dino_loss_cpu);
  m.impl("dino_loss_backward", &dino_loss_backward_cpu);
  m.impl("offset_logsumexp", &offset_logsumexp_cpu);
}

}  // namespace pyssl::dino
