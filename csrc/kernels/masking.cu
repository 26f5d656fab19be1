// Patch-masking CUDA kernels. See csrc/kernels/masking.h for the launchers' contracts and
// pyssl/ops/masking.py for the ops'.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda_common.cuh"
#include "kernels/masking.h"

namespace pyssl::cuda {
namespace {

constexpr int kThreads = 256;
// ranks_kernel's shared keys are allocated in multiples of this many keys.
constexpr int kRanksPad = 4;
__host__ __device__ __forceinline__ int64_t padded_keys(int64_t L) {
  return ceil_div(L, kRanksPad) * kRanksPad;
}

__device__ __forceinline__ uint32_t key_of(float x) { return ordered_key(x); }
__device__ __forceinline__ uint64_t key_of(double x) { return ordered_key(x); }
__device__ __forceinline__ uint32_t key_of(__half x) { return ordered_key(__half2float(x)); }
__device__ __forceinline__ uint32_t key_of(__nv_bfloat16 x) {
  return ordered_key(__bfloat162float(x));
}

// One block per row: the row's keys sit in shared memory and each element's rank is the number
// of (key, index) pairs before it. O(L^2 / threads) per row, which beats a sort for the short
// rows of patch tokens (L = 196 for ViT-B/16 at 224 px).
template <typename in_t, typename key_t>
__global__ void ranks_kernel(const in_t* __restrict__ noise, int L, int64_t K,
                             int64_t* __restrict__ keep, int64_t* __restrict__ restore,
                             bool* __restrict__ mask) {
  extern __shared__ __align__(16) unsigned char smem[];
  key_t* keys = reinterpret_cast<key_t*>(smem);
  const int64_t n = blockIdx.x;
  const in_t* row = noise + n * L;
  for (int l = threadIdx.x; l < L; l += blockDim.x) keys[l] = key_of(row[l]);
  // The allocation is padded to a multiple of 4 keys (random_masking_ranks): ptxas may read
  // the scalar tail of the unrolled loop below as one vector, past L (compute-sanitizer's
  // memcheck flagged 12-byte reads at keys[L-1] on an H100, nvcc 13.0). Zero the padding so
  // those reads see defined values; they are never used.
  for (int l = L + threadIdx.x; l < padded_keys(L); l += blockDim.x) keys[l] = 0;
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const key_t k = keys[l];
    int r = 0;
    for (int j = 0; j < L; ++j) {
      const key_t kj = keys[j];
      r += (kj < k) | ((kj == k) & (j < l));
    }
    restore[n * L + l] = r;
    mask[n * L + l] = r >= K;
    if (r < K) keep[n * K + r] = l;
  }
}

// int64 keys that sort like ordered_key (the CPU's order: NaN last, -0.0 == +0.0); a stable
// ascending sort of them is the contract's stable argsort of the noise.
template <typename in_t>
__global__ void sort_keys_kernel(const in_t* __restrict__ noise, int64_t count,
                                 int64_t* __restrict__ keys) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < count;
       t += int64_t(gridDim.x) * blockDim.x) {
    const auto k = key_of(noise[t]);
    if constexpr (sizeof(k) == 8) {
      keys[t] = static_cast<int64_t>(k ^ (uint64_t{1} << 63));  // unsigned order -> signed
    } else {
      keys[t] = static_cast<int64_t>(k);
    }
  }
}

__global__ void from_shuffle_kernel(const int64_t* __restrict__ shuffle, int64_t N, int64_t L,
                                    int64_t K, int64_t* __restrict__ keep,
                                    int64_t* __restrict__ restore, bool* __restrict__ mask) {
  const int64_t total = N * L;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / L, r = t % L;
    const int64_t l = shuffle[t];
    restore[n * L + l] = r;
    mask[n * L + l] = r >= K;
    if (r < K) keep[n * K + r] = l;
  }
}

template <typename V> __device__ __forceinline__ V zero_vec() { return V{}; }
template <> __device__ __forceinline__ uint4 zero_vec<uint4>() { return make_uint4(0, 0, 0, 0); }
template <> __device__ __forceinline__ uint2 zero_vec<uint2>() { return make_uint2(0, 0); }

// One warp per output row; lanes stride over the row in V-sized (up to 16-byte) vectors.
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ src, const int64_t* __restrict__ idx,
                                   const V* __restrict__ fill, V* __restrict__ out, int64_t N,
                                   int64_t R, int64_t Ls, int64_t threshold, int64_t vpr) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t row = warp; row < N * R; row += nwarps) {
    const int64_t n = row / R;
    const int64_t i = idx[row];
    const V* s = (i >= 0 && i < threshold) ? src + (n * Ls + i) * vpr : fill;
    V* o = out + row * vpr;
    if (s) {
#pragma unroll 4
      for (int64_t v = lane; v < vpr; v += 32) o[v] = s[v];
    } else {
      for (int64_t v = lane; v < vpr; v += 32) o[v] = zero_vec<V>();
    }
  }
}

