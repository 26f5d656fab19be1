// Launchers of the point-sampling CUDA kernels (csrc/kernels/sampling.cu). Torch-free.
// features [N, D, H, W] with element strides; xy [M, 2] and accumulators in acc (float, or
// double for fp64); image_index [M] or null (then point m belongs to image m / per_image).
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/common.h"
#include "kernels/sampling_math.h"

namespace pyssl::cuda {

struct SampleArgs {
  int64_t N, D, H, W, M, per_image;
  int64_t sN, sD, sH, sW;  // feature strides (elements)
  int64_t gN, gD, gH, gW;  // strides of the gradient accumulator (laid out like the features)
  int mode;                // 0 bilinear, 1 nearest
  // strides of the output gradient grad [M, D] (elements) that the backward kernels read: any
  // strides, e.g. (1, 0) for a gradient expanded over the channels (that of a loss on the
  // channel sum), read in place instead of through a contiguous copy
  int64_t tM, tD;
};

// out [M, D] (feature dtype).
cudaError_t sample_points(const void* features, DType dtype, const int64_t* image_index,
                          const void* xy, const SampleArgs& a, void* out, cudaStream_t stream);

// gacc (acc, zeroed, strides gN..gW) += scatter of grad [M, D] with float atomics.
cudaError_t sample_points_backward_atomic(const void* grad, DType dtype,
                                          const int64_t* image_index, const void* xy,
                                          const SampleArgs& a, void* gacc, cudaStream_t stream);

// Deterministic scatter without float atomics, for a float accumulator: gfix (int64, zeroed,
// strides gN..gW) += llrint(w * grad * inv_unit) with integer atomics, whose sum is exact in any
// order; then fixed_to_grad: the feature gradient in the features' dtype (`dtype`) from gfix
// laid out channels-last, [N, HW, D] dense: out[n, d, pixel] = from_acc(float(gfix * unit)) at
// out + n * HW * D + d * HW + pixel (planar: an NCHW map, transposed through shared-memory tiles)
// or at the same element offset as in gfix (!planar: a channels-last map). The caller picks
// unit = 2^(e - 62) with 2^e > M * max|grad|, which bounds every partial sum below 2^62 units.
// Not for double accumulators or gradients (cudaErrorInvalidValue).
cudaError_t sample_points_backward_fixed(const void* grad, DType dtype, const int64_t* image_index,
                                         const void* xy, const SampleArgs& a, double inv_unit,
                                         int64_t* gfix, cudaStream_t stream);
cudaError_t fixed_to_grad(const int64_t* gfix, int64_t N, int64_t HW, int64_t D, double unit,
                          bool planar, DType dtype, void* out, cudaStream_t stream);

// Deterministic scatter in two steps: keys [4M] = target pixel of each (point, tap) or -1 ...
cudaError_t sample_points_tap_keys(const int64_t* image_index, const void* xy, DType acc_dtype,
                                   const SampleArgs& a, int64_t* keys, cudaStream_t stream);
// ... then, for the taps sorted by key (order = stable permutation, segments of equal keys with
// `starts`/`counts`/`targets`), gacc[target, d] = sum over the segment, in order.
cudaError_t sample_points_segment_sum(const void* grad, DType dtype, const int64_t* image_index,
                                      const void* xy, const SampleArgs& a, const int64_t* order,
                                      const int64_t* targets, const int64_t* starts,
                                      const int64_t* counts, int64_t segments, void* gacc,
                                      cudaStream_t stream);

// gxy [M, 2] (acc) = d(sum grad * out) / d xy (bilinear).
cudaError_t sample_points_backward_xy(const void* grad, const void* features, DType dtype,
                                      const int64_t* image_index, const void* xy,
                                      const SampleArgs& a, void* gxy, cudaStream_t stream);

// Fused distillation loss (see csrc/ops/sampling.cpp). Point features (acc) at rows given by
// a RowLayout; weights [M] (acc) or null; stats [M, 3], coef [M, 4], per_pair [M] in acc.
cudaError_t distill_forward(const void* point_features, const RowLayout& pl, const void* weights,
                            const void* features, DType dtype, const int64_t* image_index,
                            const void* xy, const SampleArgs& a, int loss, void* stats,
                            void* per_pair, void* loss_out, cudaStream_t stream);
// weight_sum: device scalar sum of the weights (ignored without weights).
cudaError_t distill_coefficients(const void* grad_loss, const void* stats, const void* weights,
                                 const void* weight_sum, DType acc_dtype, int64_t M, int loss,
                                 void* coef, cudaStream_t stream);
cudaError_t distill_grad_points(const void* point_features, const RowLayout& pl,
                                const void* features, DType dtype, const int64_t* image_index,
                                const void* xy, const void* coef, const SampleArgs& a, void* grad,
                                const RowLayout& gl, cudaStream_t stream);
cudaError_t distill_grad_features_atomic(const void* point_features, const RowLayout& pl,
                                         const void* features, DType dtype,
                                         const int64_t* image_index, const void* xy,
                                         const void* coef, const SampleArgs& a, void* gacc,
                                         cudaStream_t stream);
// Deterministic: the fixed-point scatter of sample_points_backward_fixed into gfix (int64,
// zeroed); then fixed_to_grad. Not for double (cudaErrorInvalidValue). distill_term_bound
// (float xy, coef, stats) gives bound [M] >= |every term pair m adds to a pixel|, for the unit.
cudaError_t distill_term_bound(const void* xy, const void* coef, const void* stats,
                               const SampleArgs& a, void* bound, cudaStream_t stream);
cudaError_t distill_grad_features_fixed(const void* point_features, const RowLayout& pl,
                                        const void* features, DType dtype,
                                        const int64_t* image_index, const void* xy,
                                        const void* coef, const SampleArgs& a, double inv_unit,
                                        int64_t* gfix, cudaStream_t stream);
cudaError_t distill_grad_features_sorted(const void* point_features, const RowLayout& pl,
                                         const void* features, DType dtype,
                                         const int64_t* image_index, const void* xy,
                                         const void* coef, const SampleArgs& a,
                                         const int64_t* order, const int64_t* targets,
                                         const int64_t* starts, const int64_t* counts,
                                         int64_t segments, void* gacc, cudaStream_t stream);

}  // namespace pyssl::cuda
