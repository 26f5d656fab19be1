// Patch masking (MAE random masking, MAE's decoder restore, BEiT block masking):
// schemas and CPU kernels. The contracts are in pyssl/ops/masking.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>
#include <vector>

#include "kernels/block_masking.h"
#include "ops/masking.h"

namespace pyssl::masking {
namespace {

using at::Tensor;

// out[n, r] = src[n, idx[n, r]] when 0 <= idx[n, r] < threshold, else `fill` (zeros when null).
// Rows are copied as bytes, so every dtype works.
void gather_rows_cpu(const Tensor& src, const Tensor& idx, int64_t threshold, const Tensor* fill,
                     Tensor& out) {
  const int64_t N = out.size(0), R = out.size(1);
  const int64_t Ls = src.size(1);
  const int64_t row_bytes = out.size(2) * out.element_size();
  const auto* s = static_cast<const char*>(src.const_data_ptr());
  const auto* f = fill ? static_cast<const char*>(fill->const_data_ptr()) : nullptr;
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  auto* o = static_cast<char*>(out.mutable_data_ptr());
  if (row_bytes == 0) return;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / row_bytes);
  at::parallel_for(0, N * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / R;
      const int64_t i = ix[r];
      char* dst = o + r * row_bytes;
      if (i >= 0 && i < threshold) {
        std::memcpy(dst, s + (n * Ls + i) * row_bytes, row_bytes);
      } else if (f) {
        std::memcpy(dst, f, row_bytes);
      } else {
        std::memset(dst, 0, row_bytes);
      }
    }
  });
}

// Stable ascending order of each row of `noise` (NaN last, -0.0 == +0.0), as
// torch.argsort(noise, dim=1, stable=True); fills ids_keep, ids_restore and mask.
template <typename scalar_t>
void masking_ranks_cpu(const Tensor& noise, int64_t K, Tensor& ids_keep, Tensor& ids_restore,
                       Tensor& mask) {
  using key_math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using key_t = decltype(ordered_key(key_math_t{}));
  const int64_t N = noise.size(0), L = noise.size(1);
  const scalar_t* nz = noise.const_data_ptr<scalar_t>();
  int64_t* keep = ids_keep.mutable_data_ptr<int64_t>();
  int64_t* restore = ids_restore.mutable_data_ptr<int64_t>();
  bool* m = mask.mutable_data_ptr<bool>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    scratch_vector<std::pair<key_t, int64_t>> order(L);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = nz + n * L;
      for (int64_t l = 0; l < L; ++l)
        order[l] = {ordered_key(static_cast<key_math_t>(row[l])), l};
      // (key, index) pairs are unique, so an unstable sort gives the stable order.
      std::sort(order.begin(), order.end());
      for (int64_t r = 0; r < L; ++r) {
        const int64_t l = order[r].second;
        restore[n * L + l] = r;
        m[n * L + l] = r >= K;
        if (r < K) keep[n * K + r] = l;
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> random_masking_cpu(const Tensor& x,
                                                              const Tensor& noise,
                                                              int64_t len_keep) {
  check_random_masking(x, noise, len_keep);
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2), K = len_keep;
  const Tensor xc = x.contiguous();
  const Tensor nc = noise.contiguous();
  auto long_opts = x.options().dtype(at::kLong);
  Tensor ids_keep = at::empty({N, K}, long_opts);
  Tensor ids_restore = at::empty({N, L}, long_opts);
  Tensor mask = at::empty({N, L}, x.options().dtype(at::kBool));
  Tensor visible = empty_large({N, K, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, nc.scalar_type(), "random_masking",
                                  [&] { masking_ranks_cpu<scalar_t>(nc, K, ids_keep, ids_restore, mask); });
  gather_rows_cpu(xc, ids_keep, L, nullptr, visible);
  return {visible, mask, ids_keep, ids_restore};
}

// Each row of ids must be a permutation of [0, L): raises a ValueError naming `name` otherwise.
void check_permutation_cpu(const Tensor& ids, const char* name) {
  const int64_t N = ids.size(0), L = ids.size(1);
  const int64_t* p = ids.const_data_ptr<int64_t>();
  scratch_vector<uint8_t> seen(L);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t v = p[n * L + l];
      TORCH_CHECK_VALUE(v >= 0 && v < L, name, " must hold a permutation of 0..L-1 (L=", L,
                        ") in every row; row ", n, " holds ", v, " (out of range)");
      TORCH_CHECK_VALUE(!seen[v], name, " must hold a permutation of 0..L-1 (L=", L,
                        ") in every row; row ", n, " repeats ", v);
      seen[v] = 1;
    }
  }
}

