// CUDA glue for the DINO-loss family: checks (shared with the CPU side), allocation, launches.
#include "kernels/dino_loss.h"
#include "ops/cuda_utils.h"
#include "ops/dino_loss.h"

namespace pyssl::dino {
namespace {

using at::Tensor;

// The kernels read student and teacher with one dtype; mixed inputs meet in fp32 (fp64).
std::pair<Tensor, Tensor> common_dtype(const Tensor& student, const Tensor& teacher) {
  if (student.scalar_type() == teacher.scalar_type())
    return {student.contiguous(), teacher.contiguous()};
  const auto acc = acc_type(student, teacher);
  return {student.to(acc).contiguous(), teacher.to(acc).contiguous()};
}

cuda::DinoArgs make_args(const DinoShape& d, double student_temp, double teacher_temp, bool skip) {
  return {d.B, d.S, d.T, d.K, d.n_terms, 1.0 / student_temp, 1.0 / teacher_temp, skip};
}

void check_crops(const DinoShape& d) {
  TORCH_CHECK_VALUE(d.T <= 8, "the CUDA kernel supports n_teacher_crops <= 8, got ", d.T);
  TORCH_CHECK_VALUE(d.K <= int64_t{65535} * 1024, "the CUDA kernel supports K <= 67107840 "
                    "prototypes (65535 chunks of 1024), got K=", d.K);
  // A block per image (plus at most 2^21 teacher-mean blocks) in a grid of at most 2^31 - 1.
  TORCH_CHECK_VALUE(d.B <= int64_t{1} << 30, "the CUDA kernel supports at most 2^30 rows per "
                    "crop (student rows / crops), got ", d.B);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dino_loss_cuda(
    const Tensor& student, const Tensor& teacher, const Tensor& center,
    const std::optional<Tensor>& weights, int64_t n_teacher_crops, double student_temp,
    double teacher_temp, bool skip_same_view) {
  const DinoShape d = check_dino(student, teacher, center, weights, n_teacher_crops, student_temp,
                                 teacher_temp, skip_same_view);
  check_crops(d);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_type(student, teacher);
  auto [s, t] = common_dtype(student, teacher);
  const Tensor c = center.to(acc).contiguous();
  const Tensor w = weights.has_value() ? weights->to(acc).contiguous() : Tensor();
  auto opts = student.options().dtype(acc);
  Tensor loss = at::empty({}, opts), teacher_mean = at::empty({d.K}, opts);
  Tensor student_lse = at::empty({d.S * d.B}, opts), teacher_lse = at::empty({d.T * d.B}, opts);
  const cuda::DinoArgs a = make_args(d, student_temp, teacher_temp, skip_same_view);
  Tensor workspace = at::empty({cuda::dino_forward_workspace(a)}, opts);
  PYSSL_CUDA_CHECK(cuda::dino_forward(
      s.const_data_ptr(), t.const_data_ptr(), to_dtype(s.scalar_type()), c.const_data_ptr(),
      w.defined() ? w.const_data_ptr() : nullptr, a, workspace.mutable_data_ptr(),
      loss.mutable_data_ptr(), teacher_mean.mutable_data_ptr(), student_lse.mutable_data_ptr(),
      teacher_lse.mutable_data_ptr(), current_stream()));
  return {loss, teacher_mean, student_lse, teacher_lse};
}

Tensor dino_loss_backward_cuda(const Tensor& grad_loss, const Tensor& student,
                               const Tensor& teacher, const Tensor& center,
                               const std::optional<Tensor>& weights, const Tensor& student_lse,
                               const Tensor& teacher_lse, int64_t n_teacher_crops,
                               double student_temp, double teacher_temp, bool skip_same_view) {
  const DinoShape d = check_dino(student, teacher, center, weights, n_teacher_crops, student_temp,
                                 teacher_temp, skip_same_view);
  check_crops(d);
  check_dino_backward(grad_loss, student, student_lse, teacher_lse, d);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_type(student, teacher);
  auto [s, t] = common_dtype(student, teacher);
  const Tensor c = center.to(acc).contiguous();
  const Tensor w = weights.has_value() ? weights->to(acc).contiguous() : Tensor();
  const Tensor sl = student_lse.to(acc).contiguous(), tl = teacher_lse.to(acc).contiguous();
  const Tensor g = grad_loss.to(acc).contiguous();
  Tensor grad = at::empty(s.sizes(), s.options());
  PYSSL_CUDA_CHECK(cuda::dino_backward(
      g.const_data_ptr(), s.const_data_ptr(), t.const_data_ptr(), to_dtype(s.scalar_type()),
      c.const_data_ptr(), w.defined() ? w.const_data_ptr() : nullptr, sl.const_data_ptr(),
      tl.const_data_ptr(), make_args(d, student_temp, teacher_temp, skip_same_view),
      grad.mutable_data_ptr(), current_stream()));
  return grad.scalar_type() == student.scalar_type() ? grad : grad.to(student.scalar_type());
}

Tensor offset_logsumexp_cuda(const Tensor& x, const std::optional<Tensor>& row_offset,
                             const std::optional<Tensor>& col_offset, double scale, int64_t dim) {
  check_offset_lse(x, row_offset, col_offset, dim);
  // dim = 1: a block per row, in a grid of at most 2^31 - 1 blocks.
  TORCH_CHECK_VALUE(dim != 1 || x.size(0) < int64_t{1} << 31, "x: the CUDA kernel takes at "
                    "most 2^31 - 1 rows with dim=1, got ", x.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor xc = x.contiguous();
  const Tensor ro = row_offset.has_value() ? row_offset->to(acc).contiguous() : Tensor();
  const Tensor co = col_offset.has_value() ? col_offset->to(acc).contiguous() : Tensor();
  Tensor out = at::empty({x.size(dim == 1 ? 0 : 1)}, x.options().dtype(acc));
  if (x.size(0) == 0 || x.size(1) == 0) return out.fill_(-INFINITY);
  PYSSL_CUDA_CHECK(cuda::offset_logsumexp(
      xc.const_data_ptr(), to_dtype(xc.scalar_type()), x.size(0), x.size(1),
      ro.defined() ? ro.const_data_ptr() : nullptr, co.defined() ? co.const_data_ptr() : nullptr,
      scale, static_cast<int>(dim), out.mutable_data_ptr(), current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CUDA, m) {
  m.impl("dino_loss", &dino_loss_cuda);
  m.impl("dino_loss_backward", &dino_loss_backward_cuda);
  m.impl("offset_logsumexp", &offset_logsumexp_cuda);
}

}  // namespace pyssl::dino
