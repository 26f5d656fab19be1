// CUDA glue for projection, point-pixel pairs and segment pooling.
#include <ATen/Context.h>

#include "kernels/projection.h"
#include "ops/cuda_utils.h"
#include "ops/projection.h"

namespace pyssl::projection {
namespace {

using at::Tensor;

struct Inputs : ProjInputs {
  cuda::ProjArgs args;
  DType acc;
};

Inputs prepare(const Tensor& points, const Tensor& lidar_to_cam, const Tensor& intrinsics,
               const Tensor& image_size, const std::optional<Tensor>& batch, const ProjShape& s,
               double min_depth, double margin, int64_t rounding) {
  Inputs in{prepare_projection(points, lidar_to_cam, intrinsics, image_size, batch, s), {}, {}};
  in.args = {s.P, s.F, s.C, min_depth, margin, static_cast<int>(rounding)};
  in.acc = to_dtype(in.points.scalar_type());
  return in;
}

const int64_t* batch_ptr(const Inputs& in) {
  return in.batch.defined() ? in.batch.const_data_ptr<int64_t>() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor> project_points_cuda(const Tensor& points,
                                                       const Tensor& lidar_to_cam,
                                                       const Tensor& intrinsics,
                                                       const Tensor& image_size,
                                                       const std::optional<Tensor>& batch,
                                                       double min_depth, double margin,
                                                       int64_t rounding) {
  const ProjShape s = check_projection(points, lidar_to_cam, intrinsics, image_size, batch, rounding,
                                       margin);
  const c10::cuda::CUDAGuard guard(points.device());
  const Inputs in = prepare(points, lidar_to_cam, intrinsics, image_size, batch, s, min_depth, margin, rounding);
  auto opts = in.points.options();
  Tensor pixels = at::empty({s.C, s.P, 2}, opts), depth = at::empty({s.C, s.P}, opts);
  Tensor valid = at::empty({s.C, s.P}, opts.dtype(at::kBool));
  PYSSL_CUDA_CHECK(cuda::project_points(in.points.const_data_ptr(), in.acc, in.M.const_data_ptr(),
                                        in.K.const_data_ptr(), in.size.const_data_ptr(), batch_ptr(in),
                                        in.args, pixels.mutable_data_ptr(), depth.mutable_data_ptr(),
                                        valid.mutable_data_ptr<bool>(), current_stream()));
  return {pixels, depth, valid};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> point_pixel_pairs_cuda(
    const Tensor& points, const Tensor& lidar_to_cam, const Tensor& intrinsics,
    const Tensor& image_size, const std::optional<Tensor>& batch, double min_depth, double margin,
    int64_t rounding, int64_t cameras, const std::optional<Tensor>& random) {
  const ProjShape s = check_projection(points, lidar_to_cam, intrinsics, image_size, batch, rounding,
                                       margin);
  TORCH_CHECK_VALUE(rounding != kRoundNone, "point_pixel_pairs needs integer pixels: rounding must be "
                    "'floor' or 'round', got 'none'");
  check_pair_choice(cameras, random, points, s.P);
  const c10::cuda::CUDAGuard guard(points.device());
  const Inputs in = prepare(points, lidar_to_cam, intrinsics, image_size, batch, s, min_depth, margin, rounding);
  const cudaStream_t stream = current_stream();
  auto lopts = points.options().dtype(at::kLong);
  Tensor counts = at::empty({s.P}, lopts);
  PYSSL_CUDA_CHECK(cuda::pair_counts(in.points.const_data_ptr(), in.acc, in.M.const_data_ptr(),
                                     in.K.const_data_ptr(), in.size.const_data_ptr(), batch_ptr(in),
                                     in.args, static_cast<int>(cameras),
                                     counts.mutable_data_ptr<int64_t>(), stream));
  const Tensor ends = at::cumsum(counts, 0);
  const int64_t total = s.P > 0 ? ends[-1].item<int64_t>() : 0;  // data-dependent size: one sync
  const Tensor offsets = ends - counts;
  Tensor pi = at::empty({total}, lopts), ci = at::empty({total}, lopts);
  Tensor ri = at::empty({total}, lopts), co = at::empty({total}, lopts);
  const Tensor rnd = cameras == 2 ? random->to(points.device(), at::kDouble).contiguous() : Tensor();
  PYSSL_CUDA_CHECK(cuda::pair_write(in.points.const_data_ptr(), in.acc, in.M.const_data_ptr(),
                                    in.K.const_data_ptr(), in.size.const_data_ptr(), batch_ptr(in),
                                    in.args, static_cast<int>(cameras),
                                    rnd.defined() ? rnd.const_data_ptr<double>() : nullptr,
                                    offsets.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(),
                                    pi.mutable_data_ptr<int64_t>(),
                                    ci.mutable_data_ptr<int64_t>(), ri.mutable_data_ptr<int64_t>(),
                                    co.mutable_data_ptr<int64_t>(), stream));
  return {pi, ci, ri, co};
}

std::tuple<Tensor, Tensor> segment_mean_cuda(const Tensor& values, const Tensor& segment_ids,
                                             int64_t num_segments, bool deterministic) {
  check_segments(values, segment_ids, num_segments);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t N = values.size(0), D = values.size(1), S = num_segments;
  const Tensor ids = segment_ids.contiguous();
  const Tensor v = values.contiguous();
  const cudaStream_t stream = current_stream();
  Tensor counts = at::zeros({S}, ids.options());
  Tensor flag = at::zeros({1}, ids.options().dtype(at::kInt));
  PYSSL_CUDA_CHECK(cuda::segment_counts(ids.const_data_ptr<int64_t>(), N, S,
                                        counts.mutable_data_ptr<int64_t>(),
                                        flag.mutable_data_ptr<int32_t>(), stream));
  TORCH_CHECK_VALUE(flag.item<int>() == 0, "segment_ids values must be in [0, num_segments=", S,
                    ") or -1 (ignored)");  // one host sync
  const auto acc = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor sums = at::zeros({S, D}, values.options().dtype(acc));
  const DType dt = to_dtype(values.scalar_type());
  if (!(deterministic || at::globalContext().deterministicAlgorithms())) {
    PYSSL_CUDA_CHECK(cuda::segment_sum_atomic(v.const_data_ptr(), dt, ids.const_data_ptr<int64_t>(),
                                              N, D, sums.mutable_data_ptr(), stream));
  } else if (N > 0) {
    auto [sorted, order] = at::sort(ids, /*stable=*/true, 0, false);
    auto [targets, inverse, lengths] = at::unique_consecutive(sorted, false, true);
    const Tensor starts = at::cumsum(lengths, 0) - lengths;
    PYSSL_CUDA_CHECK(cuda::segment_sum_sorted(v.const_data_ptr(), dt, order.const_data_ptr<int64_t>(),
                                              targets.const_data_ptr<int64_t>(),
                                              starts.const_data_ptr<int64_t>(),
                                              lengths.const_data_ptr<int64_t>(), targets.numel(), D,
                                              sums.mutable_data_ptr(), stream));
  }
  Tensor means = at::empty({S, D}, values.options());
  PYSSL_CUDA_CHECK(cuda::segment_divide(sums.const_data_ptr(), counts.const_data_ptr<int64_t>(), dt,
                                        S, D, means.mutable_data_ptr(), stream));
  return {means, counts};
}

Tensor segment_mean_backward_cuda(const Tensor& grad_means, const Tensor& segment_ids,
                                  const Tensor& counts) {
  check_segment_mean_backward(grad_means, segment_ids, counts);
  const c10::cuda::CUDAGuard guard(grad_means.device());
  const Tensor g = grad_means.contiguous(), ids = segment_ids.contiguous(), cnt = counts.contiguous();
  Tensor out = at::empty({ids.size(0), g.size(1)}, g.options());
  PYSSL_CUDA_CHECK(cuda::segment_gather(g.const_data_ptr(), to_dtype(g.scalar_type()),
                                        ids.const_data_ptr<int64_t>(), cnt.const_data_ptr<int64_t>(),
                                        ids.size(0), g.size(0), g.size(1), out.mutable_data_ptr(),
                                        current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CUDA, m) {
  m.impl("project_points", &project_points_cuda);
  m.impl("point_pixel_pairs", &point_pixel_pairs_cuda);
  m.impl("segment_mean", &segment_mean_cuda);
  m.impl("segment_mean_backward", &segment_mean_backward_cuda);
}

}  // namespace pyssl::projection
