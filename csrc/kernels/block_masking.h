// BEiT's block-wise masking for one sample (Bao et al., 2022, sec. 2.5), shared verbatim by the
// CPU kernel (csrc/ops/masking.cpp) and the CUDA kernel (csrc/kernels/masking.cu).
//
// Repeatedly: draw a target area uniformly in [min_patches, budget] and an aspect ratio
// log-uniformly in [min_aspect, max_aspect]; h = round(sqrt(area * aspect)),
// w = round(sqrt(area / aspect)) (round half to even); if h < height and w < width, place the
// rectangle at a uniform position and accept it when it masks between 1 and `budget` new
// patches (budget = min(remaining, max_patches)). Up to 10 attempts per round; the process
// stops when the count is reached or a round makes no progress. With `exact`, the remaining
// patches are then drawn uniformly among the unmasked ones, so every sample ends with exactly
// num_masking patches.
#pragma once

#include <math.h>

#include "kernels/common.h"
#include "kernels/rng.h"

namespace pyssl {

struct BlockMaskParams {
  int64_t height;
  int64_t width;
  int64_t num_masking;
  int64_t min_patches;
  int64_t max_patches;
  double log_aspect_lo;
  double log_aspect_hi;
  bool exact;
};

// `mask` holds height*width bytes, all zero on entry; `scratch` holds height*width ints
// (read only when p.exact; may be null otherwise).
// Returns the number of masked patches.
PYSSL_HD int64_t block_mask_sample(uint64_t seed, const BlockMaskParams& p, bool* mask,
                                   int32_t* scratch) {
  SplitMix64 rng(seed);
  const int64_t H = p.height, W = p.width;
  int64_t count = 0;
  while (count < p.num_masking) {
    int64_t budget = p.num_masking - count;
    if (p.max_patches < budget) budget = p.max_patches;
    int64_t delta = 0;
    for (int attempt = 0; attempt < 10; ++attempt) {
      const double target_area = rng.uniform(static_cast<double>(p.min_patches),
                                             static_cast<double>(budget));
      const double aspect = exp(rng.uniform(p.log_aspect_lo, p.log_aspect_hi));
      // Compared as doubles before the cast: an extreme aspect ratio gives sides beyond int64.
      const double hd = rint(sqrt(target_area * aspect));
      const double wd = rint(sqrt(target_area / aspect));
      if (wd < static_cast<double>(W) && hd < static_cast<double>(H)) {
        const int64_t h = static_cast<int64_t>(hd), w = static_cast<int64_t>(wd);
        const int64_t top = rng.randint(0, H - h);
        const int64_t left = rng.randint(0, W - w);
        int64_t already = 0;
        for (int64_t i = top; i < top + h; ++i)
          for (int64_t j = left; j < left + w; ++j) already += mask[i * W + j] ? 1 : 0;
        const int64_t fresh = h * w - already;
        if (fresh > 0 && fresh <= budget) {
          for (int64_t i = top; i < top + h; ++i)
            for (int64_t j = left; j < left + w; ++j) mask[i * W + j] = true;
          delta += fresh;
        }
      }
      if (delta > 0) break;
    }
    if (delta == 0) break;
    count += delta;
  }
  if (p.exact && count < p.num_masking) {
    // Partial Fisher-Yates shuffle over the unmasked patches, in row-major order.
    int64_t r = 0;
    for (int64_t k = 0; k < H * W; ++k)
      if (!mask[k]) scratch[r++] = static_cast<int32_t>(k);
    const int64_t need = p.num_masking - count;
    for (int64_t i = 0; i < need; ++i) {
      const int64_t j = rng.randint(i, r - 1);
      const int32_t t = scratch[i];
      scratch[i] = scratch[j];
      scratch[j] = t;
      mask[scratch[i]] = true;
    }
    count = p.num_masking;
  }
  return count;
}

}  // namespace pyssl
