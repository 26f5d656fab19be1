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

inline at::ScalarType sample_acc(const at::Tensor& features, const at::Tensor& xy) {
  return (features.scalar_type() == at::kDouble || xy.scalar_type() == at::kDouble) ? at::kDouble
                                                                                   : at::kFloat;
}

}  // namespace pyssl::sampling
