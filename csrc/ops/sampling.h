// Point sampling of image features (bilinear / nearest, pixel units, zeros outside): the core of
// pyssl.ops.gather_pixel_features (LiDAR-camera distillation) and pyssl.ops.sample_features
// (optical-flow correspondence). Argument checks shared by the CPU and CUDA implementations.
#pragma once

#include "kernels/sampling_math.h"
#include "ops/common.h"

namespace pyssl::sampling {

struct SampleShape {
  int64_t N, D, H, W, M;
  int64_t per_image;  // points per image when image_index is None, else 0
};

inline SampleShape check_sample(const at::Tensor& features,
                                const std::optional<at::Tensor>& image_index,
                                const at::Tensor& xy, int64_t mode) {
  check_dim(features, 4, "features", "[N, D, H, W]");
  check_floating(features, "features");
  check_dim(xy, 2, "xy", "[M, 2] (x = column, y = row, pixel units)");
  TORCH_CHECK_VALUE(xy.size(1) == 2, "xy must have shape [M, 2], got ", xy.sizes());
  check_floating(xy, "xy");
  check_same_device(xy, features, "xy", "features");
  TORCH_CHECK_VALUE(mode == kBilinear || mode == kNearest, "mode must be 0 (bilinear) or 1 (nearest), got ", mode);
  SampleShape s{features.size(0), features.size(1), features.size(2), features.size(3), xy.size(0), 0};
  if (image_index.has_value()) {
    check_dim(*image_index, 1, "image_index", "[M]");
    check_dtype(*image_index, {at::kLong}, "image_index");
    check_size(*image_index, 0, s.M, "image_index", "M, the number of points in xy");
    check_same_device(*image_index, features, "image_index", "features");
  } else {
    TORCH_CHECK_VALUE((s.N == 0 && s.M == 0) || (s.N > 0 && s.M % s.N == 0),
                      "without image_index, the number of points (", s.M,
                      ") must be a multiple of the number of images (", s.N, ")");
    s.per_image = s.N > 0 ? s.M / s.N : 0;
  }
  return s;
}

// Scatter-adds on CUDA, and on the CPU into channels-last features, accumulate in a zeroed
// [N, D, H, W] buffer with channels-last strides: each (pixel, channel-run) write is
// contiguous. like_features() converts an accumulator to the features' dtype and memory format
// (a no-op when they match), so autograd accumulates it without another copy.
inline at::Tensor channels_last_accumulator(const at::Tensor& features, const at::TensorOptions& acc) {
  return zeros_large({features.size(0), features.size(2), features.size(3), features.size(1)}, acc)
      .permute({0, 3, 1, 2});
}

// The feature gradient from its accumulator: the accumulator itself when it has the features'
// dtype and memory format, else a copy (in huge-page-advised memory: it can be 100s of MB).
inline at::Tensor like_features(const at::Tensor& acc, const at::Tensor& features) {
  const auto format = features.suggest_memory_format();
  if (acc.scalar_type() == features.scalar_type() && acc.is_contiguous(format)) return acc;
  return copy_large(acc, acc.options().dtype(features.scalar_type()).memory_format(format));
}

inline at::ScalarType sample_acc(const at::Tensor& features, const at::Tensor& xy) {
  return (features.scalar_type() == at::kDouble || xy.scalar_type() == at::kDouble) ? at::kDouble
                                                                                   : at::kFloat;
}

// Inputs converted for the kernels: features (fp64 when the coordinates are), coordinates in the
// accumulation dtype, contiguous; image indices range-checked.
struct SamplePrepared {
  at::Tensor features, xy, index;
};

inline SamplePrepared prepare_sampling(const at::Tensor& features,
                                       const std::optional<at::Tensor>& image_index,
                                       const at::Tensor& xy, const SampleShape& s) {
  const auto acc = sample_acc(features, xy);
  SamplePrepared p;
  p.features = (acc == at::kDouble && features.scalar_type() != at::kDouble) ? features.to(acc) : features;
  p.xy = xy.to(acc).contiguous();
  if (image_index.has_value()) {
    p.index = image_index->contiguous();
    check_index_range(p.index, s.N, "image_index", "images, features.shape[0]");
  }
  return p;
}

}  // namespace pyssl::sampling

namespace pyssl::sampling {

// Fused pixel-to-point distillation loss (sampling + cosine / normalised-L2 loss).
enum DistillLoss : int { kCosine = 0, kL2Normalized = 1 };
constexpr double kNormEps = 1e-12;  // F.normalize's eps

inline void check_distill(const at::Tensor& point_features, const at::Tensor& features,
                          const std::optional<at::Tensor>& weights, const SampleShape& s,
                          int64_t loss) {
  check_floating(point_features, "point_features");
  check_same_device(point_features, features, "point_features", "features");
  if (point_features.dim() == 2) {
    TORCH_CHECK_VALUE(point_features.size(0) == s.M && point_features.size(1) == s.D,
                      "point_features must have shape [M, D] = [", s.M, ", ", s.D,
                      "] (one row per pair, D = features.shape[1]), got ", point_features.sizes());
  } else {
    TORCH_CHECK_VALUE(point_features.dim() == 4 && point_features.size(1) == s.D &&
                          point_features.size(0) * point_features.size(2) * point_features.size(3) == s.M,
                      "point_features must be [M, D] or a dense map [N, D, Ho, Wo] with N*Ho*Wo = M = ",
                      s.M, " and D = ", s.D, ", got ", point_features.sizes());
  }
  if (weights.has_value()) {
    TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == s.M, "weights must have shape [M] = [",
                      s.M, "], got ", weights->sizes());
    check_floating(*weights, "weights");
    check_same_device(*weights, features, "weights", "features");
  }
  TORCH_CHECK_VALUE(loss == kCosine || loss == kL2Normalized,
                    "loss must be 0 (cosine) or 1 (l2_normalized), got ", loss);
}

// sample_points' output gradient: [M, D] on the features' device.
inline void check_sample_grad(const at::Tensor& grad, const at::Tensor& features,
                              const SampleShape& s) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == s.M && grad.size(1) == s.D,
                    "grad must have shape [M, D] = [", s.M, ", ", s.D, "], got ", grad.sizes());
  check_floating(grad, "grad");
  check_same_device(grad, features, "grad", "features");
}

// The backward's extra inputs: the forward's per-pair statistics and the scalar gradient.
inline void check_distill_backward(const at::Tensor& grad_loss, const at::Tensor& stats,
                                   const at::Tensor& features, const SampleShape& s) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one value, got shape ",
                    grad_loss.sizes());
  check_floating(grad_loss, "grad_loss");
  check_same_device(grad_loss, features, "grad_loss", "features");
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == s.M && stats.size(1) == 3,
                    "stats must have shape [M, 3] = [", s.M, ", 3], got ", stats.sizes());
  check_floating(stats, "stats");
  check_same_device(stats, features, "stats", "features");
}

inline RowLayout row_layout(const at::Tensor& pf) {
  if (pf.dim() == 2) return {1, 1, pf.stride(0), pf.stride(1), 0, 0};
  return {pf.size(2), pf.size(3), pf.stride(0), pf.stride(1), pf.stride(2), pf.stride(3)};
}

}  // namespace pyssl::sampling
