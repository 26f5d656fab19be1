// CUDA glue for the patch-masking ops: checks (shared with the CPU side), allocation, and
// launches of the torch-free kernels in csrc/kernels/masking.cu on the current stream.
#include <cmath>

#include "kernels/masking.h"
#include "ops/cuda_utils.h"
#include "ops/masking.h"

namespace pyssl::masking {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> random_masking_cuda(const Tensor& x,
                                                               const Tensor& noise,
                                                               int64_t len_keep) {
  check_random_masking(x, noise, len_keep);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2), K = len_keep;
  // The short-row path runs a block per sample, in a grid of at most 2^31 - 1 blocks.
  TORCH_CHECK_VALUE(N < int64_t{1} << 31, "x: the CUDA kernel takes at most 2^31 - 1 samples, "
                    "got N=", N);
  const Tensor xc = x.contiguous();
  const Tensor nc = noise.contiguous();
  auto long_opts = x.options().dtype(at::kLong);
  Tensor ids_keep = at::empty({N, K}, long_opts);
  Tensor ids_restore = at::empty({N, L}, long_opts);
  Tensor mask = at::empty({N, L}, x.options().dtype(at::kBool));
  Tensor visible = at::empty({N, K, D}, x.options());
  const cudaStream_t stream = current_stream();
  const DType nd = to_dtype(nc.scalar_type());
  if (L <= cuda::random_masking_ranks_max_length(nd)) {
    PYSSL_CUDA_CHECK(cuda::random_masking_ranks(nc.const_data_ptr(), nd, N, L, K,
                                                ids_keep.mutable_data_ptr<int64_t>(),
                                                ids_restore.mutable_data_ptr<int64_t>(),
                                                mask.mutable_data_ptr<bool>(), stream));
  } else {
    // Sort integer keys, not the floats: torch's device sort orders NaNs by their sign bit and
    // does not tie -0.0 with +0.0, the CPU path does. All four arguments are spelled out:
    // sort(t, true, 1) would pick the overload sort(t, dim=1, descending=true).
    Tensor keys = at::empty({N, L}, long_opts);
    PYSSL_CUDA_CHECK(cuda::masking_sort_keys(nc.const_data_ptr(), nd, N * L,
                                             keys.mutable_data_ptr<int64_t>(), stream));
    const Tensor shuffle = std::get<1>(
        at::sort(keys, std::optional<bool>(true), /*dim=*/1, /*descending=*/false));
    PYSSL_CUDA_CHECK(cuda::masking_from_shuffle(shuffle.const_data_ptr<int64_t>(), N, L, K,
                                                ids_keep.mutable_data_ptr<int64_t>(),
                                                ids_restore.mutable_data_ptr<int64_t>(),
                                                mask.mutable_data_ptr<bool>(), stream));
  }
  PYSSL_CUDA_CHECK(cuda::gather_rows(xc.const_data_ptr(), ids_keep.const_data_ptr<int64_t>(),
                                     nullptr, visible.mutable_data_ptr(), N, K, L, L,
                                     D * x.element_size(), stream));
  return {visible, mask, ids_keep, ids_restore};
}

// Validates on the device, then reads one flag back (one host sync; skipped with validate=False).
void check_permutation_cuda(const Tensor& ids, const char* name) {
  const int64_t N = ids.size(0), L = ids.size(1);
  Tensor counts = at::zeros({N, L}, ids.options().dtype(at::kInt));
  Tensor flag = at::zeros({1}, ids.options().dtype(at::kInt));
  PYSSL_CUDA_CHECK(cuda::check_permutation(ids.const_data_ptr<int64_t>(), N, L,
                                           counts.mutable_data_ptr<int32_t>(),
                                           flag.mutable_data_ptr<int32_t>(), current_stream()));
  const int f = flag.item<int>();
  TORCH_CHECK_VALUE(!(f & 1), name, " must hold a permutation of 0..L-1 (L=", L,
                    ") in every row; found values out of range");
  TORCH_CHECK_VALUE(!(f & 2), name, " must hold a permutation of 0..L-1 (L=", L,
                    ") in every row; found repeated values");
}