template <typename V>
cudaError_t launch_gather(const void* src, const int64_t* idx, const void* fill, void* out,
                          int64_t N, int64_t R, int64_t Ls, int64_t threshold, int64_t row_bytes,
                          cudaStream_t stream) {
  const int64_t rows = N * R;
  const int64_t warps_per_block = kThreads / 32;
  const int64_t blocks = std::min<int64_t>(ceil_div(rows, warps_per_block), int64_t{1} << 20);
  gather_rows_kernel<V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const V*>(src), idx, static_cast<const V*>(fill), static_cast<V*>(out), N, R,
      Ls, threshold, row_bytes / static_cast<int64_t>(sizeof(V)));
  return cudaGetLastError();
}

__global__ void count_values_kernel(const int64_t* __restrict__ ids, int64_t N, int64_t L,
                                    int32_t* __restrict__ counts, int32_t* flag) {
  const int64_t total = N * L;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = ids[t];
    if (v < 0 || v >= L) {
      atomicOr(flag, 1);
    } else {
      atomicAdd(counts + (t / L) * L + v, 1);
    }
  }
}

__global__ void check_counts_kernel(const int32_t* __restrict__ counts, int64_t total,
                                    int32_t* flag) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    if (counts[t] > 1) atomicOr(flag, 2);
  }
}

__global__ void invert_kernel(const int64_t* __restrict__ ids, int64_t N, int64_t L, int64_t K,
                              int64_t* __restrict__ inverse) {
  const int64_t total = N * L;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = ids[t];
    // The largest position wins, as on the CPU, if ids repeat (validate=False): no race.
    if (v >= 0 && v < K)
      atomicMax(reinterpret_cast<long long*>(inverse + (t / L) * K + v),
                static_cast<long long>(t % L));
  }
}

constexpr int64_t kRowChunk = 256;

// partial[c, d] = sum over rows r in chunk c (ascending) with ids[r] outside [0, K) of
// grad[r, d]: the rows where the forward wrote mask_token.
template <typename T>
__global__ void masked_row_partial_kernel(const T* __restrict__ grad,
                                          const int64_t* __restrict__ ids, int64_t rows,
                                          int64_t D, int64_t K, acc_t<T>* __restrict__ partial) {
  const int64_t c = blockIdx.x;  // chunks on x: up to 2^31 - 1 blocks
  const int64_t r1 = min(rows, (c + 1) * kRowChunk);
  // Columns on y, grid-strided: gridDim.y is capped at 65535.
  for (int64_t d = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; d < D;
       d += int64_t(gridDim.y) * blockDim.x) {
    acc_t<T> acc = 0;
    for (int64_t r = c * kRowChunk; r < r1; ++r) {
      if (ids[r] < 0 || ids[r] >= K) acc += to_acc(grad[r * D + d]);  // as the forward
    }
    partial[c * D + d] = acc;
  }
}

template <typename T>
__global__ void sum_partials_kernel(const acc_t<T>* __restrict__ partial, int64_t chunks,
                                    int64_t D, T* __restrict__ out) {
  const int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  acc_t<T> s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * D + d];
  out[d] = from_acc<T>(s);
}

__global__ void block_masking_kernel(const int64_t* __restrict__ seeds, int64_t N,
                                     BlockMaskParams params, bool* __restrict__ out,
                                     int32_t* __restrict__ scratch) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  const int64_t HW = params.height * params.width;
  block_mask_sample(static_cast<uint64_t>(seeds[n]), params, out + n * HW,
                    scratch ? scratch + n * HW : nullptr);
}

unsigned grid_for(int64_t work, int64_t threads = kThreads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, threads),
                                                                      int64_t{1} << 16)));
}

}  // namespace

int64_t random_masking_ranks_max_length(DType noise_dtype) {
  return noise_dtype == DType::kFloat64 ? 4096 : 8192;
}

cudaError_t random_masking_ranks(const void* noise, DType noise_dtype, int64_t N, int64_t L,
                                 int64_t K, int64_t* ids_keep, int64_t* ids_restore, bool* mask,
                                 cudaStream_t stream) {
  if (N == 0 || L == 0) return cudaSuccess;
  if (L > random_masking_ranks_max_length(noise_dtype)) return cudaErrorInvalidValue;
  return dispatch_dtype(noise_dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using key_t = std::conditional_t<std::is_same_v<T, double>, uint64_t, uint32_t>;
    const int threads = L >= 256 ? 256 : static_cast<int>(ceil_div(L, 32) * 32);
    const size_t smem = padded_keys(L) * sizeof(key_t);
    ranks_kernel<T, key_t><<<static_cast<unsigned>(N), threads, smem, stream>>>(
        static_cast<const T*>(noise), static_cast<int>(L), K, ids_keep, ids_restore, mask);
    return cudaGetLastError();
  });
}

