// Device-side helpers shared by the CUDA kernels (torch-free).
#pragma once

#include <cstdint>
#include <cstdlib>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/common.h"

namespace pyssl::cuda {

// Accumulation type: float for fp32/fp16/bf16, double for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Calls f with a typed null pointer for the element type of `dtype`:
//   dispatch_dtype(dtype, [&](auto tag) { using T = std::remove_pointer_t<decltype(tag)>; ... });
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(static_cast<float*>(nullptr));
    case DType::kFloat64: return f(static_cast<double*>(nullptr));
    case DType::kFloat16: return f(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

// Whether the current device has sm_90's vector atomics (compute capability 9.0 or newer):
// kernels whose sm_90 path uses them fall back to slower scalar code on older architectures.
// PYSSL_NO_VECTOR_ATOMICS=1 makes them take the scalar path anyway (benchmarks/gpu_profile.py
// times both, to see what the vector atomics buy).
inline bool device_has_vector_atomics() {
  const char* off = std::getenv("PYSSL_NO_VECTOR_ATOMICS");
  if (off && off[0] == '1') return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major >= 9;
}

// Whether a pointer allows 16-byte vector accesses (host side, before choosing a vector path).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Vector loads and stores need their alignment; the CUDA emulator (tests/cuda_emu) checks it,
// since a host CPU would not fault where the GPU does.
#ifdef PYSSL_CUDA_EMULATOR
#define PYSSL_ASSUME_ALIGNED(p, n) ::emu::check_aligned((p), (n))
#else
#define PYSSL_ASSUME_ALIGNED(p, n) ((void)0)
#endif

}  // namespace pyssl::cuda

namespace pyssl::cuda {

// Max that propagates NaN (fmaxf drops it).
template <typename T> __device__ __forceinline__ T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename T> __device__ __forceinline__ T device_exp(T x);
template <> __device__ __forceinline__ float device_exp<float>(float x) { return __expf(x); }
template <> __device__ __forceinline__ double device_exp<double>(double x) { return exp(x); }

// Warp-wide reductions with a fixed xor butterfly: IEEE addition is commutative, so every lane
// ends with the same, repeatable value.
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide reductions with a fixed tree (bitwise repeatable); every thread gets the result.
// `smem` holds at least 32 * N values; the function synchronises before and after using it.
template <typename T>
__device__ __forceinline__ T block_max(T v, T* smem) {
  v = warp_max(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < nwarps; ++w) r = nan_max(r, smem[w]);
  return r;
}

template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N], T* smem) {
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_sum(v[n]);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) smem[n * 32 + warp] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    T r = smem[n * 32];
    for (int w = 1; w < nwarps; ++w) r += smem[n * 32 + w];
    v[n] = r;
  }
}

}  // namespace pyssl::cuda
