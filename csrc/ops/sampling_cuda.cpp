// CUDA glue for point sampling: checks (shared with the CPU side), the atomic or the
// deterministic backward (fixed-point integer atomics, or sort + segmented sums), launches.
#include <ATen/Context.h>

#include <cmath>

#include "kernels/sampling.h"
#include "ops/cuda_utils.h"
#include "ops/sampling.h"

namespace pyssl::sampling {
namespace {

using at::Tensor;

struct Prepared : SamplePrepared {
  cuda::SampleArgs args;
};

Prepared prepare(const Tensor& features, const std::optional<Tensor>& image_index,
                 const Tensor& xy, int64_t mode, const SampleShape& s) {
  Prepared p{prepare_sampling(features, image_index, xy, s), {}};
  const auto st = p.features.strides();
  p.args = {s.N, s.D, s.H, s.W, s.M, s.per_image, st[0], st[1], st[2], st[3], 0, 0, 0, 0,
            static_cast<int>(mode), s.D, 1};
  return p;
}

// NCHW-like maps (channel stride != 1) with 16 channels or more, for the distillation kernels:
// those give a warp one point and its lanes consecutive channels, so on such a map every lane
// reads another channel plane. A channels-last copy (one pass over the map) makes the reads
// coalesced; on the H100 the dense loss on channels-last maps ran 1.3-1.4x faster than on NCHW
// ones (benchmarks/RESULTS.md, 2026-11-27), before counting this copy.
bool planar_map(const Tensor& t) { return t.dim() == 4 && t.stride(1) != 1 && t.size(1) >= 16; }

void features_channels_last(Prepared& p) {
  if (!planar_map(p.features)) return;
  p.features = p.features.contiguous(at::MemoryFormat::ChannelsLast);
  const auto st = p.features.strides();
  p.args.sN = st[0];
  p.args.sD = st[1];
  p.args.sH = st[2];
  p.args.sW = st[3];
}

// point_features in the accumulation dtype, channels-last if a planar map: one copy at most.
Tensor points_for_kernels(const Tensor& pf, at::ScalarType acc) {
  if (planar_map(pf)) return pf.to(pf.options().dtype(acc), false, false, at::MemoryFormat::ChannelsLast);
  return pf.scalar_type() == acc ? pf : pf.to(acc);
}

// Kernel arguments with the strides of a feature-gradient accumulator.
cuda::SampleArgs with_accumulator(const Prepared& p, const Tensor& gacc) {
  cuda::SampleArgs args = p.args;
  args.gN = gacc.stride(0);
  args.gD = gacc.stride(1);
  args.gH = gacc.stride(2);
  args.gW = gacc.stride(3);
  return args;
}

const int64_t* index_ptr(const Prepared& p) {
  return p.index.defined() ? p.index.const_data_ptr<int64_t>() : nullptr;
}

// The deterministic feature gradient for a float accumulator: a fixed-point scatter with
// integer atomics (kernels/sampling.h), exact in any order. bound() >= |w * df| for every term
// a point adds to a pixel (w <= 1 a tap weight; a point reaches a pixel through one tap at
// most). The unit is 2^(e - 62) with 2^e > M * bound, so no partial sum reaches 2^62 units, and
// a unit is bound * M * 2^-61 or less (2^-41 of the bound at a million points, far below
// float32's 2^-24). scatter(inv_unit, args, gfix) adds the terms into gfix, an int64
// accumulator with the strides of `args`. Returns the gradient in the features' dtype and memory
// format (what like_features gives), converted from the integer sums straight into that layout:
// no float accumulator, no copy after. Returns an undefined tensor, having done nothing, for
// double accumulators and for a non-finite bound: the caller then sorts the taps and sums each
// pixel's in order (NaN and inf propagate as on the CPU).
template <typename Bound, typename Scatter>
Tensor fixed_point_gradient(const Prepared& p, const Tensor& features, const SampleShape& s,
                            cudaStream_t stream, Bound&& bound_fn, Scatter&& scatter) {
  if (p.xy.scalar_type() != at::kFloat || features.scalar_type() == at::kDouble) return {};
  const double bound = bound_fn();  // a host sync
  if (!std::isfinite(bound)) return {};
  const auto format = features.suggest_memory_format();
  Tensor out = at::empty(features.sizes(), features.options().memory_format(format));
  if (bound == 0 || s.M * s.D == 0) return out.zero_();
  const int e = std::ilogb(bound * static_cast<double>(s.M)) + 1;
  Tensor gfix = channels_last_accumulator(p.features, p.xy.options().dtype(at::kLong));
  scatter(std::ldexp(1.0, 62 - e), with_accumulator(p, gfix), gfix.mutable_data_ptr<int64_t>());
  PYSSL_CUDA_CHECK(cuda::fixed_to_grad(gfix.const_data_ptr<int64_t>(), s.N, s.H * s.W, s.D,
                                       std::ldexp(1.0, e - 62),
                                       format != at::MemoryFormat::ChannelsLast,
                                       to_dtype(features.scalar_type()), out.mutable_data_ptr(),
                                       stream));
  return out;
}

// max |x| as a 0-d float tensor on x's device, no sync (0 for an empty tensor; NaN if x has one).
Tensor abs_max(const Tensor& x) {
  return x.numel() == 0 ? at::zeros({}, x.options().dtype(at::kFloat))
                        : at::linalg_vector_norm(x, INFINITY, std::nullopt, false, at::kFloat);
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
  check_sample_grad(grad, features, s);
  const c10::cuda::CUDAGuard guard(features.device());
  Prepared p = prepare(features, image_index, xy, mode, s);
  // read in its own strides: a gradient expanded over the channels (a loss on the channel sum)
  // is not copied to [M, D] first
  const Tensor g = grad.to(p.features.scalar_type());
  p.args.tM = g.stride(0);
  p.args.tD = g.stride(1);
  const DType dt = to_dtype(p.features.scalar_type());
  const cudaStream_t stream = current_stream();
  Tensor gf = at::empty({0}, features.options());
  if (features_grad) {
    const bool det = deterministic || at::globalContext().deterministicAlgorithms();
    // deterministic: the fixed-point scatter, which returns the gradient in its final layout
    // (undefined for double or non-finite inputs: then the sort + segmented sums). One host sync
    // (max|grad|).
    const Tensor fixed = !det ? Tensor() : fixed_point_gradient(
        p, features, s, stream, [&] { return abs_max(g).item<double>(); },
        [&](double inv_unit, const cuda::SampleArgs& args, int64_t* gfix) {
          PYSSL_CUDA_CHECK(cuda::sample_points_backward_fixed(g.const_data_ptr(), dt, index_ptr(p),
                                                              p.xy.const_data_ptr(), args,
                                                              inv_unit, gfix, stream));
        });
    if (fixed.defined()) {
      gf = fixed;
    } else {
      Tensor gacc = channels_last_accumulator(p.features, p.xy.options());
      const cuda::SampleArgs args = with_accumulator(p, gacc);
      if (!det) {
        PYSSL_CUDA_CHECK(cuda::sample_points_backward_atomic(g.const_data_ptr(), dt, index_ptr(p),
                                                             p.xy.const_data_ptr(), args,
                                                             gacc.mutable_data_ptr(), stream));
      } else if (s.M * s.D > 0) {
        Tensor keys = at::empty({4 * s.M}, xy.options().dtype(at::kLong));
        PYSSL_CUDA_CHECK(cuda::sample_points_tap_keys(index_ptr(p), p.xy.const_data_ptr(),
                                                      to_dtype(p.xy.scalar_type()), p.args,
                                                      keys.mutable_data_ptr<int64_t>(), stream));
        auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
        auto [targets, inverse, counts] = at::unique_consecutive(sorted, false, true);
        const Tensor starts = at::cumsum(counts, 0) - counts;
        PYSSL_CUDA_CHECK(cuda::sample_points_segment_sum(
            g.const_data_ptr(), dt, index_ptr(p), p.xy.const_data_ptr(), args,
            order.const_data_ptr<int64_t>(), targets.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(), targets.numel(),
            gacc.mutable_data_ptr(), stream));
      }
      gf = like_features(gacc, features);
    }
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


std::tuple<Tensor, Tensor> distill_loss_cuda(const Tensor& point_features, const Tensor& features,
                                             const std::optional<Tensor>& image_index,
                                             const Tensor& xy, const std::optional<Tensor>& weights,
                                             int64_t mode, int64_t loss) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  check_distill(point_features, features, weights, s, loss);
  const c10::cuda::CUDAGuard guard(features.device());
  Prepared p = prepare(features, image_index, xy, mode, s);
  features_channels_last(p);
  const auto acc = p.xy.scalar_type();
  const Tensor pf = points_for_kernels(point_features, acc);
  const Tensor w = weights.has_value() ? weights->to(acc).contiguous() : Tensor();
  Tensor stats = at::empty({s.M, 3}, p.xy.options());
  Tensor per = at::empty({s.M}, p.xy.options());
  Tensor value = at::empty({}, p.xy.options());
  PYSSL_CUDA_CHECK(cuda::distill_forward(pf.const_data_ptr(), row_layout(pf),
                                         w.defined() ? w.const_data_ptr() : nullptr,
                                         p.features.const_data_ptr(),
                                         to_dtype(p.features.scalar_type()), index_ptr(p),
                                         p.xy.const_data_ptr(), p.args, static_cast<int>(loss),
                                         stats.mutable_data_ptr(), per.mutable_data_ptr(),
                                         value.mutable_data_ptr(), current_stream()));
  return {value, stats};
}

std::tuple<Tensor, Tensor> distill_loss_backward_cuda(
    const Tensor& grad_loss, const Tensor& point_features, const Tensor& features,
    const std::optional<Tensor>& image_index, const Tensor& xy,
    const std::optional<Tensor>& weights, const Tensor& stats, int64_t mode, int64_t loss,
    bool point_features_grad, bool features_grad, bool deterministic) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  check_distill(point_features, features, weights, s, loss);
  check_distill_backward(grad_loss, stats, features, s);
  const c10::cuda::CUDAGuard guard(features.device());
  Prepared p = prepare(features, image_index, xy, mode, s);
  features_channels_last(p);
  const auto acc = p.xy.scalar_type();
  const Tensor pf = points_for_kernels(point_features, acc);
  const RowLayout pl = row_layout(pf);
  const Tensor w = weights.has_value() ? weights->to(acc).contiguous() : Tensor();
  const Tensor wsum = w.defined() ? w.sum() : Tensor();
  const Tensor st = stats.to(acc).contiguous();
  const Tensor g = grad_loss.to(acc).contiguous();
  const DType dt = to_dtype(p.features.scalar_type());
  const cudaStream_t stream = current_stream();
  Tensor coef = at::empty({s.M, 4}, p.xy.options());
  PYSSL_CUDA_CHECK(cuda::distill_coefficients(g.const_data_ptr(), st.const_data_ptr(),
                                              w.defined() ? w.const_data_ptr() : nullptr,
                                              w.defined() ? wsum.const_data_ptr() : nullptr,
                                              to_dtype(acc), s.M, static_cast<int>(loss),
                                              coef.mutable_data_ptr(), stream));
  Tensor gpf = at::empty({0}, point_features.options());
  if (point_features_grad) {
    Tensor out = at::empty_like(pf);
    PYSSL_CUDA_CHECK(cuda::distill_grad_points(pf.const_data_ptr(), pl, p.features.const_data_ptr(), dt,
                                               index_ptr(p), p.xy.const_data_ptr(),
                                               coef.const_data_ptr(), p.args, out.mutable_data_ptr(),
                                               row_layout(out), stream));
    if (out.strides() == point_features.strides()) {
      gpf = out.to(point_features.scalar_type());
    } else {  // computed channels-last: back to the layout of point_features (the fake's)
      gpf = at::empty_like(point_features);
      gpf.copy_(out);
    }
  }
  Tensor gf = at::empty({0}, features.options());
  const bool det = deterministic || at::globalContext().deterministicAlgorithms();
  // Deterministic: the fixed-point scatter (fixed_point_gradient), its unit from the largest
  // per-pair bound (kernels/sampling.h: distill_term_bound). Bounds from the maxima of the
  // factors alone were far too loose: a pair with no tap in the image has f = 0 and an enormous
  // coefficient, and the quantisation error showed.
  const auto bound = [&] {
    Tensor b = at::empty({s.M}, p.xy.options());
    PYSSL_CUDA_CHECK(cuda::distill_term_bound(p.xy.const_data_ptr(), coef.const_data_ptr(),
                                              st.const_data_ptr(), p.args, b.mutable_data_ptr(),
                                              stream));
    return abs_max(b).item<double>();
  };
  const Tensor fixed = !(features_grad && det) ? Tensor() : fixed_point_gradient(
      p, features, s, stream, bound,
      [&](double inv_unit, const cuda::SampleArgs& args, int64_t* gfix) {
        PYSSL_CUDA_CHECK(cuda::distill_grad_features_fixed(
            pf.const_data_ptr(), pl, p.features.const_data_ptr(), dt, index_ptr(p),
            p.xy.const_data_ptr(), coef.const_data_ptr(), args, inv_unit, gfix, stream));
      });
  if (fixed.defined()) {
    gf = fixed;
  } else if (features_grad) {
    Tensor gacc = channels_last_accumulator(p.features, p.xy.options());
    const cuda::SampleArgs args = with_accumulator(p, gacc);
    if (!det) {
      PYSSL_CUDA_CHECK(cuda::distill_grad_features_atomic(
          pf.const_data_ptr(), pl, p.features.const_data_ptr(), dt, index_ptr(p), p.xy.const_data_ptr(),
          coef.const_data_ptr(), args, gacc.mutable_data_ptr(), stream));
    } else if (s.M > 0) {
      Tensor keys = at::empty({4 * s.M}, xy.options().dtype(at::kLong));
      PYSSL_CUDA_CHECK(cuda::sample_points_tap_keys(index_ptr(p), p.xy.const_data_ptr(), to_dtype(acc),
                                                    p.args, keys.mutable_data_ptr<int64_t>(), stream));
      auto [sorted, order] = at::sort(keys, /*stable=*/true, 0, false);
      auto [targets, inverse, counts] = at::unique_consecutive(sorted, false, true);
      const Tensor starts = at::cumsum(counts, 0) - counts;
      PYSSL_CUDA_CHECK(cuda::distill_grad_features_sorted(
          pf.const_data_ptr(), pl, p.features.const_data_ptr(), dt, index_ptr(p), p.xy.const_data_ptr(),
          coef.const_data_ptr(), args, order.const_data_ptr<int64_t>(),
          targets.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
          counts.const_data_ptr<int64_t>(), targets.numel(), gacc.mutable_data_ptr(), stream));
    }
    gf = like_features(gacc, features);
  }
  return {gpf, gf};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CUDA, m) {
  m.impl("sample_points", &sample_points_cuda);
  m.impl("sample_points_backward", &sample_points_backward_cuda);
  m.impl("distill_loss", &distill_loss_cuda);
  m.impl("distill_loss_backward", &distill_loss_backward_cuda);
}

}  // namespace pyssl::sampling
