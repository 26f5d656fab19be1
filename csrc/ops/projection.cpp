// Point-to-pixel projection (LiDAR -> cameras), compacted point-pixel pairs, and segment
// (superpixel) mean pooling: schemas and CPU kernels. Contracts: pyssl/ops/projection.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu/projection.h"
#include "ops/projection.h"

namespace pyssl::projection {
namespace {

using at::Tensor;

using Inputs = ProjInputs;

constexpr int64_t kPointBlock = 1024;

// Projects all points into all cameras: pixels [C, P, 2], depth [C, P], valid [C, P]. Tasks are
// blocks of points: a block's coordinates are copied once into separate x, y, z arrays, which
// every camera then reads with plain vector loads; runs of points of the same scan share
// matrices.
template <typename T>
void project_all(const Inputs& in, const ProjShape& s, double min_depth, double margin,
                 int64_t rounding, T* px, T* dp, bool* vd) {
  const T* pts = in.points.const_data_ptr<T>();
  const T* M = in.M.const_data_ptr<T>();
  const T* K = in.K.const_data_ptr<T>();
  const T* size = in.size.const_data_ptr<T>();
  const int64_t* batch = in.batch.defined() ? in.batch.const_data_ptr<int64_t>() : nullptr;
  const int64_t blocks = (s.P + kPointBlock - 1) / kPointBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    scratch_vector<T> xyz(3 * kPointBlock);
    T *xs = xyz.data(), *ys = xs + kPointBlock, *zs = ys + kPointBlock;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * kPointBlock, p1 = std::min(s.P, p0 + kPointBlock);
      for (int64_t p = p0; p < p1; ++p) {
        xs[p - p0] = pts[p * s.F];
        ys[p - p0] = pts[p * s.F + 1];
        zs[p - p0] = pts[p * s.F + 2];
      }
      for (int64_t p = p0; p < p1;) {
        const int64_t b = batch ? batch[p] : 0;
        int64_t q = p + 1;
        while (batch && q < p1 && batch[q] == b) ++q;
        if (!batch) q = p1;
        for (int64_t c = 0; c < s.C; ++c) {
          const int64_t bc = b * s.C + c;
          cpu::project_block(xs + (p - p0), ys + (p - p0), zs + (p - p0), q - p, M + bc * 16,
                             K + bc * 9, size[bc * 2], size[bc * 2 + 1], static_cast<T>(min_depth),
                             static_cast<T>(margin), static_cast<int>(rounding),
                             px + (c * s.P + p) * 2, dp + c * s.P + p, vd + c * s.P + p);
        }
        p = q;
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> project_points_cpu(const Tensor& points,
                                                      const Tensor& lidar_to_cam,
                                                      const Tensor& intrinsics,
                                                      const Tensor& image_size,
                                                      const std::optional<Tensor>& batch,
                                                      double min_depth, double margin,
                                                      int64_t rounding) {
  const ProjShape s = check_projection(points, lidar_to_cam, intrinsics, image_size, batch, rounding,
                                       margin);
  const Inputs in = prepare_projection(points, lidar_to_cam, intrinsics, image_size, batch, s);
  auto opts = in.points.options();
  Tensor pixels = at::empty({s.C, s.P, 2}, opts), depth = at::empty({s.C, s.P}, opts);
  Tensor valid = at::empty({s.C, s.P}, opts.dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(in.points.scalar_type(), "project_points", [&] {
    project_all<scalar_t>(in, s, min_depth, margin, rounding, pixels.mutable_data_ptr<scalar_t>(),
                          depth.mutable_data_ptr<scalar_t>(), valid.mutable_data_ptr<bool>());
  });
  return {pixels, depth, valid};
}

enum CameraChoice : int { kAll = 0, kFirst = 1, kRandom = 2 };

std::tuple<Tensor, Tensor, Tensor, Tensor> point_pixel_pairs_cpu(
    const Tensor& points, const Tensor& lidar_to_cam, const Tensor& intrinsics,
    const Tensor& image_size, const std::optional<Tensor>& batch, double min_depth, double margin,
    int64_t rounding, int64_t cameras, const std::optional<Tensor>& random) {
  const ProjShape s = check_projection(points, lidar_to_cam, intrinsics, image_size, batch, rounding,
                                       margin);
  TORCH_CHECK_VALUE(rounding != kRoundNone, "point_pixel_pairs needs integer pixels: rounding must be "
                    "'floor' or 'round', got 'none'");
  check_pair_choice(cameras, random, points, s.P);
  const Inputs in = prepare_projection(points, lidar_to_cam, intrinsics, image_size, batch, s);
  const Tensor rnd = cameras == kRandom ? random->to(at::kDouble).contiguous() : Tensor();
  scratch_vector<int64_t> offsets(s.P + 1, 0);
  Tensor point_index, camera_index, row, col;
  AT_DISPATCH_FLOATING_TYPES(in.points.scalar_type(), "point_pixel_pairs", [&] {
    // Project once into temporaries, then compact: count per point, scan, write.
    scratch_vector<scalar_t> px(s.C * s.P * 2), dp(s.C * s.P);
    std::unique_ptr<bool[]> vd(new bool[std::max<int64_t>(1, s.C * s.P)]);
    project_all<scalar_t>(in, s, min_depth, margin, rounding, px.data(), dp.data(), vd.get());
    const bool* valid = vd.get();
    at::parallel_for(0, s.P, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t n = 0;
        for (int64_t c = 0; c < s.C; ++c) n += valid[c * s.P + p] ? 1 : 0;
        offsets[p + 1] = cameras == kAll ? n : std::min<int64_t>(n, 1);
      }
    });
    for (int64_t p = 0; p < s.P; ++p) offsets[p + 1] += offsets[p];
    const int64_t total = offsets[s.P];
    auto lopts = points.options().dtype(at::kLong);
    point_index = at::empty({total}, lopts);
    camera_index = at::empty({total}, lopts);
    row = at::empty({total}, lopts);
    col = at::empty({total}, lopts);
    int64_t* pi = point_index.mutable_data_ptr<int64_t>();
    int64_t* ci = camera_index.mutable_data_ptr<int64_t>();
    int64_t* ri = row.mutable_data_ptr<int64_t>();
    int64_t* co = col.mutable_data_ptr<int64_t>();
    const double* r = rnd.defined() ? rnd.const_data_ptr<double>() : nullptr;
    at::parallel_for(0, s.P, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t o = offsets[p];
        if (offsets[p + 1] == o) continue;
        int64_t pick = 0;  // kRandom: which of the valid cameras
        if (cameras == kRandom) {
          int64_t nvalid = 0;
          for (int64_t c = 0; c < s.C; ++c) nvalid += valid[c * s.P + p] ? 1 : 0;
          if (nvalid > 0) pick = pick_camera(r[p], nvalid);
        }
        int64_t seen = 0;
        for (int64_t c = 0; c < s.C; ++c) {
          if (!valid[c * s.P + p]) continue;
          if (cameras == kAll || (cameras == kFirst && seen == 0) || (cameras == kRandom && seen == pick)) {
            pi[o] = p;
            ci[o] = c;
            co[o] = static_cast<int64_t>(px[(c * s.P + p) * 2]);
            ri[o] = static_cast<int64_t>(px[(c * s.P + p) * 2 + 1]);
            ++o;
            if (cameras != kAll) break;
          }
          ++seen;
        }
      }
    });
  });
  return {point_index, camera_index, row, col};
}

// ---------------------------------------------------------------------------------------------
// segment_mean: deterministic without atomics (tasks own 16-column slices, rows in order).
// ---------------------------------------------------------------------------------------------

constexpr int64_t kSlice = 16;

std::tuple<Tensor, Tensor> segment_mean_cpu(const Tensor& values, const Tensor& segment_ids,
                                            int64_t num_segments, bool deterministic) {
  check_segments(values, segment_ids, num_segments);
  const int64_t N = values.size(0), D = values.size(1), S = num_segments;
  const Tensor ids = segment_ids.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  Tensor counts = at::zeros({S}, ids.options());
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(id[n] >= -1 && id[n] < S, "segment_ids[", n, "] = ", id[n],
                      " is out of range: ids must be in [0, num_segments=", S, ") or -1 (ignored)");
    if (id[n] >= 0) ++cnt[id[n]];
  }
  const Tensor v = values.contiguous();
  Tensor means = at::empty({S, D}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "segment_mean", [&] {
    using A = at::opmath_type<scalar_t>;
    scratch_vector<A> sums(static_cast<size_t>(S * D), A(0));
    const scalar_t* x = v.const_data_ptr<scalar_t>();
    // Every (segment, column) sums its rows in row order whatever the slicing, so the result does
    // not depend on it: use as few column slices as there are threads (each slice reads every
    // row once), but at least 16 columns per slice.
    const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (D + kSlice - 1) / kSlice));
    const int64_t width = (D + slices - 1) / slices;
    at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
      for (int64_t sl = begin; sl < end; ++sl) {
        const int64_t d0 = sl * width, d1 = std::min(D, d0 + width);
        for (int64_t n = 0; n < N; ++n) {
          if (id[n] < 0) continue;
          A* dst = sums.data() + id[n] * D;
          const scalar_t* src = x + n * D;
          for (int64_t d = d0; d < d1; ++d) dst[d] += static_cast<A>(src[d]);
        }
      }
    });
    scalar_t* o = means.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const A inv = cnt[s] > 0 ? A(1) / A(cnt[s]) : A(0);
        for (int64_t d = 0; d < D; ++d) o[s * D + d] = static_cast<scalar_t>(sums[s * D + d] * inv);
      }
    });
  });
  return {means, counts};
}

