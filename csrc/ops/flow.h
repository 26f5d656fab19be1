// Optical-flow / affine correspondence ops: argument checks shared by CPU and CUDA.
#pragma once

#include <cmath>

#include "ops/common.h"

namespace pyssl::flow {

inline void check_flow(const at::Tensor& flow_fw, const std::optional<at::Tensor>& flow_bw,
                       double alpha1, double alpha2) {
  // NaN fails both comparisons; a negative constant would make the check reject even a
  // perfectly consistent pair (alpha2 < 0) or depend on the sign of a scale (alpha1 < 0)
  TORCH_CHECK_VALUE(alpha1 >= 0 && std::isfinite(alpha1), "alpha1 must be finite and >= 0, got ", alpha1);
  TORCH_CHECK_VALUE(alpha2 >= 0 && std::isfinite(alpha2), "alpha2 must be finite and >= 0, got ", alpha2);
  check_dim(flow_fw, 4, "flow_fw", "[B, 2, H, W] (channel 0 = u/x, 1 = v/y)");
  TORCH_CHECK_VALUE(flow_fw.size(1) == 2, "flow_fw must have 2 channels (u, v), got shape ",
                    flow_fw.sizes());
  check_floating(flow_fw, "flow_fw");
  if (flow_bw.has_value()) {
    check_dim(*flow_bw, 4, "flow_bw", "[B, 2, H, W]");
    TORCH_CHECK_VALUE(flow_bw->sizes() == flow_fw.sizes(), "flow_bw must have the shape of flow_fw ",
                      flow_fw.sizes(), ", got ", flow_bw->sizes());
    check_floating(*flow_bw, "flow_bw");
    check_same_device(*flow_bw, flow_fw, "flow_bw", "flow_fw");
  }
}

inline void check_affine(const at::Tensor& theta, int64_t hin, int64_t win, int64_t hout, int64_t wout) {
  check_dim(theta, 3, "theta", "[B, 2, 3]");
  TORCH_CHECK_VALUE(theta.size(1) == 2 && theta.size(2) == 3, "theta must have shape [B, 2, 3], got ",
                    theta.sizes());
  check_floating(theta, "theta");
  TORCH_CHECK_VALUE(hin > 0 && win > 0, "size_in must be positive (H, W), got (", hin, ", ", win, ")");
  TORCH_CHECK_VALUE(hout > 0 && wout > 0, "size_out must be positive (H, W), got (", hout, ", ", wout, ")");
}

inline at::ScalarType flow_acc(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace pyssl::flow
