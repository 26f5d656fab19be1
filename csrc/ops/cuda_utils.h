// Glue helpers for the CUDA side: current stream, device guard, launch-error checks.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#define PYSSL_CUDA_CHECK(expr)                                                               \
  do {                                                                                       \
    cudaError_t _pyssl_err = (expr);                                                         \
    TORCH_CHECK(_pyssl_err == cudaSuccess, "pyssl CUDA error in ", #expr, ": ",              \
                cudaGetErrorString(_pyssl_err));                                             \
  } while (0)

namespace pyssl {
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
}  // namespace pyssl
