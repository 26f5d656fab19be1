// Point sampling of image features: schema and CPU kernels. See csrc/ops/sampling.h.
//
// The backward into the features is a scatter-add. On the CPU it is always deterministic
// without atomics: tasks own fixed 16-channel slices of a channels-last accumulation buffer
// and visit the points in order.
#include <ATen/Parallel.h>

#include <algorithm>

#include "ops/sampling.h"

namespace pyssl::sampling {
namespace {

using at::Tensor;

constexpr int64_t kChannelSlice = 16;

void check_image_index_cpu(const std::optional<Tensor>& image_index, int64_t N) {
  if (!image_index.has_value()) return;
  const Tensor idx = image_index->contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t m = 0; m < idx.numel(); ++m)
    TORCH_CHECK_VALUE(p[m] >= 0 && p[m] < N, "image_index[", m, "] = ", p[m],
                      " is out of range for ", N, " images");
}

struct Prepared {
  Tensor features, xy, index;
};

Prepared prepare(const Tensor& features, const std::optional<Tensor>& image_index,
                 const Tensor& xy) {
  const auto acc = sample_acc(features, xy);
  Prepared p;
  p.features = (acc == at::kDouble && features.scalar_type() != at::kDouble) ? features.to(acc) : features;
  p.xy = xy.to(acc).contiguous();
  if (image_index.has_value()) p.index = image_index->contiguous();
  return p;
}

template <typename F>
void forward_impl(const Prepared& p, const SampleShape& s, int64_t mode, Tensor& out) {
  using A = at::opmath_type<F>;
  const F* f = p.features.const_data_ptr<F>();
  const auto st = p.features.strides();
  const int64_t sN = st[0], sD = st[1], sH = st[2], sW = st[3];
  const A* xy = p.xy.const_data_ptr<A>();
  const int64_t* idx = p.index.defined() ? p.index.const_data_ptr<int64_t>() : nullptr;
  F* o = out.mutable_data_ptr<F>();
  at::parallel_for(0, s.M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = idx ? idx[m] : m / s.per_image;
      const Taps<A> t = sample_taps<A>(xy[2 * m], xy[2 * m + 1], s.H, s.W, static_cast<int>(mode));
      int64_t po[4];
      for (int c = 0; c < 4; ++c)
        po[c] = t.offset[c] < 0 ? -1 : (t.offset[c] / s.W) * sH + (t.offset[c] % s.W) * sW;
      const F* base = f + n * sN;
      F* row = o + m * s.D;
      for (int64_t d = 0; d < s.D; ++d) {
        A acc = 0;
        for (int c = 0; c < 4; ++c)
          if (po[c] >= 0) acc += t.weight[c] * static_cast<A>(base[d * sD + po[c]]);
        row[d] = static_cast<F>(acc);
      }
    }
  });
}

Tensor sample_points_cpu(const Tensor& features, const std::optional<Tensor>& image_index,
                         const Tensor& xy, int64_t mode) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  check_image_index_cpu(image_index, s.N);
  const Prepared p = prepare(features, image_index, xy);
  Tensor out = at::empty({s.M, s.D}, p.features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features.scalar_type(), "sample_points",
                                  [&] { forward_impl<scalar_t>(p, s, mode, out); });
  return out.scalar_type() == features.scalar_type() ? out : out.to(features.scalar_type());
}