Tensor unshuffle_tokens_cpu(const Tensor& visible, const Tensor& ids_restore,
                            const Tensor& mask_token, bool validate) {
  check_unshuffle(visible, ids_restore, mask_token);
  const int64_t N = visible.size(0), K = visible.size(1), D = visible.size(2);
  const int64_t L = ids_restore.size(1);
  const Tensor ids = ids_restore.contiguous();
  if (validate) check_permutation_cpu(ids, "ids_restore");
  const Tensor vis = visible.contiguous();
  const Tensor tok = mask_token.contiguous();
  Tensor out = empty_large({N, L, D}, visible.options());
  gather_rows_cpu(vis, ids, K, &tok, out);
  return out;
}

// sum over rows r (in order) with ids[r] outside [0, K) (where the forward wrote mask_token) of
// grad[r, :], accumulated in acc_t, using a fixed partition of the rows (independent of the
// thread count) so results are bitwise repeatable.
template <typename scalar_t>
void masked_row_sum_cpu(const Tensor& grad, const Tensor& ids, int64_t K, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kChunk = 256;
  const int64_t rows = grad.size(0) * grad.size(1), D = grad.size(2);
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t* ix = ids.const_data_ptr<int64_t>();
  scratch_vector<acc_t> partial(static_cast<size_t>(chunks * D), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t* acc = partial.data() + c * D;
      const int64_t r1 = std::min(rows, (c + 1) * kChunk);
      for (int64_t r = c * kChunk; r < r1; ++r) {
        if (ix[r] >= 0 && ix[r] < K) continue;
        const scalar_t* gr = g + r * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(gr[d]);
      }
    }
  });
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, D, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[c * D + d];
      o[d] = static_cast<scalar_t>(s);
    }
  });
}

std::tuple<Tensor, Tensor> unshuffle_tokens_backward_cpu(const Tensor& grad_output,
                                                         const Tensor& ids_restore,
                                                         int64_t num_visible,
                                                         bool mask_token_grad) {
  check_unshuffle_backward(grad_output, ids_restore, num_visible);
  const int64_t N = grad_output.size(0), L = grad_output.size(1), D = grad_output.size(2);
  const int64_t K = num_visible;
  const Tensor g = grad_output.contiguous();
  const Tensor ids = ids_restore.contiguous();
  // inverse[n, k] = l with ids[n, l] == k (ids rows are permutations); -1 where absent.
  Tensor inverse = at::full({N, K}, -1, ids.options());
  {
    const int64_t* p = ids.const_data_ptr<int64_t>();
    int64_t* inv = inverse.mutable_data_ptr<int64_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t l = 0; l < L; ++l) {
          const int64_t v = p[n * L + l];
          if (v >= 0 && v < K) inv[n * K + v] = l;
        }
    });
  }
  Tensor grad_visible = empty_large({N, K, D}, g.options());
  gather_rows_cpu(g, inverse, L, nullptr, grad_visible);
  Tensor grad_token = at::empty({mask_token_grad ? D : 0}, g.options());
  if (mask_token_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                    "unshuffle_tokens_backward",
                                    [&] { masked_row_sum_cpu<scalar_t>(g, ids, K, grad_token); });
  }
  return {grad_visible, grad_token};
}

Tensor block_masking_cpu(const Tensor& seeds, int64_t height, int64_t width,
                         int64_t num_masking_patches, int64_t min_num_patches,
                         int64_t max_num_patches, double min_aspect, double max_aspect,
                         bool exact) {
  const BlockMaskParams params =
      block_mask_params(seeds, height, width, num_masking_patches, min_num_patches,
                        max_num_patches, min_aspect, max_aspect, exact);
  const int64_t N = seeds.size(0);
  Tensor out = at::zeros({N, height, width}, seeds.options().dtype(at::kBool));
  const Tensor sc = seeds.contiguous();
  const int64_t* s = sc.const_data_ptr<int64_t>();
  bool* o = out.mutable_data_ptr<bool>();
  const int64_t HW = height * width;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    scratch_vector<int32_t> scratch(static_cast<size_t>(HW));
    for (int64_t n = begin; n < end; ++n)
      block_mask_sample(static_cast<uint64_t>(s[n]), params, o + n * HW, scratch.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyssl, m) {
  m.def("random_masking(Tensor x, Tensor noise, int len_keep) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("unshuffle_tokens(Tensor visible, Tensor ids_restore, Tensor mask_token, bool validate=True) -> Tensor");
  m.def("unshuffle_tokens_backward(Tensor grad_output, Tensor ids_restore, int num_visible, bool mask_token_grad) -> (Tensor, Tensor)");
  m.def("block_masking(Tensor seeds, int height, int width, int num_masking_patches, int min_num_patches, int max_num_patches, float min_aspect, float max_aspect, bool exact) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("unshuffle_tokens", &unshuffle_tokens_cpu);
  m.impl("unshuffle_tokens_backward", &unshuffle_tokens_backward_cpu);
  m.impl("block_masking", &block_masking_cpu);
}

}  // namespace pyssl::masking
