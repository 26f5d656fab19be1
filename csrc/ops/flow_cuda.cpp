// CUDA glue for the flow-correspondence ops.
#include "kernels/flow.h"
#include "ops/cuda_utils.h"
#include "ops/flow.h"

namespace pyssl::flow {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> flow_correspondence_cuda(const Tensor& flow_fw,
                                                    const std::optional<Tensor>& flow_bw,
                                                    double alpha1, double alpha2) {
  check_flow(flow_fw, flow_bw, alpha1, alpha2);
  const c10::cuda::CUDAGuard guard(flow_fw.device());
  const int64_t B = flow_fw.size(0), H = flow_fw.size(2), W = flow_fw.size(3);
  const auto acc = flow_acc(flow_fw);
  const Tensor fw = flow_fw.to(acc);
  const Tensor bw = flow_bw.has_value() ? flow_bw->to(acc) : Tensor();
  cuda::FlowArgs a{B, H, W, {}, {}, alpha1, alpha2};
  for (int k = 0; k < 4; ++k) {
    a.fs[k] = fw.stride(k);
    a.bs[k] = bw.defined() ? bw.stride(k) : 0;
  }
  Tensor coords = at::empty({B, H, W, 2}, fw.options());
  Tensor valid = at::empty({B, H, W}, fw.options().dtype(at::kBool));
  PYSSL_CUDA_CHECK(cuda::flow_correspondence(fw.const_data_ptr(), bw.defined() ? bw.const_data_ptr() : nullptr,
                                             to_dtype(acc), a, coords.mutable_data_ptr(),
                                             valid.mutable_data_ptr<bool>(), current_stream()));
  return {coords, valid};
}

Tensor affine_correspondence_cuda(const Tensor& theta, int64_t hin, int64_t win, int64_t hout,
                                  int64_t wout) {
  check_affine(theta, hin, win, hout, wout);
  const c10::cuda::CUDAGuard guard(theta.device());
  const Tensor th = theta.to(flow_acc(theta)).contiguous();
  Tensor coords = at::empty({theta.size(0), hout, wout, 2}, th.options());
  PYSSL_CUDA_CHECK(cuda::affine_correspondence(th.const_data_ptr(), to_dtype(th.scalar_type()),
                                               theta.size(0), hin, win, hout, wout,
                                               coords.mutable_data_ptr(), current_stream()));
  return coords;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CUDA, m) {
  m.impl("flow_correspondence", &flow_correspondence_cuda);
  m.impl("affine_correspondence", &affine_correspondence_cuda);
}

}  // namespace pyssl::flow
