// The emulator's stand-in for csrc/ops/cuda_utils.h: the glue runs on CPU tensors, with no CUDA
// runtime. tests/cuda_emu/build.py puts tests/cuda_emu before csrc on the include path.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdio>

namespace emu {
cudaError_t last_error();
}

#define PYSSL_CUDA_CHECK(expr)                                                               \
  do {                                                                                       \
    cudaError_t _pyssl_err = (expr);                                                         \
    if (_pyssl_err == cudaSuccess) _pyssl_err = ::emu::last_error();                         \
    TORCH_CHECK(_pyssl_err == cudaSuccess, "pyssl CUDA error in ", #expr,                    \
                ": emulated launch failure (see stderr), code ", static_cast<int>(_pyssl_err)); \
  } while (0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

namespace pyssl {
inline cudaStream_t current_stream() { return nullptr; }
}  // namespace pyssl
