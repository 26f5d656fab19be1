// Launchers of the projection / segment CUDA kernels (csrc/kernels/projection.cu). Torch-free.
// Geometry in acc (float or double): points [P, F], matrices [(B,) C, 4, 4] / [(B,) C, 3, 3],
// image sizes [(B,) C, 2]; batch [P] or null.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/common.h"

namespace pyssl::cuda {

struct ProjArgs {
  int64_t P, F, C;
  double min_depth, margin;
  int rounding;
};

cudaError_t project_points(const void* points, DType acc, const void* M, const void* K,
                           const void* size, const int64_t* batch, const ProjArgs& a,
                           void* pixels, void* depth, bool* valid, cudaStream_t stream);

// counts[p] = number of pairs point p contributes (cameras: 0 all, 1 first, 2 random).
cudaError_t pair_counts(const void* points, DType acc, const void* M, const void* K,
                        const void* size, const int64_t* batch, const ProjArgs& a, int cameras,
                        int64_t* counts, cudaStream_t stream);

// Writes the pairs of point p at offsets[p] (exclusive scan of counts), at most counts[p] of
// them; random [P] in [0, 1).
cudaError_t pair_write(const void* points, DType acc, const void* M, const void* K,
                       const void* size, const int64_t* batch, const ProjArgs& a, int cameras,
                       const double* random, const int64_t* offsets, const int64_t* counts,
                       int64_t* point_index, int64_t* camera_index, int64_t* row, int64_t* col,
                       cudaStream_t stream);

// counts[s] += 1 per row with segment id s (int atomics); flag bit 1 set for ids out of range.
cudaError_t segment_counts(const int64_t* ids, int64_t N, int64_t S, int64_t* counts,
                           int32_t* flag, cudaStream_t stream);

// sums [S, D] (acc, zeroed) += values [N, D] rows by segment, float atomics.
cudaError_t segment_sum_atomic(const void* values, DType dtype, const int64_t* ids, int64_t N,
                               int64_t D, void* sums, cudaStream_t stream);

// Deterministic: rows sorted by id (order), segments (targets, starts, lengths): sums[t, d].
cudaError_t segment_sum_sorted(const void* values, DType dtype, const int64_t* order,
                               const int64_t* targets, const int64_t* starts,
                               const int64_t* lengths, int64_t segments, int64_t D, void* sums,
                               cudaStream_t stream);

// means [S, D] (value dtype) = sums / max(counts, 1).
cudaError_t segment_divide(const void* sums, const int64_t* counts, DType dtype, int64_t S,
                           int64_t D, void* means, cudaStream_t stream);

// out [N, D] = grad [S, D][ids] / counts[ids] (0 for ids < 0).
cudaError_t segment_gather(const void* grad, DType dtype, const int64_t* ids,
                           const int64_t* counts, int64_t N, int64_t S, int64_t D, void* out,
                           cudaStream_t stream);

}  // namespace pyssl::cuda
