// Optical-flow pixel correspondence and affine correspondence: schemas and CPU kernels.
// Contracts: pyssl/ops/flow.py.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/sample_dense.h"
#include "kernels/flow_math.h"
#include "ops/flow.h"
#include "ops/quad.h"

namespace pyssl::flow {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> flow_correspondence_cpu(const Tensor& flow_fw,
                                                   const std::optional<Tensor>& flow_bw,
                                                   double alpha1, double alpha2) {
  check_flow(flow_fw, flow_bw, alpha1, alpha2);
  const int64_t B = flow_fw.size(0), H = flow_fw.size(2), W = flow_fw.size(3);
  const auto acc = flow_acc(flow_fw);
  const Tensor fw = flow_fw.to(acc);
  const Tensor bw = flow_bw.has_value() ? flow_bw->to(acc) : Tensor();
  Tensor coords = empty_large({B, H, W, 2}, fw.options());
  Tensor valid = at::empty({B, H, W}, fw.options().dtype(at::kBool));
  if (acc == at::kFloat && H * W < (int64_t{1} << 31)) {
    // float32: rows through the vectorised kernel (csrc/cpu/sample_dense.cpp, flow_row), which
    // computes what flow_match computes, in the same order; the backward flow is read
    // interleaved (pair_pack), a target's 4 corners as 4 reads of (bu, bv)
    const Tensor f = fw.contiguous(), b = bw.defined() ? bw.contiguous() : bw;
    const float* fp = f.const_data_ptr<float>();
    float* cp = coords.mutable_data_ptr<float>();
    bool* vp = valid.mutable_data_ptr<bool>();
    const int64_t HW = H * W;
    ScratchPool::Lease q = quad_image_pool().lend(b.defined() ? B * HW * 2 : 0);
    const float* qp = b.defined() ? q.data() : nullptr;
    if (b.defined()) {
      const float* bp = b.const_data_ptr<float>();
      float* pairs = q.data();
      at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
        for (int64_t bi = begin; bi < end; ++bi) {
          const int64_t n = bi / H, r = bi % H;
          cpu::pair_pack(bp + n * 2 * HW, HW, r * W, (r + 1) * W, pairs + n * 2 * HW);
        }
      });
    }
    at::parallel_for(0, B * H, 8, [&](int64_t begin, int64_t end) {
      scratch_vector<int32_t> index(4 * W);
      scratch_vector<float> weight(4 * W);
      const cpu::DenseTaps taps{index.data(), weight.data(), nullptr, nullptr};
      for (int64_t bi = begin; bi < end; ++bi) {
        const int64_t n = bi / H, i = bi % H;
        const float* u = fp + n * 2 * HW + i * W;
        cpu::flow_row(u, u + HW, qp ? qp + n * 2 * HW : nullptr, i, W, H,
                      static_cast<float>(alpha1), static_cast<float>(alpha2), taps, cp + bi * W * 2,
                      vp + bi * W);
      }
    });
    return {coords, valid};
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "flow_correspondence", [&] {
    using T = scalar_t;
    const T* f = fw.const_data_ptr<T>();
    const T* b = bw.defined() ? bw.const_data_ptr<T>() : nullptr;
    const auto fs = fw.strides();
    const auto bs = bw.defined() ? bw.strides() : fw.strides();
    T* c = coords.mutable_data_ptr<T>();
    bool* v = valid.mutable_data_ptr<bool>();
    at::parallel_for(0, B * H, 8, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const int64_t n = bi / H, i = bi % H;
        const T* fn = f + n * fs[0] + i * fs[2];
        const T* bn = b ? b + n * bs[0] : nullptr;
        for (int64_t j = 0; j < W; ++j) {
          const T u = fn[j * fs[3]], vv = fn[fs[1] + j * fs[3]];
          const FlowMatch<T> r = flow_match<T, T>(i, j, u, vv, bn, bs[1], bs[2], bs[3], H, W,
                                                  static_cast<T>(alpha1), static_cast<T>(alpha2));
          const int64_t o = bi * W + j;
          c[2 * o] = r.x;
          c[2 * o + 1] = r.y;
          v[o] = r.valid;
        }
      }
    });
  });
  return {coords, valid};
}

Tensor affine_correspondence_cpu(const Tensor& theta, int64_t hin, int64_t win, int64_t hout,
                                 int64_t wout) {
  check_affine(theta, hin, win, hout, wout);
  const int64_t B = theta.size(0);
  const Tensor th = theta.to(flow_acc(theta)).contiguous();
  Tensor coords = empty_large({B, hout, wout, 2}, th.options());
  AT_DISPATCH_FLOATING_TYPES(th.scalar_type(), "affine_correspondence", [&] {
    const scalar_t* t = th.const_data_ptr<scalar_t>();
    scalar_t* c = coords.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * hout, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const int64_t n = bi / hout, i = bi % hout;
        for (int64_t j = 0; j < wout; ++j)
          affine_source<scalar_t>(t + n * 6, i, j, hin, win, hout, wout, c + (bi * wout + j) * 2,
                                  c + (bi * wout + j) * 2 + 1);
      }
    });
  });
  return coords;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyssl, m) {
  m.def("flow_correspondence(Tensor flow_fw, Tensor? flow_bw, float alpha1, float alpha2) -> (Tensor coords, Tensor valid)");
  m.def("affine_correspondence(Tensor theta, int height_in, int width_in, int height_out, int width_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("flow_correspondence", &flow_correspondence_cpu);
  m.impl("affine_correspondence", &affine_correspondence_cpu);
}

}  // namespace pyssl::flow