template <typename F>
void backward_impl(const Tensor& grad, const Prepared& p, const SampleShape& s, int64_t mode,
                   bool need_features, bool need_xy, Tensor& gacc, Tensor& gxy) {
  using A = at::opmath_type<F>;
  const A* xy = p.xy.const_data_ptr<A>();
  const int64_t* idx = p.index.defined() ? p.index.const_data_ptr<int64_t>() : nullptr;
  const F* g = grad.const_data_ptr<F>();
  const int64_t HW = s.H * s.W;
  if (need_features) {
    A* acc = gacc.mutable_data_ptr<A>();  // [N, H, W, D], channels last
    const int64_t slices = (s.D + kChannelSlice - 1) / kChannelSlice;
    at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
      for (int64_t sl = begin; sl < end; ++sl) {
        const int64_t d0 = sl * kChannelSlice, d1 = std::min(s.D, d0 + kChannelSlice);
        for (int64_t m = 0; m < s.M; ++m) {
          const int64_t n = idx ? idx[m] : m / s.per_image;
          const Taps<A> t = sample_taps<A>(xy[2 * m], xy[2 * m + 1], s.H, s.W, static_cast<int>(mode));
          const F* gm = g + m * s.D;
          for (int c = 0; c < 4; ++c) {
            if (t.offset[c] < 0) continue;
            A* dst = acc + (n * HW + t.offset[c]) * s.D;
            const A w = t.weight[c];
            for (int64_t d = d0; d < d1; ++d) dst[d] += w * static_cast<A>(gm[d]);
          }
        }
      }
    });
  }
  if (need_xy && mode == kBilinear) {
    const F* f = p.features.const_data_ptr<F>();
    const auto st = p.features.strides();
    const int64_t sN = st[0], sD = st[1], sH = st[2], sW = st[3];
    A* gout = gxy.mutable_data_ptr<A>();
    at::parallel_for(0, s.M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const int64_t n = idx ? idx[m] : m / s.per_image;
        const Taps<A> t = sample_taps<A>(xy[2 * m], xy[2 * m + 1], s.H, s.W, kBilinear);
        int64_t po[4];
        for (int c = 0; c < 4; ++c)
          po[c] = t.offset[c] < 0 ? -1 : (t.offset[c] / s.W) * sH + (t.offset[c] % s.W) * sW;
        const F* base = f + n * sN;
        const F* gm = g + m * s.D;
        A gx = 0, gy = 0;
        for (int64_t d = 0; d < s.D; ++d) {
          A sx = 0, sy = 0;
          for (int c = 0; c < 4; ++c) {
            if (po[c] < 0) continue;
            const A v = static_cast<A>(base[d * sD + po[c]]);
            sx += t.dwdx[c] * v;
            sy += t.dwdy[c] * v;
          }
          const A gd = static_cast<A>(gm[d]);
          gx += gd * sx;
          gy += gd * sy;
        }
        gout[2 * m] = gx;
        gout[2 * m + 1] = gy;
      }
    });
  }
}

std::tuple<Tensor, Tensor> sample_points_backward_cpu(
    const Tensor& grad, const Tensor& features, const std::optional<Tensor>& image_index,
    const Tensor& xy, int64_t mode, bool features_grad, bool xy_grad, bool deterministic) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == s.M && grad.size(1) == s.D,
                    "grad must have shape [M, D] = [", s.M, ", ", s.D, "], got ", grad.sizes());
  check_image_index_cpu(image_index, s.N);
  const Prepared p = prepare(features, image_index, xy);
  const Tensor g = grad.to(p.features.scalar_type()).contiguous();
  Tensor gacc = features_grad ? at::zeros({s.N, s.H, s.W, s.D}, p.xy.options())
                              : at::empty({0}, p.xy.options());
  Tensor gxy = xy_grad ? at::zeros({s.M, 2}, p.xy.options()) : at::empty({0}, p.xy.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features.scalar_type(),
                                  "sample_points_backward", [&] {
    backward_impl<scalar_t>(g, p, s, mode, features_grad, xy_grad, gacc, gxy);
  });
  Tensor gf = features_grad ? gacc.permute({0, 3, 1, 2}).to(features.scalar_type())
                            : at::empty({0}, features.options());
  return {gf, xy_grad ? gxy.to(xy.scalar_type()) : at::empty({0}, xy.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyssl, m) {
  m.def("sample_points(Tensor features, Tensor? image_index, Tensor xy, int mode) -> Tensor");
  m.def("sample_points_backward(Tensor grad, Tensor features, Tensor? image_index, Tensor xy, int mode, bool features_grad, bool xy_grad, bool deterministic) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("sample_points", &sample_points_cpu);
  m.impl("sample_points_backward", &sample_points_backward_cpu);
}

}  // namespace pyssl::sampling
