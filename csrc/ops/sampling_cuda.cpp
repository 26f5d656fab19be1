// CUDA glue for point sampling: checks (shared with the CPU side), the deterministic
// (sort + segmented sum) or atomic backward, launches.
#include <ATen/Context.h>

#include "kernels/sampling.h"
#include "ops/cuda_utils.h"
#include "ops/sampling.h"

namespace pyssl::sampling {
namespace {

using at::Tensor;

struct Prepared {
  Tensor features, xy, index;
  cuda::SampleArgs args;
};

Prepared prepare(const Tensor& features, const std::optional<Tensor>& image_index,
                 const Tensor& xy, int64_t mode, const SampleShape& s) {
  const auto acc = sample_acc(features, xy);
  Prepared p;
  p.features = (acc == at::kDouble && features.scalar_type() != at::kDouble) ? features.to(acc) : features;
  p.xy = xy.to(acc).contiguous();
  if (image_index.has_value()) {
    p.index = image_index->contiguous();
    if (p.index.numel() > 0) {  // one host sync: indices must address existing images
      const auto [lo, hi] = at::aminmax(p.index);
      const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
      TORCH_CHECK_VALUE(l >= 0 && h < s.N, "image_index values must be in [0, ", s.N,
                        "), got values in [", l, ", ", h, "]");
    }
  }
  const auto st = p.features.strides();
  p.args = {s.N, s.D, s.H, s.W, s.M, s.per_image, st[0], st[1], st[2], st[3], static_cast<int>(mode)};
  return p;
}

const int64_t* index_ptr(const Prepared& p) {
  return p.index.defined() ? p.index.const_data_ptr<int64_t>() : nullptr;
}

Tensor sample_points_cuda(const Tensor& features, const std::optional<Tensor>& image_index,
                          const Tensor& xy, int64_t mode) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  const c10::cuda::CUDAGuard guard(features.device());
  const Prepared p = prepare(features, image_index, xy, mode, s);
  Tensor out = at::empty({s.M, s.D}, p.features.options());
  PYSSL_CUDA_CHECK(cuda::sample_points(p.features.const_data_ptr(), to_dtype(p.features.scalar_type()),
                                       index_ptr(p), p.xy.const_data_ptr(), p.args,
                                       out.mutable_data_ptr(), current_stream()));
  return out.scalar_type() == features.scalar_type() ? out : out.to(features.scalar_type());
}

std::tuple<Tensor, Tensor> sample_points_backward_cuda(
    const Tensor& grad, const Tensor& features, const std::optional<Tensor>& image_index,
    const Tensor& xy, int64_t mode, bool features_grad, bool xy_grad, bool deterministic) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == s.M && grad.size(1) == s.D,
                    "grad must have shape [M, D] = [", s.M, ", ", s.D, "], got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(features.device());
  const Prepared p = prepare(features, image_index, xy, mode, s);
  const Tensor g = grad.to(p.features.scalar_type()).contiguous();
  const DType dt = to_dtype(p.features.scalar_type());
  const cudaStream_t stream = current_stream();
  Tensor gf = at::empty({0}, features.options());
  if (features_grad) {
    Tensor gacc = at::zeros({s.N, s.H, s.W, s.D}, p.xy.options());
    const bool det = deterministic || at::globalContext().deterministicAlgorithms();
    if (!det) {
      PYSSL_CUDA_CHECK(cuda::sample_points_backward_atomic(g.const_data_ptr(), dt, index_ptr(p),
                                                           p.xy.const_data_ptr(), p.args,
                                                           gacc.mutable_data_ptr(), stream));
    } else if (s.M > 0) {
      Tensor keys = at::empty({4 * s.M}, xy.options().dtype(at::kLong));
      PYSSL_CUDA_CHECK(cuda::sample_points_tap_keys(index_ptr(p), p.xy.const_data_ptr(),
                                                    to_dtype(p.xy.scalar_type()), p.args,
                                                    keys.mutable_data_ptr<int64_t>(), stream));
      auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      auto [targets, inverse, counts] = at::unique_consecutive(sorted, false, true);
      const Tensor starts = at::cumsum(counts, 0) - counts;
      PYSSL_CUDA_CHECK(cuda::sample_points_segment_sum(
          g.const_data_ptr(), dt, index_ptr(p), p.xy.const_data_ptr(), p.args,
          order.const_data_ptr<int64_t>(), targets.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(), targets.numel(),
          gacc.mutable_data_ptr(), stream));
    }
    gf = gacc.permute({0, 3, 1, 2}).to(features.scalar_type());
  }
  Tensor gxy = at::empty({0}, xy.options());
  if (xy_grad) {
    Tensor acc = at::zeros({s.M, 2}, p.xy.options());
    if (mode == kBilinear) {
      PYSSL_CUDA_CHECK(cuda::sample_points_backward_xy(g.const_data_ptr(), p.features.const_data_ptr(),
                                                       dt, index_ptr(p), p.xy.const_data_ptr(),
                                                       p.args, acc.mutable_data_ptr(), stream));
    }
    gxy = acc.to(xy.scalar_type());
  }
  return {gf, gxy};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CUDA, m) {
  m.impl("sample_points", &sample_points_cuda);
  m.impl("sample_points_backward", &sample_points_backward_cuda);
}

}  // namespace pyssl::sampling