// grad_values[n] = grad_means[id[n]] / counts[id[n]] (0 for ignored rows): a gather, no atomics.
Tensor segment_mean_backward_cpu(const Tensor& grad_means, const Tensor& segment_ids,
                                 const Tensor& counts) {
  check_segment_mean_backward(grad_means, segment_ids, counts);
  const int64_t N = segment_ids.size(0), D = grad_means.size(1), S = grad_means.size(0);
  const Tensor g = grad_means.contiguous(), ids = segment_ids.contiguous(), cnt = counts.contiguous();
  Tensor out = empty_large({N, D}, g.options());
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t* c = cnt.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "segment_mean_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t sgm = id[n];
        if (sgm < 0 || sgm >= S) {
          for (int64_t d = 0; d < D; ++d) o[n * D + d] = scalar_t(0);
          continue;
        }
        const A inv = A(1) / A(std::max<int64_t>(c[sgm], 1));
        for (int64_t d = 0; d < D; ++d) o[n * D + d] = static_cast<scalar_t>(static_cast<A>(gp[sgm * D + d]) * inv);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyssl, m) {
  m.def("project_points(Tensor points, Tensor lidar_to_cam, Tensor intrinsics, Tensor image_size, Tensor? batch, float min_depth, float margin, int rounding) -> (Tensor pixels, Tensor depth, Tensor valid)");
  m.def("point_pixel_pairs(Tensor points, Tensor lidar_to_cam, Tensor intrinsics, Tensor image_size, Tensor? batch, float min_depth, float margin, int rounding, int cameras, Tensor? random) -> (Tensor point_index, Tensor camera_index, Tensor row, Tensor col)");
  m.def("segment_mean(Tensor values, Tensor segment_ids, int num_segments, bool deterministic) -> (Tensor means, Tensor counts)");
  m.def("segment_mean_backward(Tensor grad_means, Tensor segment_ids, Tensor counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("project_points", &project_points_cpu);
  m.impl("point_pixel_pairs", &point_pixel_pairs_cpu);
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("segment_mean_backward", &segment_mean_backward_cpu);
}

}  // namespace pyssl::projection