cudaError_t masking_sort_keys(const void* noise, DType noise_dtype, int64_t count, int64_t* keys,
                              cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return dispatch_dtype(noise_dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sort_keys_kernel<T><<<grid_for(count), kThreads, 0, stream>>>(static_cast<const T*>(noise),
                                                                    count, keys);
    return cudaGetLastError();
  });
}

cudaError_t masking_from_shuffle(const int64_t* ids_shuffle, int64_t N, int64_t L, int64_t K,
                                 int64_t* ids_keep, int64_t* ids_restore, bool* mask,
                                 cudaStream_t stream) {
  if (N * L == 0) return cudaSuccess;
  from_shuffle_kernel<<<grid_for(N * L), kThreads, 0, stream>>>(ids_shuffle, N, L, K, ids_keep,
                                                                ids_restore, mask);
  return cudaGetLastError();
}

cudaError_t gather_rows(const void* src, const int64_t* idx, const void* fill, void* out,
                        int64_t N, int64_t out_rows, int64_t src_rows, int64_t threshold,
                        int64_t row_bytes, cudaStream_t stream) {
  if (N * out_rows == 0 || row_bytes == 0) return cudaSuccess;
  auto aligned = [&](uintptr_t a) {
    uintptr_t bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out) |
                     reinterpret_cast<uintptr_t>(fill) | static_cast<uintptr_t>(row_bytes);
    return (bits % a) == 0;
  };
  if (aligned(16)) return launch_gather<uint4>(src, idx, fill, out, N, out_rows, src_rows, threshold, row_bytes, stream);
  if (aligned(8)) return launch_gather<uint2>(src, idx, fill, out, N, out_rows, src_rows, threshold, row_bytes, stream);
  if (aligned(4)) return launch_gather<uint32_t>(src, idx, fill, out, N, out_rows, src_rows, threshold, row_bytes, stream);
  if (aligned(2)) return launch_gather<uint16_t>(src, idx, fill, out, N, out_rows, src_rows, threshold, row_bytes, stream);
  return launch_gather<uint8_t>(src, idx, fill, out, N, out_rows, src_rows, threshold, row_bytes, stream);
}

cudaError_t check_permutation(const int64_t* ids, int64_t N, int64_t L, int32_t* counts,
                              int32_t* flag, cudaStream_t stream) {
  if (N * L == 0) return cudaSuccess;
  count_values_kernel<<<grid_for(N * L), kThreads, 0, stream>>>(ids, N, L, counts, flag);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  check_counts_kernel<<<grid_for(N * L), kThreads, 0, stream>>>(counts, N * L, flag);
  return cudaGetLastError();
}

cudaError_t invert_permutation_prefix(const int64_t* ids, int64_t N, int64_t L, int64_t K,
                                      int64_t* inverse, cudaStream_t stream) {
  if (N * L == 0) return cudaSuccess;
  invert_kernel<<<grid_for(N * L), kThreads, 0, stream>>>(ids, N, L, K, inverse);
  return cudaGetLastError();
}

int64_t masked_row_sum_chunks(int64_t rows) { return std::max<int64_t>(1, ceil_div(rows, kRowChunk)); }

cudaError_t masked_row_sum(const void* grad, DType dtype, const int64_t* ids, int64_t rows,
                           int64_t D, int64_t K, void* partial, void* out, cudaStream_t stream) {
  if (D == 0) return cudaSuccess;
  const int64_t chunks = masked_row_sum_chunks(rows);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto* part = static_cast<acc_t<T>*>(partial);
    dim3 grid(static_cast<unsigned>(chunks),
              static_cast<unsigned>(std::min<int64_t>(ceil_div(D, kThreads), 65535)));
    masked_row_partial_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(grad), ids,
                                                                rows, D, K, part);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    sum_partials_kernel<T><<<static_cast<unsigned>(ceil_div(D, kThreads)), kThreads, 0, stream>>>(
        part, chunks, D, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t block_masking(const int64_t* seeds, int64_t N, const BlockMaskParams& params,
                          bool* out, int32_t* scratch, cudaStream_t stream) {
  if (N == 0 || params.height * params.width == 0) return cudaSuccess;
  constexpr int threads = 64;
  block_masking_kernel<<<static_cast<unsigned>(ceil_div(N, threads)), threads, 0, stream>>>(
      seeds, N, params, out, scratch);
  return cudaGetLastError();
}

}  // namespace pyssl::cuda
