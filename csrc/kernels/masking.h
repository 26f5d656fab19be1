// Launchers of the patch-masking CUDA kernels (csrc/kernels/masking.cu). Torch-free: raw device
// pointers, the caller's stream; each returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/block_masking.h"
#include "kernels/common.h"

namespace pyssl::cuda {

// Longest row that random_masking_ranks handles in shared memory; longer rows go through a
// device sort in the glue and masking_from_shuffle.
int64_t random_masking_ranks_max_length(DType noise_dtype);

// Stable ascending rank of each element of each noise row [N, L]; writes ids_keep [N, K],
// ids_restore [N, L] and mask [N, L] (true where rank >= K).
cudaError_t random_masking_ranks(const void* noise, DType noise_dtype, int64_t N, int64_t L,
                                 int64_t K, int64_t* ids_keep, int64_t* ids_restore, bool* mask,
                                 cudaStream_t stream);

// keys[i] = an int64 that orders noise[i] as random_masking_ranks does (ordered_key: NaN last,
// -0.0 == +0.0), for a stable device sort of rows too long for it.
cudaError_t masking_sort_keys(const void* noise, DType noise_dtype, int64_t count, int64_t* keys,
                              cudaStream_t stream);

// Same outputs from an already computed stable argsort ids_shuffle [N, L].
cudaError_t masking_from_shuffle(const int64_t* ids_shuffle, int64_t N, int64_t L, int64_t K,
                                 int64_t* ids_keep, int64_t* ids_restore, bool* mask,
                                 cudaStream_t stream);

// out[n, r, :] = src[n, idx[n, r], :] if 0 <= idx[n, r] < threshold else fill (zeros if null).
// Rows of row_bytes bytes; src holds src_rows rows per batch element, out holds out_rows.
cudaError_t gather_rows(const void* src, const int64_t* idx, const void* fill, void* out,
                        int64_t N, int64_t out_rows, int64_t src_rows, int64_t threshold,
                        int64_t row_bytes, cudaStream_t stream);

// Sets bit 1 of *flag when some ids value lies outside [0, L), bit 2 when a row repeats a
// value. `counts` is a zeroed int32 workspace of N*L.
cudaError_t check_permutation(const int64_t* ids, int64_t N, int64_t L, int32_t* counts,
                              int32_t* flag, cudaStream_t stream);

// inverse[n, ids[n, l]] = l for ids[n, l] < K; inverse must be pre-filled with -1.
cudaError_t invert_permutation_prefix(const int64_t* ids, int64_t N, int64_t L, int64_t K,
                                      int64_t* inverse, cudaStream_t stream);

// out[d] = sum over rows r (fixed order) with ids[r] >= K of grad[r, d]; `partial` is a float
// (double for kFloat64) workspace of masked_row_sum_chunks(rows) * D elements.
int64_t masked_row_sum_chunks(int64_t rows);
cudaError_t masked_row_sum(const void* grad, DType dtype, const int64_t* ids, int64_t rows,
                           int64_t D, int64_t K, void* partial, void* out, cudaStream_t stream);

// One BEiT block mask per seed; out [N, H*W] zeroed, scratch int32 [N, H*W].
cudaError_t block_masking(const int64_t* seeds, int64_t N, const BlockMaskParams& params,
                          bool* out, int32_t* scratch, cudaStream_t stream);

}  // namespace pyssl::cuda
