// Launchers of the flow-correspondence CUDA kernels (csrc/kernels/flow.cu). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/common.h"

namespace pyssl::cuda {

struct FlowArgs {
  int64_t B, H, W;
  int64_t fs[4];  // flow_fw strides
  int64_t bs[4];  // flow_bw strides
  double alpha1, alpha2;
};

// flows in acc dtype (float or double); coords [B, H, W, 2] acc, valid [B, H, W].
cudaError_t flow_correspondence(const void* flow_fw, const void* flow_bw, DType acc,
                                const FlowArgs& a, void* coords, bool* valid, cudaStream_t stream);

// theta [B, 2, 3] acc contiguous -> coords [B, Hout, Wout, 2].
cudaError_t affine_correspondence(const void* theta, DType acc, int64_t B, int64_t hin,
                                  int64_t win, int64_t hout, int64_t wout, void* coords,
                                  cudaStream_t stream);

}  // namespace pyssl::cuda
