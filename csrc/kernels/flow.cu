// Flow-correspondence CUDA kernels: one thread per pixel; see csrc/kernels/flow.h.
#include <algorithm>

#include "kernels/cuda_common.cuh"
#include "kernels/flow.h"
#include "kernels/flow_math.h"

namespace pyssl::cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), int64_t{1} << 20)));
}

template <typename T>
__global__ void flow_kernel(const T* __restrict__ fw, const T* __restrict__ bw, FlowArgs a,
                            T* __restrict__ coords, bool* __restrict__ valid) {
  const int64_t total = a.B * a.H * a.W;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / (a.H * a.W), r = t % (a.H * a.W), i = r / a.W, j = r % a.W;
    const T* fp = fw + n * a.fs[0] + i * a.fs[2] + j * a.fs[3];
    const T* bn = bw ? bw + n * a.bs[0] : nullptr;
    const FlowMatch<T> m = flow_match<T, T>(i, j, fp[0], fp[a.fs[1]], bn, a.bs[1], a.bs[2], a.bs[3],
                                            a.H, a.W, T(a.alpha1), T(a.alpha2));
    coords[2 * t] = m.x;
    coords[2 * t + 1] = m.y;
    valid[t] = m.valid;
  }
}

template <typename T>
__global__ void affine_kernel(const T* __restrict__ theta, int64_t B, int64_t hin, int64_t win,
                              int64_t hout, int64_t wout, T* __restrict__ coords) {
  const int64_t total = B * hout * wout;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / (hout * wout), r = t % (hout * wout);
    affine_source<T>(theta + n * 6, r / wout, r % wout, hin, win, hout, wout, coords + 2 * t,
                     coords + 2 * t + 1);
  }
}

}  // namespace

cudaError_t flow_correspondence(const void* flow_fw, const void* flow_bw, DType acc,
                                const FlowArgs& a, void* coords, bool* valid, cudaStream_t stream) {
  if (a.B * a.H * a.W == 0) return cudaSuccess;
  if (acc == DType::kFloat64) {
    flow_kernel<double><<<grid_for(a.B * a.H * a.W), kThreads, 0, stream>>>(
        static_cast<const double*>(flow_fw), static_cast<const double*>(flow_bw), a,
        static_cast<double*>(coords), valid);
  } else {
    flow_kernel<float><<<grid_for(a.B * a.H * a.W), kThreads, 0, stream>>>(
        static_cast<const float*>(flow_fw), static_cast<const float*>(flow_bw), a,
        static_cast<float*>(coords), valid);
  }
  return cudaGetLastError();
}

cudaError_t affine_correspondence(const void* theta, DType acc, int64_t B, int64_t hin,
                                  int64_t win, int64_t hout, int64_t wout, void* coords,
                                  cudaStream_t stream) {
  if (B * hout * wout == 0) return cudaSuccess;
  if (acc == DType::kFloat64) {
    affine_kernel<double><<<grid_for(B * hout * wout), kThreads, 0, stream>>>(
        static_cast<const double*>(theta), B, hin, win, hout, wout, static_cast<double*>(coords));
  } else {
    affine_kernel<float><<<grid_for(B * hout * wout), kThreads, 0, stream>>>(
        static_cast<const float*>(theta), B, hin, win, hout, wout, static_cast<float*>(coords));
  }
  return cudaGetLastError();
}

}  // namespace pyssl::cuda
