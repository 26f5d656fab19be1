// Patch-masking ops: the argument checks (one place per op, shared by the CPU and CUDA
// implementations) and the CPU building blocks the CUDA glue does not need.
#pragma once

#include <cmath>

#include "kernels/block_masking.h"
#include "ops/common.h"

namespace pyssl::masking {

inline void check_random_masking(const at::Tensor& x, const at::Tensor& noise, int64_t len_keep) {
  check_dim(x, 3, "x", "[N, L, D]");
  check_dim(noise, 2, "noise", "[N, L]");
  TORCH_CHECK_VALUE(noise.size(0) == x.size(0) && noise.size(1) == x.size(1),
                    "noise must have shape [N, L] = [", x.size(0), ", ", x.size(1),
                    "] to match x, got ", noise.sizes());
  check_floating(noise, "noise");
  check_same_device(noise, x, "noise", "x");
  TORCH_CHECK_VALUE(len_keep >= 0 && len_keep <= x.size(1), "len_keep must be in [0, L=",
                    x.size(1), "], got ", len_keep);
}

inline void check_unshuffle(const at::Tensor& visible, const at::Tensor& ids_restore,
                            const at::Tensor& mask_token) {
  check_dim(visible, 3, "visible", "[N, K, D]");
  check_dim(ids_restore, 2, "ids_restore", "[N, L]");
  check_dim(mask_token, 1, "mask_token", "[D]");
  check_dtype(ids_restore, {at::kLong}, "ids_restore");
  check_size(ids_restore, 0, visible.size(0), "ids_restore", "batch N of visible");
  TORCH_CHECK_VALUE(ids_restore.size(1) >= visible.size(1), "ids_restore.shape[1] (L=",
                    ids_restore.size(1), ") must be >= the number of visible tokens K=",
                    visible.size(1));
  check_size(mask_token, 0, visible.size(2), "mask_token", "D of visible");
  TORCH_CHECK_TYPE(mask_token.scalar_type() == visible.scalar_type(), "mask_token dtype (",
                   mask_token.scalar_type(), ") must equal visible dtype (",
                   visible.scalar_type(), ")");
  check_same_device(ids_restore, visible, "ids_restore", "visible");
  check_same_device(mask_token, visible, "mask_token", "visible");
}

inline void check_unshuffle_backward(const at::Tensor& grad, const at::Tensor& ids_restore,
                                     int64_t num_visible) {
  check_dim(grad, 3, "grad_output", "[N, L, D]");
  check_dim(ids_restore, 2, "ids_restore", "[N, L]");
  check_dtype(ids_restore, {at::kLong}, "ids_restore");
  TORCH_CHECK_VALUE(ids_restore.size(0) == grad.size(0) && ids_restore.size(1) == grad.size(1),
                    "ids_restore must have shape [N, L] of grad_output ", grad.sizes(), ", got ",
                    ids_restore.sizes());
  TORCH_CHECK_VALUE(num_visible >= 0 && num_visible <= grad.size(1),
                    "num_visible must be in [0, L=", grad.size(1), "], got ", num_visible);
  check_same_device(ids_restore, grad, "ids_restore", "grad_output");
}

// Checks block_masking's arguments and returns the per-sample parameters both kernels take.
inline BlockMaskParams block_mask_params(const at::Tensor& seeds, int64_t height, int64_t width,
                                         int64_t num_masking, int64_t min_patches,
                                         int64_t max_patches, double min_aspect,
                                         double max_aspect, bool exact) {
  check_dim(seeds, 1, "seeds", "[N]");
  check_dtype(seeds, {at::kLong}, "seeds");
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, "height and width must be >= 0, got ", height,
                    " and ", width);
  // Each factor below 2^31 first, so that the product cannot overflow int64.
  TORCH_CHECK_VALUE(height < (int64_t{1} << 31) && width < (int64_t{1} << 31) &&
                        height * width < (int64_t{1} << 31),
                    "height*width must be < 2**31 patches, got ", height, "*", width);
  TORCH_CHECK_VALUE(num_masking >= 0 && num_masking <= height * width,
                    "num_masking_patches must be in [0, height*width=", height * width,
                    "], got ", num_masking);
  TORCH_CHECK_VALUE(min_patches >= 0, "min_num_patches must be >= 0, got ", min_patches);
  TORCH_CHECK_VALUE(max_patches >= 1, "max_num_patches must be >= 1, got ", max_patches);
  TORCH_CHECK_VALUE(min_aspect > 0 && std::isfinite(min_aspect),
                    "min_aspect must be a positive finite number, got ", min_aspect);
  TORCH_CHECK_VALUE(max_aspect >= min_aspect && std::isfinite(max_aspect),
                    "max_aspect must be finite and >= min_aspect=", min_aspect, ", got ",
                    max_aspect);
  BlockMaskParams params;
  params.height = height;
  params.width = width;
  params.num_masking = num_masking;
  params.min_patches = min_patches;
  params.max_patches = max_patches;
  params.log_aspect_lo = std::log(min_aspect);
  params.log_aspect_hi = std::log(max_aspect);
  params.exact = exact;
  return params;
}

}  // namespace pyssl::masking
