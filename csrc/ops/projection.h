// Point-to-pixel projection ops (LiDAR -> multi-camera) and segment pooling: argument checks
// shared by the CPU and CUDA implementations.
#pragma once

#include "kernels/projection_math.h"
#include "ops/common.h"

namespace pyssl::projection {

struct ProjShape {
  int64_t P, F, C, B;  // points, point columns, cameras, scans (1 without batch)
};

inline ProjShape check_projection(const at::Tensor& points, const at::Tensor& lidar_to_cam,
                                  const at::Tensor& intrinsics, const at::Tensor& image_size,
                                  const std::optional<at::Tensor>& batch, int64_t rounding,
                                  double margin) {
  // a negative margin would validate pixels outside the image
  TORCH_CHECK_VALUE(margin >= 0, "margin must be >= 0, got ", margin);
  check_dim(points, 2, "points", "[P, 3+] (x, y, z, extra columns ignored)");
  TORCH_CHECK_VALUE(points.size(1) >= 3, "points must have at least 3 columns (x, y, z), got shape ",
                    points.sizes());
  check_floating(points, "points");
  check_floating(lidar_to_cam, "lidar_to_cam");
  check_floating(intrinsics, "intrinsics");
  const bool batched = batch.has_value();
  const int64_t lead = batched ? 2 : 1;
  const char* m_layout = batched ? "[B, C, 4, 4]" : "[C, 4, 4]";
  const char* k_layout = batched ? "[B, C, 3, 3]" : "[C, 3, 3]";
  TORCH_CHECK_VALUE(lidar_to_cam.dim() == lead + 2 && lidar_to_cam.size(-1) == 4 &&
                        lidar_to_cam.size(-2) == 4,
                    "lidar_to_cam must have shape ", m_layout, ", got ", lidar_to_cam.sizes());
  TORCH_CHECK_VALUE(intrinsics.dim() == lead + 2 && intrinsics.size(-1) == 3 && intrinsics.size(-2) == 3,
                    "intrinsics must have shape ", k_layout, " (3x3 pinhole matrices), got ",
                    intrinsics.sizes());
  ProjShape s{points.size(0), points.size(1), lidar_to_cam.size(lead - 1), batched ? lidar_to_cam.size(0) : 1};
  TORCH_CHECK_VALUE(intrinsics.size(lead - 1) == s.C, "intrinsics has ", intrinsics.size(lead - 1),
                    " cameras but lidar_to_cam has ", s.C);
  if (batched) {
    TORCH_CHECK_VALUE(intrinsics.size(0) == s.B, "intrinsics has ", intrinsics.size(0),
                      " scans but lidar_to_cam has ", s.B);
    check_dim(*batch, 1, "batch", "[P] (scan index of each point)");
    check_dtype(*batch, {at::kLong}, "batch");
    check_size(*batch, 0, s.P, "batch", "P, the number of points");
    check_same_device(*batch, points, "batch", "points");
  }
  TORCH_CHECK_VALUE(image_size.dim() == lead + 1 && image_size.size(-1) == 2 &&
                        image_size.size(lead - 1) == s.C && (!batched || image_size.size(0) == s.B),
                    "image_size must have shape ", batched ? "[B, C, 2]" : "[C, 2]",
                    " (H, W per camera), got ", image_size.sizes());
  check_same_device(lidar_to_cam, points, "lidar_to_cam", "points");
  check_same_device(intrinsics, points, "intrinsics", "points");
  check_same_device(image_size, points, "image_size", "points");
  TORCH_CHECK_VALUE(rounding >= 0 && rounding <= 2, "rounding must be 0 (none), 1 (floor) or 2 (round), got ", rounding);
  return s;
}

inline at::ScalarType projection_acc(const at::Tensor& points, const at::Tensor& lidar_to_cam,
                                     const at::Tensor& intrinsics) {
  return (points.scalar_type() == at::kDouble || lidar_to_cam.scalar_type() == at::kDouble ||
          intrinsics.scalar_type() == at::kDouble)
             ? at::kDouble
             : at::kFloat;
}

// Geometry converted to the accumulation dtype, contiguous; scan indices range-checked.
struct ProjInputs {
  at::Tensor points, M, K, size, batch;
};

inline ProjInputs prepare_projection(const at::Tensor& points, const at::Tensor& lidar_to_cam,
                                     const at::Tensor& intrinsics, const at::Tensor& image_size,
                                     const std::optional<at::Tensor>& batch, const ProjShape& s) {
  const auto acc = projection_acc(points, lidar_to_cam, intrinsics);
  ProjInputs in{points.to(acc).contiguous(), lidar_to_cam.to(acc).contiguous(),
                intrinsics.to(acc).contiguous(), image_size.to(acc).contiguous(), at::Tensor()};
  if (batch.has_value()) {
    in.batch = batch->contiguous();
    check_index_range(in.batch, s.B, "batch", "scans, lidar_to_cam.shape[0]");
  }
  return in;
}

inline void check_segments(const at::Tensor& values, const at::Tensor& segment_ids,
                           int64_t num_segments) {
  check_dim(values, 2, "values", "[N, D]");
  check_floating(values, "values");
  check_dim(segment_ids, 1, "segment_ids", "[N]");
  check_dtype(segment_ids, {at::kLong}, "segment_ids");
  check_size(segment_ids, 0, values.size(0), "segment_ids", "N, the number of rows of values");
  check_same_device(segment_ids, values, "segment_ids", "values");
  TORCH_CHECK_VALUE(num_segments >= 0, "num_segments must be >= 0, got ", num_segments);
}

// point_pixel_pairs' camera choice: cameras in {0 all, 1 first, 2 random}; random [P] on the
// points' device for cameras = 2.
inline void check_pair_choice(int64_t cameras, const std::optional<at::Tensor>& random,
                              const at::Tensor& points, int64_t P) {
  TORCH_CHECK_VALUE(cameras >= 0 && cameras <= 2, "cameras must be 0 (all), 1 (first) or 2 (random)");
  TORCH_CHECK_VALUE(cameras != 2 || (random.has_value() && random->dim() == 1 && random->size(0) == P),
                    "cameras='random' needs random [P] uniform numbers in [0, 1)");
  if (cameras == 2) {
    check_floating(*random, "random");
    check_same_device(*random, points, "random", "points");
  }
}

inline void check_segment_mean_backward(const at::Tensor& grad_means, const at::Tensor& segment_ids,
                                        const at::Tensor& counts) {
  check_dim(grad_means, 2, "grad_means", "[S, D]");
  check_dim(segment_ids, 1, "segment_ids", "[N]");
  check_dtype(segment_ids, {at::kLong}, "segment_ids");
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == grad_means.size(0),
                    "counts must have shape [S] = [", grad_means.size(0), "], got ",
                    counts.sizes());
  check_dtype(counts, {at::kLong}, "counts");
  check_same_device(segment_ids, grad_means, "segment_ids", "grad_means");
  check_same_device(counts, grad_means, "counts", "grad_means");
}

}  // namespace pyssl::projection
