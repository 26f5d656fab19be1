// Launchers of the DINO-loss CUDA kernels (csrc/kernels/dino_loss.cu). Torch-free.
// Inputs student [S*B, K] and teacher [T*B, K] share one dtype; acc is float (double for
// fp64): center, weights, the statistics and the outputs are acc.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/common.h"

namespace pyssl::cuda {

struct DinoArgs {
  int64_t B, S, T, K, n_terms;
  double inv_student_temp, inv_teacher_temp;
  bool skip_same_view;
};

// Workspace (acc elements) the forward needs: dino_forward_workspace(args).
int64_t dino_forward_workspace(const DinoArgs& a);

// loss (scalar), teacher_mean [K], student_lse [S*B], teacher_lse [T*B]; weights [B] or null.
cudaError_t dino_forward(const void* student, const void* teacher, DType dtype,
                         const void* center, const void* weights, const DinoArgs& a,
                         void* workspace, void* loss, void* teacher_mean, void* student_lse,
                         void* teacher_lse, cudaStream_t stream);

// grad_student [S*B, K] (input dtype) from the scalar grad_loss (acc, on the device).
cudaError_t dino_backward(const void* grad_loss, const void* student, const void* teacher,
                          DType dtype, const void* center, const void* weights,
                          const void* student_lse, const void* teacher_lse, const DinoArgs& a,
                          void* grad_student, cudaStream_t stream);

// out = logsumexp over `dim` of x * scale - row_offset[:, None] - col_offset[None, :]
// (offsets acc or null); x [R, K].
cudaError_t offset_logsumexp(const void* x, DType dtype, int64_t R, int64_t K,
                             const void* row_offset, const void* col_offset, double scale,
                             int dim, void* out, cudaStream_t stream);

}  // namespace pyssl::cuda