Tensor unshuffle_tokens_cuda(const Tensor& visible, const Tensor& ids_restore,
                             const Tensor& mask_token, bool validate) {
  check_unshuffle(visible, ids_restore, mask_token);
  const c10::cuda::CUDAGuard guard(visible.device());
  const int64_t N = visible.size(0), K = visible.size(1), D = visible.size(2);
  const int64_t L = ids_restore.size(1);
  const Tensor ids = ids_restore.contiguous();
  if (validate) check_permutation_cuda(ids, "ids_restore");
  const Tensor vis = visible.contiguous();
  const Tensor tok = mask_token.contiguous();
  Tensor out = at::empty({N, L, D}, visible.options());
  PYSSL_CUDA_CHECK(cuda::gather_rows(vis.const_data_ptr(), ids.const_data_ptr<int64_t>(),
                                     tok.const_data_ptr(), out.mutable_data_ptr(), N, L, K, K,
                                     D * visible.element_size(), current_stream()));
  return out;
}

std::tuple<Tensor, Tensor> unshuffle_tokens_backward_cuda(const Tensor& grad_output,
                                                          const Tensor& ids_restore,
                                                          int64_t num_visible,
                                                          bool mask_token_grad) {
  check_unshuffle_backward(grad_output, ids_restore, num_visible);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const int64_t N = grad_output.size(0), L = grad_output.size(1), D = grad_output.size(2);
  const int64_t K = num_visible;
  const Tensor g = grad_output.contiguous();
  const Tensor ids = ids_restore.contiguous();
  const cudaStream_t stream = current_stream();
  Tensor inverse = at::full({N, K}, -1, ids.options());
  PYSSL_CUDA_CHECK(cuda::invert_permutation_prefix(ids.const_data_ptr<int64_t>(), N, L, K,
                                                   inverse.mutable_data_ptr<int64_t>(), stream));
  Tensor grad_visible = at::empty({N, K, D}, g.options());
  PYSSL_CUDA_CHECK(cuda::gather_rows(g.const_data_ptr(), inverse.const_data_ptr<int64_t>(),
                                     nullptr, grad_visible.mutable_data_ptr(), N, K, L, L,
                                     D * g.element_size(), stream));
  Tensor grad_token = at::empty({mask_token_grad ? D : 0}, g.options());
  if (mask_token_grad && D > 0) {
    const int64_t chunks = cuda::masked_row_sum_chunks(N * L);
    const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor partial = at::empty({chunks, D}, g.options().dtype(acc));
    PYSSL_CUDA_CHECK(cuda::masked_row_sum(g.const_data_ptr(), to_dtype(g.scalar_type()),
                                          ids.const_data_ptr<int64_t>(), N * L, D, K,
                                          partial.mutable_data_ptr(),
                                          grad_token.mutable_data_ptr(), stream));
  }
  return {grad_visible, grad_token};
}

Tensor block_masking_cuda(const Tensor& seeds, int64_t height, int64_t width,
                          int64_t num_masking_patches, int64_t min_num_patches,
                          int64_t max_num_patches, double min_aspect, double max_aspect,
                          bool exact) {
  const BlockMaskParams params =
      block_mask_params(seeds, height, width, num_masking_patches, min_num_patches,
                        max_num_patches, min_aspect, max_aspect, exact);
  const c10::cuda::CUDAGuard guard(seeds.device());
  const int64_t N = seeds.size(0);
  Tensor out = at::zeros({N, height, width}, seeds.options().dtype(at::kBool));
  // The top-up shuffle (exact=True) is the only user of the per-sample scratch.
  Tensor scratch = at::empty({exact ? N : 0, height * width}, seeds.options().dtype(at::kInt));
  const Tensor sc = seeds.contiguous();
  PYSSL_CUDA_CHECK(cuda::block_masking(sc.const_data_ptr<int64_t>(), N, params,
                                       out.mutable_data_ptr<bool>(),
                                       exact ? scratch.mutable_data_ptr<int32_t>() : nullptr,
                                       current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CUDA, m) {
  m.impl("random_masking", &random_masking_cuda);
  m.impl("unshuffle_tokens", &unshuffle_tokens_cuda);
  m.impl("unshuffle_tokens_backward", &unshuffle_tokens_backward_cuda);
  m.impl("block_masking", &block_masking_cuda);
}

}  // namespace pyssl::masking
