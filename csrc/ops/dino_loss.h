// Fused DINO / iBOT loss: argument checks (shared by the CPU and CUDA implementations).
#pragma once

#include <cmath>

#include "ops/common.h"

namespace pyssl::dino {

struct DinoShape {
  int64_t B;        // images per crop
  int64_t S;        // student crops
  int64_t T;        // teacher crops
  int64_t K;        // prototypes (out_dim)
  int64_t n_terms;  // (teacher crop, student crop) pairs in the loss
};

inline DinoShape check_dino(const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& center, const std::optional<at::Tensor>& weights,
                            int64_t n_teacher_crops, double student_temp, double teacher_temp,
                            bool skip_same_view) {
  check_dim(student, 2, "student", "[S*B, K] (crop-major rows)");
  check_dim(teacher, 2, "teacher", "[T*B, K] (crop-major rows)");
  check_floating(student, "student");
  check_floating(teacher, "teacher");
  check_same_device(teacher, student, "teacher", "student");
  const int64_t K = student.size(1);
  TORCH_CHECK_VALUE(teacher.size(1) == K, "teacher.shape[1] (K=", teacher.size(1),
                    ") must equal student.shape[1] (K=", K, ")");
  TORCH_CHECK_VALUE(K >= 1, "the number of prototypes K must be >= 1, got ", K);
  TORCH_CHECK_VALUE(n_teacher_crops >= 1, "n_teacher_crops must be >= 1, got ", n_teacher_crops);
  const int64_t T = n_teacher_crops;
  TORCH_CHECK_VALUE(teacher.size(0) > 0 && teacher.size(0) % T == 0, "teacher has ",
                    teacher.size(0), " rows, which do not split into n_teacher_crops=", T,
                    " non-empty crops");
  const int64_t B = teacher.size(0) / T;
  TORCH_CHECK_VALUE(student.size(0) % B == 0, "student has ", student.size(0),
                    " rows, not a multiple of the batch size B=", B,
                    " (teacher rows / n_teacher_crops)");
  const int64_t S = student.size(0) / B;
  TORCH_CHECK_VALUE(S >= T, "n_teacher_crops (", T, ") must be <= the number of student crops (",
                    S, "): the first n_teacher_crops student crops are the teacher's views");
  TORCH_CHECK_VALUE(student_temp > 0 && std::isfinite(student_temp),
                    "student_temp must be a positive finite number, got ", student_temp);
  TORCH_CHECK_VALUE(teacher_temp > 0 && std::isfinite(teacher_temp),
                    "teacher_temp must be a positive finite number, got ", teacher_temp);
  TORCH_CHECK_VALUE(center.dim() == 1 && center.size(0) == K, "center must have shape [K] = [", K,
                    "], got ", center.sizes());
  check_floating(center, "center");
  check_same_device(center, student, "center", "student");
  if (weights.has_value()) {
    TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == B,
                      "weights must have shape [B] = [", B, "], got ", weights->sizes());
    check_floating(*weights, "weights");
    check_same_device(*weights, student, "weights", "student");
  }
  const int64_t n_terms = T * S - (skip_same_view ? T : 0);
  TORCH_CHECK_VALUE(n_terms > 0, "no (teacher crop, student crop) pairs remain: with ", T,
                    " teacher and ", S, " student crops and skip_same_view=True every pair is skipped");
  return {B, S, T, K, n_terms};
}

inline at::ScalarType acc_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                            : at::kFloat;
}

// The backward's extra inputs: the scalar gradient and the forward's per-row log-sum-exps.
inline void check_dino_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                                const at::Tensor& student_lse, const at::Tensor& teacher_lse,
                                const DinoShape& d) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must be a scalar, got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(student_lse.numel() == d.S * d.B && teacher_lse.numel() == d.T * d.B,
                    "student_lse / teacher_lse do not match the inputs (expected ", d.S * d.B,
                    " and ", d.T * d.B, " values, got ", student_lse.numel(), " and ",
                    teacher_lse.numel(), ")");
  check_floating(grad_loss, "grad_loss");
  check_floating(student_lse, "student_lse");
  check_floating(teacher_lse, "teacher_lse");
  check_same_device(grad_loss, student, "grad_loss", "student");
  check_same_device(student_lse, student, "student_lse", "student");
  check_same_device(teacher_lse, student, "teacher_lse", "student");
}

inline void check_offset_lse(const at::Tensor& x, const std::optional<at::Tensor>& row_offset,
                      const std::optional<at::Tensor>& col_offset, int64_t dim) {
  check_dim(x, 2, "x", "[R, K]");
  check_floating(x, "x");
  TORCH_CHECK_VALUE(dim == 0 || dim == 1, "dim must be 0 or 1, got ", dim);
  if (row_offset.has_value()) {
    TORCH_CHECK_VALUE(row_offset->dim() == 1 && row_offset->size(0) == x.size(0),
                      "row_offset must have shape [R] = [", x.size(0), "], got ", row_offset->sizes());
    check_floating(*row_offset, "row_offset");
    check_same_device(*row_offset, x, "row_offset", "x");
  }
  if (col_offset.has_value()) {
    TORCH_CHECK_VALUE(col_offset->dim() == 1 && col_offset->size(0) == x.size(1),
                      "col_offset must have shape [K] = [", x.size(1), "], got ", col_offset->sizes());
    check_floating(*col_offset, "col_offset");
    check_same_device(*col_offset, x, "col_offset", "x");
  }
}

}  // namespace pyssl::dino
