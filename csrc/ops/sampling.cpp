// Point sampling of image features: schema and CPU kernels. See csrc/ops/sampling.h.
//
// The backward into the features is a scatter-add. On the CPU it is always deterministic
// without atomics: tasks own fixed parts of the accumulation buffer (channel slices, or for
// nearest pairs on planar features pixel ranges) and visit the points in a fixed order that
// depends only on the points.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/sample_dense.h"
#include "ops/sampling.h"
#include "ops/quad.h"

namespace pyssl::sampling {
namespace {

using at::Tensor;

constexpr int64_t kChannelSlice = 16;

using Prepared = SamplePrepared;

// Points are processed in blocks of kBlock: their taps are computed once, then, when the
// channel stride is large (NCHW), channel by channel — a channel plane at a time — so the
// accesses do not all alias onto the same cache sets (plane strides are powers of two).
constexpr int kBlock = 64;

template <typename A>
struct TapBlock {
  int64_t count;
  int64_t image[kBlock];
  int64_t pointer[kBlock][4];  // element offset of the tap in its image (-1: outside)
  A w[kBlock][4], dx[kBlock][4], dy[kBlock][4];
};

template <typename A>
void fill_block(TapBlock<A>& b, int64_t m0, int64_t m1, const A* xy, const int64_t* idx,
                const SampleShape& s, int64_t mode, int64_t sH, int64_t sW) {
  b.count = m1 - m0;
  for (int64_t i = 0; i < b.count; ++i) {
    const int64_t m = m0 + i;
    b.image[i] = idx ? idx[m] : m / s.per_image;
    const Taps<A> t = sample_taps<A>(xy[2 * m], xy[2 * m + 1], s.H, s.W, static_cast<int>(mode));
    for (int c = 0; c < 4; ++c) {
      b.pointer[i][c] = tap_offset(t.offset[c], s.W, sH, sW);
      b.w[i][c] = t.weight[c];
      b.dx[i][c] = t.dwdx[c];
      b.dy[i][c] = t.dwdy[c];
    }
  }
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
  const int64_t blocks = (s.M + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    TapBlock<A> b;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t m0 = blk * kBlock;
      fill_block(b, m0, std::min(s.M, m0 + kBlock), xy, idx, s, mode, sH, sW);
      if (sD == 1) {  // channels-last: each tap's channels are contiguous
        for (int64_t i = 0; i < b.count; ++i) {
          const F* base = f + b.image[i] * sN;
          F* row = o + (m0 + i) * s.D;
          for (int64_t d = 0; d < s.D; ++d) {
            A acc = 0;
            for (int c = 0; c < 4; ++c)
              if (b.pointer[i][c] >= 0) acc += b.w[i][c] * static_cast<A>(base[b.pointer[i][c] + d]);
            row[d] = static_cast<F>(acc);
          }
        }
        continue;
      }
      for (int64_t d = 0; d < s.D; ++d) {
        for (int64_t i = 0; i < b.count; ++i) {
          const F* plane = f + b.image[i] * sN + d * sD;
          A acc = 0;
          for (int c = 0; c < 4; ++c)
            if (b.pointer[i][c] >= 0) acc += b.w[i][c] * static_cast<A>(plane[b.pointer[i][c]]);
          o[(m0 + i) * s.D + d] = static_cast<F>(acc);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Scattered pairs (image_index given: gather_pixel_features, and the fused distillation loss).
// Each pair's taps are computed once, as element offsets with the image base included. The
// loops then follow the memory layout:
//  * channel stride 1 (channels-last): pair by pair, each tap one contiguous run of channels;
//  * planar (NCHW): kChunk channels at a time over all pairs, so each pair's kChunk row entries
//    fill whole cache lines. Pair by pair, every pair would load D cache lines, one per plane.
// Planar loops and scatter-adds visit the pairs in pixel order (a stable counting sort of their
// first tap), so the planes (or the accumulator's rows) stream through the cache instead of being
// read at random; the pairs' own rows, then read out of order, are prefetched kAhead pairs ahead.
// Reductions over channels run in channel order, and scatter-adds in the visiting order, which
// depends only on the pairs: the results are the same for every thread count. The backwards
// into planar features take scatter_planar (one pass, no separate zeroing); channels-last ones
// scatter_pairs.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kChunk = 16;
constexpr int64_t kPairTile = 2048;
constexpr int64_t kAhead = 32;

inline void prefetch_read(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
}
inline void prefetch_write(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 1, 3);
#endif
}

template <typename A>
struct PairTaps {
  int nt = 1;                // taps per pair: 1 (nearest) or 4 (bilinear)
  scratch_vector<int64_t> ptr;  // [M * nt] element offsets (-1: outside the image)
  scratch_vector<A> w;          // [M * 4] tap weights (bilinear only)
  scratch_vector<int64_t> order;  // [M] visiting order: by image and pixel of the first tap, stable
  scratch_vector<int64_t> key;    // [M] image * H * W + pixel of the first tap (-1: none)
};

// Stable sort of the pairs by key (the image-and-pixel index of their first tap; pairs outside
// every image, key -1, go last): a counting sort when the key range is small, else a sort of
// (key, pair) tuples.
scratch_vector<int64_t> pixel_order(const scratch_vector<int64_t>& key, int64_t range) {
  const int64_t M = static_cast<int64_t>(key.size());
  scratch_vector<int64_t> order(M);
  if (range <= 4 * M + (int64_t{1} << 16)) {
    scratch_vector<int64_t> start(range + 2, 0);
    for (int64_t m = 0; m < M; ++m) ++start[(key[m] < 0 ? range : key[m]) + 1];
    for (int64_t k = 0; k <= range; ++k) start[k + 1] += start[k];
    for (int64_t m = 0; m < M; ++m) order[start[key[m] < 0 ? range : key[m]]++] = m;
    return order;
  }
  scratch_vector<std::pair<int64_t, int64_t>> kv(M);
  for (int64_t m = 0; m < M; ++m) kv[m] = {key[m] < 0 ? range : key[m], m};
  std::sort(kv.begin(), kv.end());
  for (int64_t m = 0; m < M; ++m) order[m] = kv[m].second;
  return order;
}

template <typename A>
PairTaps<A> pair_taps(const A* xy, const int64_t* idx, const SampleShape& s, int64_t mode,
                      at::IntArrayRef strides) {
  PairTaps<A> t;
  t.nt = mode == kNearest ? 1 : 4;
  t.ptr.resize(s.M * t.nt);
  if (t.nt == 4) t.w.resize(s.M * 4);
  const int64_t sN = strides[0], sH = strides[2], sW = strides[3];
  scratch_vector<int64_t>& key = t.key;
  key.resize(s.M);
  at::parallel_for(0, s.M, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = idx ? idx[m] : m / s.per_image;
      const Taps<A> k = sample_taps<A>(xy[2 * m], xy[2 * m + 1], s.H, s.W, static_cast<int>(mode));
      key[m] = -1;
      for (int c = 0; c < t.nt; ++c) {
        const int64_t o = tap_offset(k.offset[c], s.W, sH, sW);
        t.ptr[m * t.nt + c] = o < 0 ? -1 : n * sN + o;
        if (t.nt == 4) t.w[m * 4 + c] = k.weight[c];
        if (key[m] < 0 && o >= 0) key[m] = n * s.H * s.W + k.offset[c];
      }
    }
  });
  t.order = pixel_order(key, s.N * s.H * s.W);
  return t;
}

// Calls fn with std::integral_constant<int, taps per pair>.
template <typename A, typename Fn>
void with_taps(const PairTaps<A>& t, Fn fn) {
  if (t.nt == 1) fn(std::integral_constant<int, 1>{});
  else fn(std::integral_constant<int, 4>{});
}

// The sampled value of pair m at element offset `dofs` from its taps (channel d: d * sD).
template <int NT, typename F, typename A>
inline A tap_value(const F* f, const int64_t* ptr, const A* w, int64_t dofs) {
  if constexpr (NT == 1) {
    return ptr[0] < 0 ? A(0) : static_cast<A>(f[ptr[0] + dofs]);
  } else {
    A acc = 0;
    for (int c = 0; c < NT; ++c)
      if (ptr[c] >= 0) acc += w[c] * static_cast<A>(f[ptr[c] + dofs]);
    return acc;
  }
}

template <int NT, typename A>
inline const A* tap_weights(const PairTaps<A>& t, int64_t m) {
  return NT == 1 ? nullptr : t.w.data() + m * NT;
}

// out [M, D] (contiguous) = features sampled at the pairs.
template <int NT, typename F, typename A>
void gather_pairs(const F* f, int64_t sD, const PairTaps<A>& t, int64_t M, int64_t D, F* out) {
  if (sD == 1) {
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const int64_t* p = t.ptr.data() + m * NT;
        const A* w = tap_weights<NT>(t, m);
        F* row = out + m * D;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<F>(tap_value<NT>(f, p, w, d));
      }
    });
    return;
  }
  const int64_t chunks = ceil_div(D, kChunk), tiles = ceil_div(M, kPairTile);
  // chunk-major tasks: a thread's consecutive tasks read the same planes
  at::parallel_for(0, chunks * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d0 = (task / tiles) * kChunk, d1 = std::min(D, d0 + kChunk);
      const int64_t m0 = (task % tiles) * kPairTile, m1 = std::min(M, m0 + kPairTile);
      for (int64_t q = m0; q < m1; ++q) {
        const int64_t m = t.order[q];
        if (q + kAhead < M) prefetch_write(out + t.order[q + kAhead] * D + d0);
        const int64_t* p = t.ptr.data() + m * NT;
        const A* w = tap_weights<NT>(t, m);
        for (int64_t d = d0; d < d1; ++d) out[m * D + d] = static_cast<F>(tap_value<NT>(f, p, w, d * sD));
      }
    }
  });
}

// Scatter-add of per-pair rows into gacc (t: element offsets in gacc), deterministic without
// atomics: tasks own channel chunks (kChunk channels; for a channel stride of 1, about D / threads
// of them, at least kChunk) and visit the pairs in t.order. row_of(m, d0, d1, row) fills pair m's
// row entries d0 .. d1-1 (false skips the pair); ahead(m, d0) prefetches what it will read.
template <int NT, typename A, typename RowFn, typename AheadFn>
void scatter_pairs(const PairTaps<A>& t, int64_t M, int64_t D, Tensor& gacc, RowFn row_of,
                   AheadFn ahead) {
  A* acc = gacc.mutable_data_ptr<A>();
  const int64_t gD = gacc.stride(1);
  int64_t chunk = kChunk;
  if (gD == 1) chunk = std::max(kChunk, ceil_div(ceil_div(D, at::get_num_threads()), kChunk) * kChunk);
  const int64_t chunks = ceil_div(D, chunk);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    scratch_vector<A> row(chunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d0 = task * chunk, d1 = std::min(D, d0 + chunk), nd = d1 - d0;
      for (int64_t q = 0; q < M; ++q) {
        const int64_t m = t.order[q];
        if (q + kAhead < M) ahead(t.order[q + kAhead], d0);
        if (!row_of(m, d0, d1, row.data())) continue;
        const int64_t* p = t.ptr.data() + m * NT;
        for (int c = 0; c < NT; ++c) {
          if (p[c] < 0) continue;
          A* dst = acc + p[c] + d0 * gD;
          if constexpr (NT == 1) {  // weight 1: 1 * x == x exactly
            if (gD == 1) for (int64_t k = 0; k < nd; ++k) dst[k] += row[k];
            else for (int64_t k = 0; k < nd; ++k) dst[k * gD] += row[k];
          } else {
            const A wc = t.w[m * NT + c];
            if (gD == 1) for (int64_t k = 0; k < nd; ++k) dst[k] += wc * row[k];
            else for (int64_t k = 0; k < nd; ++k) dst[k * gD] += wc * row[k];
          }
        }
      }
    }
  });
}

// Scatter-add of pairs into planar (NCHW) features, the faster path for their backwards. `acc`
// is a contiguous [N, D, H, W] buffer that starts uninitialised: this pass zeroes it too. The
// pairs go in pixel order (t.order; keys image * H * W + pixel of the first tap), in blocks of
// kPlanarBlock, kPlanarChunk channels at a time; for each block the routine calls
//   block(b0, nb, d0, d1, zero)
// for the pairs order[b0 .. b0+nb-1] and channels d0 .. d1-1. The block goes channel by channel
// and calls zero(d) before its adds to plane d: that zeroes a run of the plane's keys which ends
// past every key the block's taps reach (its last key + `halo`: 0 for nearest taps, W + 1 for
// bilinear ones) and starts where the last block's run ended, so each entry is zeroed once,
// before its first add, and the run is in L1 for the adds, as are the block's own rows.
// Tasks, deterministic without atomics: for nearest pairs, runs of the pairs cut at pixel
// boundaries (each owns a range of keys in every plane); for bilinear pairs, whose taps reach
// into the next pixels' range, ranges of channels over all pairs. Each entry's adds run in the
// visiting order (pair, then tap), as in scatter_pairs, whatever the thread count.
constexpr int64_t kPlanarBlock = 64;
constexpr int64_t kPlanarChunk = 64;

template <typename A, typename BlockFn>
void scatter_planar(const PairTaps<A>& t, const SampleShape& s, A* acc, BlockFn block) {
  const int64_t D = s.D, HW = s.H * s.W, NHW = s.N * HW;
  const int64_t halo = t.nt == 1 ? 0 : s.W + 1;
  const int64_t* order = t.order.data();
  auto key_at = [&](int64_t q) { return t.key[order[q]]; };
  int64_t valid = s.M;  // pairs outside every image (key -1) are sorted last
  while (valid > 0 && key_at(valid - 1) < 0) --valid;
  const int64_t threads = at::get_num_threads();
  const int64_t runs = halo == 0 ? std::max<int64_t>(1, std::min(threads, valid / 256)) : 1;
  // (at least 8 channels a task: each task sets up every block's taps and coefficients)
  const int64_t ranges = halo == 0 ? 1 : std::max<int64_t>(1, std::min(threads, (D + 7) / 8));
  // Runs: about equal numbers of pairs, each cut moved forward to the next new pixel.
  scratch_vector<int64_t> cut(runs + 1, valid), lo_key(runs + 1, NHW);
  cut[0] = 0;
  lo_key[0] = 0;
  for (int64_t i = 1; i < runs; ++i) {
    int64_t r = std::max(cut[i - 1], valid * i / runs);
    while (r > 0 && r < valid && key_at(r) == key_at(r - 1)) ++r;
    cut[i] = r;
    lo_key[i] = r < valid ? key_at(r) : NHW;
  }
  // Zero plane d over the keys [k0, k1) (they may span images).
  auto zero_keys = [&](int64_t d, int64_t k0, int64_t k1) {
    while (k0 < k1) {
      const int64_t n = k0 / HW, end = std::min(k1, (n + 1) * HW);
      A* plane = acc + n * (D - 1) * HW + d * HW;  // + key: entry (n, d, pixel)
      std::fill(plane + k0, plane + end, A(0));
      k0 = end;
    }
  };
  at::parallel_for(0, runs * ranges, 1, [&](int64_t tb, int64_t te) {
    for (int64_t task = tb; task < te; ++task) {
      const int64_t run = task / ranges, range = task % ranges;
      const int64_t begin = cut[run], end = cut[run + 1], klo = lo_key[run], khi = lo_key[run + 1];
      const int64_t c0 = D * range / ranges, c1 = D * (range + 1) / ranges;
      for (int64_t d0 = c0; d0 < c1; d0 += kPlanarChunk) {
        const int64_t d1 = std::min(c1, d0 + kPlanarChunk);
        if (acc && begin == end)
          for (int64_t d = d0; d < d1; ++d) zero_keys(d, klo, khi);
        int64_t zlo = klo;
        for (int64_t b0 = begin; b0 < end; b0 += kPlanarBlock) {
          const int64_t b1 = std::min(end, b0 + kPlanarBlock);
          const int64_t zhi = b1 < end ? std::min(khi, std::max(zlo, key_at(b1 - 1) + halo + 1)) : khi;
          block(b0, b1 - b0, d0, d1, [&](int64_t d) { zero_keys(d, zlo, zhi); });
          zlo = zhi;
        }
      }
    }
  });
}

// The feature-gradient accumulator. Pairs on planar features: contiguous and uninitialised
// (scatter_planar zeroes it). Pairs on channels-last features: zeroed, channels-last
// (scatter_pairs). Dense sampling (no image_index): zeroed, with the features' own strides
// (scatter_dense).
bool planar_pairs(const Prepared& p) {
  return p.index.defined() && p.features.stride(1) != 1 &&
         p.features.suggest_memory_format() != at::MemoryFormat::ChannelsLast;
}

Tensor feature_accumulator(const Prepared& p, const at::TensorOptions& acc) {
  if (planar_pairs(p)) return empty_large(p.features.sizes(), acc);
  if (!p.index.defined()) return zeros_like_large(p.features, acc);
  if (p.features.suggest_memory_format() == at::MemoryFormat::ChannelsLast)
    return channels_last_accumulator(p.features, acc);
  return zeros_large(p.features.sizes(), acc);
}

// Runs body(begin, end) over pairs split into one contiguous range per thread: planar loops
// then stream each chunk's planes once per thread, in pixel order.
template <typename Fn>
void per_thread_ranges(int64_t M, Fn body) {
  const int64_t grain = std::max<int64_t>(64, ceil_div(M, std::max(1, at::get_num_threads())));
  at::parallel_for(0, M, grain, body);
}

Tensor sample_points_cpu(const Tensor& features, const std::optional<Tensor>& image_index,
                         const Tensor& xy, int64_t mode) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  const Prepared p = prepare_sampling(features, image_index, xy, s);
  Tensor out = empty_large({s.M, s.D}, p.features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features.scalar_type(), "sample_points", [&] {
    if (!p.index.defined()) return forward_impl<scalar_t>(p, s, mode, out);
    using A = at::opmath_type<scalar_t>;
    const PairTaps<A> t = pair_taps<A>(p.xy.const_data_ptr<A>(), p.index.const_data_ptr<int64_t>(), s,
                                       mode, p.features.strides());
    with_taps(t, [&](auto nt) {
      gather_pairs<decltype(nt)::value>(p.features.const_data_ptr<scalar_t>(), p.features.stride(1), t,
                                        s.M, s.D, out.mutable_data_ptr<scalar_t>());
    });
  });
  return out.scalar_type() == features.scalar_type() ? out : out.to(features.scalar_type());
}


// Dense sampling (no image_index: the points of image n are m in [n*per, (n+1)*per)):
// scatter-add of per-point rows into the feature-gradient accumulator `gacc` ([N, D, H, W], any
// strides), deterministic without atomics: tasks own one image and a fixed 16-channel slice and
// visit their points in order. row_of(m, d0, d1, out) fills the slice of point m's row; taps_of(m)
// gives its taps.
template <typename A, typename TapsFn, typename RowFn>
void scatter_dense(const SampleShape& s, Tensor& gacc, TapsFn taps_of, RowFn row_of) {
  A* acc = gacc.mutable_data_ptr<A>();
  const auto gs = gacc.strides();
  const int64_t gN = gs[0], gD = gs[1], gH = gs[2], gW = gs[3];
  const int64_t slices = (s.D + kChannelSlice - 1) / kChannelSlice;
  at::parallel_for(0, s.N * slices, 1, [&](int64_t begin, int64_t end) {
    A rows[kBlock][kChannelSlice];
    bool keep[kBlock];
    Taps<A> taps[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / slices, sl = task % slices;
      const int64_t d0 = sl * kChannelSlice, d1 = std::min(s.D, d0 + kChannelSlice), nd = d1 - d0;
      const int64_t m0 = grp * s.per_image, m1 = m0 + s.per_image;
      for (int64_t b0 = m0; b0 < m1; b0 += kBlock) {
        const int64_t cnt = std::min<int64_t>(kBlock, m1 - b0);
        for (int64_t i = 0; i < cnt; ++i) {
          keep[i] = row_of(b0 + i, d0, d1, rows[i]);
          if (keep[i]) taps[i] = taps_of(b0 + i);
        }
        // channel by channel within the block (see kBlock); points in order within a channel
        for (int64_t k = 0; k < nd; ++k) {
          A* plane = acc + (d0 + k) * gD;
          for (int64_t i = 0; i < cnt; ++i) {
            if (!keep[i]) continue;
            const int64_t n = grp;
            const Taps<A>& t = taps[i];
            for (int c = 0; c < 4; ++c) {
              if (t.offset[c] < 0) continue;
              plane[n * gN + tap_offset(t.offset[c], s.W, gH, gW)] += t.weight[c] * rows[i][k];
            }
          }
        }
      }
    }
  });
}

template <typename F>
void backward_impl(const Tensor& grad, const Prepared& p, const SampleShape& s, int64_t mode,
                   bool need_features, bool need_xy, Tensor& gacc, Tensor& gxy) {
  using A = at::opmath_type<F>;
  const A* xy = p.xy.const_data_ptr<A>();
  const int64_t* idx = p.index.defined() ? p.index.const_data_ptr<int64_t>() : nullptr;
  const F* g = grad.const_data_ptr<F>();
  const int64_t gM = grad.stride(0), gD = grad.stride(1);  // any strides (e.g. expanded)
  if (need_features && p.index.defined()) {  // (idx is null when there are no pairs)
    const PairTaps<A> t = pair_taps<A>(xy, idx, s, mode, gacc.strides());
    with_taps(t, [&](auto nt) {
      constexpr int NT = decltype(nt)::value;
      if (!planar_pairs(p)) {
        scatter_pairs<NT>(t, s.M, s.D, gacc, [&](int64_t m, int64_t d0, int64_t d1, A* row) {
          for (int64_t d = d0; d < d1; ++d) row[d - d0] = static_cast<A>(g[m * gM + d * gD]);
          return true;
        }, [&](int64_t m, int64_t d0) { prefetch_read(g + m * gM + d0 * gD); });
        return;
      }
      A* acc = gacc.mutable_data_ptr<A>();
      scatter_planar(t, s, acc, [&](int64_t b0, int64_t nb, int64_t d0, int64_t d1, auto zero) {
        const F* rows[kPlanarBlock];
        int64_t taps[kPlanarBlock][NT];
        A ws[kPlanarBlock][NT];
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t m = t.order[b0 + i];
          rows[i] = g + m * gM;
          for (int c = 0; c < NT; ++c) {
            taps[i][c] = t.ptr[m * NT + c];
            ws[i][c] = NT == 1 ? A(1) : t.w[m * NT + c];
          }
        }
        for (int64_t d = d0; d < d1; ++d) {
          zero(d);
          A* ad = acc + d * s.H * s.W;
          for (int64_t i = 0; i < nb; ++i) {
            const A r = static_cast<A>(rows[i][d * gD]);
            if constexpr (NT == 1) {
              ad[taps[i][0]] += r;
            } else {
              for (int c = 0; c < NT; ++c)
                if (taps[i][c] >= 0) ad[taps[i][c]] += ws[i][c] * r;
            }
          }
        }
      });
    });
  } else if (need_features) {
    scatter_dense<A>(
        s, gacc,
        [&](int64_t m) { return sample_taps<A>(xy[2 * m], xy[2 * m + 1], s.H, s.W, static_cast<int>(mode)); },
        [&](int64_t m, int64_t d0, int64_t d1, A* row) {
          for (int64_t d = d0; d < d1; ++d) row[d - d0] = static_cast<A>(g[m * gM + d * gD]);
          return true;
        });
  }
  if (need_xy && mode == kBilinear) {
    const F* f = p.features.const_data_ptr<F>();
    const auto st = p.features.strides();
    const int64_t sN = st[0], sD = st[1], sH = st[2], sW = st[3];
    A* gout = gxy.mutable_data_ptr<A>();
    const int64_t blocks = (s.M + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      TapBlock<A> b;
      A gx[kBlock], gy[kBlock];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t m0 = blk * kBlock;
        fill_block(b, m0, std::min(s.M, m0 + kBlock), xy, idx, s, kBilinear, sH, sW);
        for (int64_t i = 0; i < b.count; ++i) gx[i] = gy[i] = 0;
        for (int64_t d = 0; d < s.D; ++d) {  // a channel plane at a time (see kBlock)
          for (int64_t i = 0; i < b.count; ++i) {
            const F* plane = f + b.image[i] * sN + d * sD;
            A sx = 0, sy = 0;
            for (int c = 0; c < 4; ++c) {
              if (b.pointer[i][c] < 0) continue;
              const A v = static_cast<A>(plane[b.pointer[i][c]]);
              sx += b.dx[i][c] * v;
              sy += b.dy[i][c] * v;
            }
            const A gd = static_cast<A>(g[(m0 + i) * gM + d * gD]);
            gx[i] += gd * sx;
            gy[i] += gd * sy;
          }
        }
        for (int64_t i = 0; i < b.count; ++i) {
          gout[2 * (m0 + i)] = gx[i];
          gout[2 * (m0 + i) + 1] = gy[i];
        }
      }
    });
  }
}

std::tuple<Tensor, Tensor> sample_points_backward_cpu(
    const Tensor& grad, const Tensor& features, const std::optional<Tensor>& image_index,
    const Tensor& xy, int64_t mode, bool features_grad, bool xy_grad, bool deterministic) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  check_sample_grad(grad, features, s);
  const Prepared p = prepare_sampling(features, image_index, xy, s);
  // Read in its own strides, as the CUDA backward does: the gradient of a sum over channels
  // comes expanded (stride 0), and a contiguous copy would be one more pass over [M, D].
  const Tensor g = grad.to(p.features.scalar_type());
  Tensor gacc = features_grad ? feature_accumulator(p, p.xy.options()) : at::empty({0}, p.xy.options());
  Tensor gxy = xy_grad ? at::zeros({s.M, 2}, p.xy.options()) : at::empty({0}, p.xy.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features.scalar_type(),
                                  "sample_points_backward", [&] {
    backward_impl<scalar_t>(g, p, s, mode, features_grad, xy_grad, gacc, gxy);
  });
  Tensor gf = features_grad ? like_features(gacc, features) : at::empty({0}, features.options());
  return {gf, xy_grad ? gxy.to(xy.scalar_type()) : at::empty({0}, xy.options())};
}


// ---------------------------------------------------------------------------------------------
// Fused pixel-to-point distillation loss: per pair m, f = features sampled at xy[m] (on the fly,
// never stored), g = point_features[m]; a = f / max(|f|, eps), b = g / max(|g|, eps);
// L_m = 1 - a.b (cosine) or |a - b|^2 (l2_normalized); loss = mean_m L_m. Only three scalars per
// pair (|f|, |g|, f.g) are kept for backward.
// ---------------------------------------------------------------------------------------------

template <typename A>
struct DistillCoef {  // d L_m / d f = cf1 f + cf2 g, d L_m / d g = cg1 g + cg2 f
  A cf1, cf2, cg1, cg2;
};

template <typename A>
DistillCoef<A> distill_coef(A nf_raw, A ng_raw, A fg, int64_t loss) {
  const A eps = static_cast<A>(kNormEps);
  const A nf = std::max(nf_raw, eps), ng = std::max(ng_raw, eps);
  const A p = loss == kCosine ? A(0) : A(2), q = loss == kCosine ? A(-1) : A(-2);
  const A aa = nf_raw * nf_raw / (nf * nf), bb = ng_raw * ng_raw / (ng * ng), ab = fg / (nf * ng);
  const A sa = nf_raw > eps ? p * aa + q * ab : A(0);
  const A sb = ng_raw > eps ? p * bb + q * ab : A(0);
  return {(p - sa) / (nf * nf), q / (nf * ng), (p - sb) / (ng * ng), q / (nf * ng)};
}

template <typename A>
A distill_value(A nf_raw, A ng_raw, A fg, int64_t loss) {
  const A eps = static_cast<A>(kNormEps);
  const A nf = std::max(nf_raw, eps), ng = std::max(ng_raw, eps);
  const A ab = fg / (nf * ng);
  if (loss == kCosine) return A(1) - ab;
  return nf_raw * nf_raw / (nf * nf) + ng_raw * ng_raw / (ng * ng) - A(2) * ab;
}

struct DistillInputs {
  Prepared p;
  Tensor pf;  // point features in the accumulation dtype (any strides)
  RowLayout pl;
  Tensor w;  // weights in the accumulation dtype, or undefined
};

// keep_pf: the point features as they come (the dense-loss kernels read bfloat16 themselves)
DistillInputs prepare_distill(const Tensor& point_features, const Tensor& features,
                              const std::optional<Tensor>& image_index, const Tensor& xy,
                              const std::optional<Tensor>& weights, const SampleShape& s,
                              bool keep_pf = false) {
  DistillInputs in{prepare_sampling(features, image_index, xy, s), Tensor(), {}, Tensor()};
  const auto acc = in.p.xy.scalar_type();
  in.pf = keep_pf || point_features.scalar_type() == acc ? point_features : point_features.to(acc);
  in.pl = row_layout(in.pf);
  if (weights.has_value()) in.w = weights->to(acc).contiguous();
  return in;
}

template <typename F>
void distill_forward_impl(const DistillInputs& in, const SampleShape& s, int64_t mode,
                          int64_t loss, Tensor& stats, double* total, double* weight_sum) {
  using A = at::opmath_type<F>;
  const F* f = in.p.features.const_data_ptr<F>();
  const int64_t sD = in.p.features.stride(1);
  const A* g = in.pf.const_data_ptr<A>();
  const A* w = in.w.defined() ? in.w.const_data_ptr<A>() : nullptr;
  const int64_t* idx = in.p.index.defined() ? in.p.index.const_data_ptr<int64_t>() : nullptr;
  const PairTaps<A> t = pair_taps<A>(in.p.xy.const_data_ptr<A>(), idx, s, mode, in.p.features.strides());
  A* out = stats.mutable_data_ptr<A>();
  scratch_vector<double> per(s.M);
  auto finish = [&](int64_t m, A ff, A gg, A fg) {
    out[3 * m] = std::sqrt(ff);
    out[3 * m + 1] = std::sqrt(gg);
    out[3 * m + 2] = fg;
    per[m] = double(distill_value<A>(out[3 * m], out[3 * m + 1], fg, loss)) * (w ? double(w[m]) : 1.0);
  };
  with_taps(t, [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    if (sD == 1) {  // pair by pair
      at::parallel_for(0, s.M, 64, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          const int64_t* p = t.ptr.data() + m * NT;
          const A* tw = tap_weights<NT>(t, m);
          const A* gm = g + in.pl.base(m);
          A ff = 0, gg = 0, fg = 0;
          for (int64_t d = 0; d < s.D; ++d) {
            const A fv = tap_value<NT>(f, p, tw, d), gv = gm[d * in.pl.sD];
            ff += fv * fv;
            gg += gv * gv;
            fg += fv * gv;
          }
          finish(m, ff, gg, fg);
        }
      });
      return;
    }
    per_thread_ranges(s.M, [&](int64_t begin, int64_t end) {  // planar: chunk by chunk
      scratch_vector<A> sums(3 * (end - begin), A(0));
      for (int64_t d0 = 0; d0 < s.D; d0 += kChunk) {
        const int64_t d1 = std::min(s.D, d0 + kChunk);
        for (int64_t q = begin; q < end; ++q) {
          const int64_t m = t.order[q];
          if (q + kAhead < end) prefetch_read(g + in.pl.base(t.order[q + kAhead]) + d0 * in.pl.sD);
          const int64_t* p = t.ptr.data() + m * NT;
          const A* tw = tap_weights<NT>(t, m);
          const A* gm = g + in.pl.base(m);
          A* sm = sums.data() + 3 * (q - begin);
          A ff = sm[0], gg = sm[1], fg = sm[2];
          for (int64_t d = d0; d < d1; ++d) {
            const A fv = tap_value<NT>(f, p, tw, d * sD), gv = gm[d * in.pl.sD];
            ff += fv * fv;
            gg += gv * gv;
            fg += fv * gv;
          }
          sm[0] = ff;
          sm[1] = gg;
          sm[2] = fg;
        }
      }
      for (int64_t q = begin; q < end; ++q) {
        const A* sm = sums.data() + 3 * (q - begin);
        finish(t.order[q], sm[0], sm[1], sm[2]);
      }
    });
  });
  double sum = 0, wsum = 0;
  for (int64_t m = 0; m < s.M; ++m) {
    sum += per[m];
    wsum += w ? double(w[m]) : 1.0;
  }
  *total = sum;
  *weight_sum = wsum;
}

// The fused dense loss fast path (pyssl.ops.dense_correspondence_loss), below with the dense
// sampling kernels it uses.
bool dense_loss_path(const Tensor& point_features, const Tensor& features,
                     const std::optional<Tensor>& image_index, const Tensor& xy,
                     const SampleShape& s, int64_t mode);
void dense_loss_forward(const DistillInputs& in, const SampleShape& s, int64_t loss, Tensor& stats,
                        double* total, double* weight_sum);
void dense_loss_backward(double grad, const DistillInputs& in, const SampleShape& s,
                         const Tensor& stats, int64_t loss, bool need_pf, bool need_features,
                         Tensor& gpf, Tensor& gacc);

std::tuple<Tensor, Tensor> distill_loss_cpu(const Tensor& point_features, const Tensor& features,
                                            const std::optional<Tensor>& image_index,
                                            const Tensor& xy, const std::optional<Tensor>& weights,
                                            int64_t mode, int64_t loss) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  check_distill(point_features, features, weights, s, loss);
  const bool dense = dense_loss_path(point_features, features, image_index, xy, s, mode);
  const DistillInputs in = prepare_distill(point_features, features, image_index, xy, weights, s, dense);
  Tensor stats = at::empty({s.M, 3}, in.p.xy.options());
  double total = 0, wsum = 0;
  if (dense) {
    dense_loss_forward(in, s, loss, stats, &total, &wsum);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.features.scalar_type(), "distill_loss", [&] {
      distill_forward_impl<scalar_t>(in, s, mode, loss, stats, &total, &wsum);
    });
  }
  Tensor value = at::full({}, wsum != 0 ? total / wsum : 0.0, in.p.xy.options());
  return {value, stats};
}

// Pairs on planar features: d L / d g and d L / d f in one scatter_planar pass (t: taps in the
// features, ta: the same taps in the contiguous accumulator; o: the point-feature gradient or
// null; acc: the feature accumulator or null). Same expressions, in the same order, as the
// two-pass path below.
template <int NT, typename F, typename A>
void distill_backward_planar(const F* f, int64_t sD, const A* g, const RowLayout& pl, const PairTaps<A>& t,
                             const PairTaps<A>& ta, const scratch_vector<DistillCoef<A>>& coef,
                             const SampleShape& s, A* o, const RowLayout& gl, A* acc) {
  const int64_t HW = s.H * s.W;
  if (o) {  // pairs outside every image (sorted last): their sampled features are 0
    for (int64_t q = s.M - 1; q >= 0 && t.key[t.order[q]] < 0; --q) {
      const int64_t m = t.order[q];
      for (int64_t d = 0; d < s.D; ++d)
        o[gl.base(m) + d * gl.sD] = coef[m].cg1 * g[pl.base(m) + d * pl.sD] + coef[m].cg2 * A(0);
    }
  }
  scatter_planar(t, s, acc, [&](int64_t b0, int64_t nb, int64_t d0, int64_t d1, auto zero) {
    int64_t fp[kPlanarBlock][NT], ap[kPlanarBlock][NT], goff[kPlanarBlock], ooff[kPlanarBlock];
    A w[kPlanarBlock][NT];
    DistillCoef<A> c[kPlanarBlock];
    bool adds[kPlanarBlock];
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t m = t.order[b0 + i];
      for (int k = 0; k < NT; ++k) {
        fp[i][k] = t.ptr[m * NT + k];
        ap[i][k] = ta.ptr[m * NT + k];
        w[i][k] = NT == 1 ? A(1) : t.w[m * NT + k];
      }
      goff[i] = pl.base(m);
      ooff[i] = o ? gl.base(m) : 0;
      c[i] = coef[m];
      adds[i] = acc && !(c[i].cf1 == A(0) && c[i].cf2 == A(0));  // zero weight: no add
    }
    for (int64_t d = d0; d < d1; ++d) {
      if (acc) zero(d);
      const A* gd = g + d * pl.sD;
      A* ad = acc ? acc + d * HW : nullptr;
      for (int64_t i = 0; i < nb; ++i) {
        const A fv = NT == 1 ? static_cast<A>(f[fp[i][0] + d * sD])  // valid pairs: the tap is inside
                             : tap_value<NT>(f, fp[i], w[i], d * sD);
        const A gv = gd[goff[i]];
        if (o) o[ooff[i] + d * gl.sD] = c[i].cg1 * gv + c[i].cg2 * fv;
        if (!adds[i]) continue;
        const A r = c[i].cf1 * fv + c[i].cf2 * gv;
        if constexpr (NT == 1) {
          ad[ap[i][0]] += r;
        } else {
          for (int k = 0; k < NT; ++k)
            if (ap[i][k] >= 0) ad[ap[i][k]] += w[i][k] * r;
        }
      }
    }
  });
}

template <typename F>
void distill_backward_impl(double grad, const DistillInputs& in, const SampleShape& s,
                           const Tensor& stats, int64_t mode, int64_t loss, bool need_pf,
                           bool need_features, Tensor& gpf, Tensor& gacc) {
  using A = at::opmath_type<F>;
  const F* f = in.p.features.const_data_ptr<F>();
  const int64_t sD = in.p.features.stride(1);
  const A* xy = in.p.xy.const_data_ptr<A>();
  const A* g = in.pf.const_data_ptr<A>();
  const A* w = in.w.defined() ? in.w.const_data_ptr<A>() : nullptr;
  const A* sts = stats.const_data_ptr<A>();
  const int64_t* idx = in.p.index.defined() ? in.p.index.const_data_ptr<int64_t>() : nullptr;
  double wsum = 0;
  for (int64_t m = 0; m < s.M; ++m) wsum += w ? double(w[m]) : 1.0;
  scratch_vector<DistillCoef<A>> coef(s.M);
  for (int64_t m = 0; m < s.M; ++m) {
    const A scale = wsum != 0 ? static_cast<A>(grad * (w ? double(w[m]) : 1.0) / wsum) : A(0);
    DistillCoef<A> c = distill_coef<A>(sts[3 * m], sts[3 * m + 1], sts[3 * m + 2], loss);
    coef[m] = {c.cf1 * scale, c.cf2 * scale, c.cg1 * scale, c.cg2 * scale};
  }
  const PairTaps<A> t = pair_taps<A>(xy, idx, s, mode, in.p.features.strides());
  if (planar_pairs(in.p)) {  // both gradients in one pass
    const bool same = !need_features || gacc.strides() == in.p.features.strides();
    const PairTaps<A> ta = same ? PairTaps<A>() : pair_taps<A>(xy, idx, s, mode, gacc.strides());
    with_taps(t, [&](auto nt) {
      distill_backward_planar<decltype(nt)::value, F, A>(
          f, sD, g, in.pl, t, same ? t : ta, coef, s, need_pf ? gpf.mutable_data_ptr<A>() : nullptr,
          need_pf ? row_layout(gpf) : RowLayout{}, need_features ? gacc.mutable_data_ptr<A>() : nullptr);
    });
    return;
  }
  with_taps(t, [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    if (need_pf) {  // d L / d g = cg1 g + cg2 f, element by element
      const RowLayout gl = row_layout(gpf);
      A* o = gpf.mutable_data_ptr<A>();
      auto pair_rows = [&](int64_t m, int64_t d0, int64_t d1) {
        const int64_t* p = t.ptr.data() + m * NT;
        const A* tw = tap_weights<NT>(t, m);
        const A* gm = g + in.pl.base(m);
        A* om = o + gl.base(m);
        for (int64_t d = d0; d < d1; ++d)
          om[d * gl.sD] = coef[m].cg1 * gm[d * in.pl.sD] + coef[m].cg2 * tap_value<NT>(f, p, tw, d * sD);
      };
      if (sD == 1) {
        at::parallel_for(0, s.M, 64, [&](int64_t begin, int64_t end) {
          for (int64_t m = begin; m < end; ++m) pair_rows(m, 0, s.D);
        });
      } else {
        per_thread_ranges(s.M, [&](int64_t begin, int64_t end) {
          for (int64_t d0 = 0; d0 < s.D; d0 += kChunk)
            for (int64_t q = begin; q < end; ++q) {
              if (q + kAhead < end) {
                const int64_t ma = t.order[q + kAhead];
                prefetch_read(g + in.pl.base(ma) + d0 * in.pl.sD);
                prefetch_write(o + gl.base(ma) + d0 * gl.sD);
              }
              pair_rows(t.order[q], d0, std::min(s.D, d0 + kChunk));
            }
        });
      }
    }
    if (need_features) {  // d L / d f = cf1 f + cf2 g, scattered through the taps
      const bool same = gacc.strides() == in.p.features.strides();
      const PairTaps<A> ta = same ? PairTaps<A>() : pair_taps<A>(xy, idx, s, mode, gacc.strides());
      scatter_pairs<NT>(same ? t : ta, s.M, s.D, gacc, [&](int64_t m, int64_t d0, int64_t d1, A* row) {
        if (coef[m].cf1 == A(0) && coef[m].cf2 == A(0)) return false;  // zero weight
        const int64_t* p = t.ptr.data() + m * NT;
        const A* tw = tap_weights<NT>(t, m);
        const A* gm = g + in.pl.base(m);
        for (int64_t d = d0; d < d1; ++d)
          row[d - d0] = coef[m].cf1 * tap_value<NT>(f, p, tw, d * sD) + coef[m].cf2 * gm[d * in.pl.sD];
        return true;
      }, [&](int64_t m, int64_t d0) {
        prefetch_read(&coef[m]);
        prefetch_read(g + in.pl.base(m) + d0 * in.pl.sD);
      });
    }
  });
}

std::tuple<Tensor, Tensor> distill_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& point_features, const Tensor& features,
    const std::optional<Tensor>& image_index, const Tensor& xy,
    const std::optional<Tensor>& weights, const Tensor& stats, int64_t mode, int64_t loss,
    bool point_features_grad, bool features_grad, bool deterministic) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  check_distill(point_features, features, weights, s, loss);
  check_distill_backward(grad_loss, stats, features, s);
  const bool dense = dense_loss_path(point_features, features, image_index, xy, s, mode);
  const DistillInputs in = prepare_distill(point_features, features, image_index, xy, weights, s, dense);
  const Tensor st = stats.to(in.p.xy.scalar_type()).contiguous();
  const double g = grad_loss.item<double>();
  if (dense) {
    Tensor gpf, gacc;
    dense_loss_backward(g, in, s, st, loss, point_features_grad, features_grad, gpf, gacc);
    return {point_features_grad ? gpf.to(point_features.scalar_type()) : at::empty({0}, point_features.options()),
            features_grad ? like_features(gacc, features) : at::empty({0}, features.options())};
  }
  Tensor gpf = point_features_grad ? empty_like_large(in.pf, in.pf.options()) : at::empty({0}, in.p.xy.options());
  Tensor gacc = features_grad ? feature_accumulator(in.p, in.p.xy.options()) : at::empty({0}, in.p.xy.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.features.scalar_type(), "distill_loss_backward", [&] {
    distill_backward_impl<scalar_t>(g, in, s, st, mode, loss, point_features_grad, features_grad, gpf, gacc);
  });
  return {point_features_grad ? gpf.to(point_features.scalar_type()) : at::empty({0}, point_features.options()),
          features_grad ? like_features(gacc, features) : at::empty({0}, features.options())};
}


// ---------------------------------------------------------------------------------------------
// Dense sampling fast path (CPU, float32 or bfloat16, NCHW): pyssl.ops.sample_features on the
// CPU. Output and incoming gradients are NCHW planes, so the per-channel loops vectorise over
// points (gathers); 16-channel slices go through channels-last bands of rows, 3 or 4 channels
// through a pixel-interleaved copy of the image (the quad kernels).
// ---------------------------------------------------------------------------------------------

constexpr int64_t kDenseBlock = 256;

void check_dense(const Tensor& features, const Tensor& coords) {
  check_dim(features, 4, "features", "[B, C, H, W]");
  check_dim(coords, 4, "coords", "[B, Ho, Wo, 2]");
  check_dtype(features, {at::kFloat, at::kBFloat16}, "features");
  check_dtype(coords, {at::kFloat}, "coords");
  TORCH_CHECK_VALUE(coords.size(0) == features.size(0) && coords.size(3) == 2,
                    "coords must have shape [B, Ho, Wo, 2] with B = ", features.size(0), ", got ",
                    coords.sizes());
  TORCH_CHECK_VALUE(features.size(2) * features.size(3) < (int64_t{1} << 31),
                    "features are too large for the dense path (H*W >= 2^31)");
}

// float32 -> float, bfloat16 -> uint16_t (the torch-free kernels' view of bfloat16)
template <typename F>
const F* kernel_ptr(const Tensor& t) {
  if constexpr (std::is_same_v<F, float>) return t.const_data_ptr<float>();
  else return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}
template <typename F>
F* kernel_ptr_mut(Tensor& t) {
  if constexpr (std::is_same_v<F, float>) return t.mutable_data_ptr<float>();
  else return reinterpret_cast<uint16_t*>(t.mutable_data_ptr<at::BFloat16>());
}

// Channels handled per task: 16-channel slices through the channels-last band kernels when C is
// large enough and the CPU has AVX2+FMA, the remaining channels (or all of them) planar.
struct DenseSplit {
  int64_t slices, rest, tasks;  // per image
  DenseSplit(int64_t C) {
    const bool band = C >= cpu::kBandChannels && cpu::band_kernels_available();
    slices = band ? C / cpu::kBandChannels : 0;
    rest = C - slices * cpu::kBandChannels;
    tasks = slices + (rest ? 1 : 0);
  }
};

struct ScratchDeleter {
  void operator()(cpu::BandScratch* s) const { cpu::band_scratch_free(s); }
};
// A parallel task's band scratch, made on first use: its row rings (4 MB at most) are a torch
// tensor, uninitialised, so that profiles and peak memory see them.
class Scratch {
 public:
  cpu::BandScratch* get(int64_t W) {
    if (!s_) {
      rings_ = at::empty({cpu::band_ring_floats(W)}, at::kFloat);
      s_.reset(cpu::band_scratch_new(W, rings_.mutable_data_ptr<float>()));
    }
    return s_.get();
  }

 private:
  at::Tensor rings_;  // outlives s_, which points into it
  std::unique_ptr<cpu::BandScratch, ScratchDeleter> s_;
};

// 3 or 4 channels of a whole image (no band slices) take the pixel-interleaved ("quad")
// kernels: a corner is one 4-lane read or update for all channels instead of one gather or
// scatter per channel plane. With 1 or 2 channels the planes are as fast or faster here (a quad
// moves 4 lanes for 1 or 2 useful ones): benchmarks/RESULTS.md. The interleaved images and the
// feature-gradient accumulator come from pools kept between calls (ops/quad.h).
constexpr int64_t kQuadMinChannels = 3;

bool use_quad(int64_t channels, int64_t H, int64_t W) {
  return channels >= kQuadMinChannels && channels <= cpu::kQuadChannels &&
         H * cpu::quad_pitch(W) < (int64_t{1} << 31);  // int32 tap indices
}

// Where channel c of pixel i of image b lives in a contiguous map, NCHW or channels-last:
// b * D * H * W + c * chs + i * pxs
struct DenseLayout {
  int64_t chs, pxs;
  DenseLayout(const Tensor& t, int64_t HW)
      : chs(channels_last(t) ? 1 : HW), pxs(channels_last(t) ? t.size(1) : 1) {}
  static bool channels_last(const Tensor& t) {
    return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  }
};

// Channels-last features whose channels all fall in 16-channel band slices: the band kernels
// read their rows in place (other channels-last maps are transposed to NCHW first; the feature
// gradient of every channels-last map is channels-last: feature_gradient).
bool channels_last_bands(const Tensor& features) {
  const int64_t C = features.size(1);
  return C > 0 && C % cpu::kBandChannels == 0 && DenseLayout::channels_last(features);
}

// Channels-last maps to NCHW and back (float32 or bfloat16; a CPU with the band kernels): the
// 16-channel slices through 8 x 8 transposes, a block of pixels at a time, the rest (fewer than
// 16 channels) by torch's copy. torch's copy of many channels goes through every plane at once,
// and with planes a multiple of 4 KiB apart those accesses compete for the same cache sets: 30 ms
// for 40 float32 channels of 2 x 256 x 512 here, against 3 ms for 17 (benchmarks/RESULTS.md).
template <typename F>
void copy_slices(const F* src, const DenseLayout& from, F* dst, const DenseLayout& to, int64_t B,
                 int64_t C, int64_t HW) {
  constexpr int64_t kPixels = 1024;
  const int64_t S = cpu::kBandChannels, slices = C / S, blocks = (HW + kPixels - 1) / kPixels;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = task % blocks * kPixels, n = std::min(kPixels, HW - p0);
      for (int64_t q = 0; q < slices; ++q) {
        cpu::copy_slice(src + b * C * HW + q * S * from.chs + p0 * from.pxs, from.chs, from.pxs, n,
                        dst + b * C * HW + q * S * to.chs + p0 * to.pxs, to.chs, to.pxs);
      }
    }
  });
}

// t (NCHW-contiguous or channels-last, float32 or bfloat16) copied into the other layout
Tensor transposed_channels(const Tensor& t) {
  const int64_t B = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  Tensor out = !t.is_contiguous() ? empty_large(t.sizes(), t.options())
                                  : empty_large({B, t.size(2), t.size(3), C}, t.options())
                                        .permute({0, 3, 1, 2});
  const DenseLayout from(t, HW), to(out, HW);
  if (t.scalar_type() == at::kBFloat16) {
    copy_slices(kernel_ptr<uint16_t>(t), from, kernel_ptr_mut<uint16_t>(out), to, B, C, HW);
  } else {
    copy_slices(kernel_ptr<float>(t), from, kernel_ptr_mut<float>(out), to, B, C, HW);
  }
  const int64_t done = C / cpu::kBandChannels * cpu::kBandChannels;
  if (done < C) out.narrow(1, done, C - done).copy_(t.narrow(1, done, C - done));
  return out;
}

// The features as the dense sampling kernels read them: as they are when NCHW, or channels-last
// (channels_last_bands) on a CPU with the band kernels; other channels-last maps transposed to
// NCHW (transposed_channels), any other layout copied to NCHW. Their channel and pixel
// strides: DenseLayout.
bool sampled_in_place(const Tensor& features) {
  return features.is_contiguous() || (channels_last_bands(features) && cpu::band_kernels_available());
}
Tensor sampling_features(const Tensor& features) {
  if (sampled_in_place(features)) return features;
  if (!DenseLayout::channels_last(features) || !cpu::band_kernels_available()) return features.contiguous();
  return transposed_channels(features);
}

// chs, pxs: the features' channel and pixel strides (sampling_features); other than (H*W, 1)
// only when every channel is in a band slice
template <typename F>
void dense_forward(const F* fp, int64_t chs, int64_t pxs, const float* cp, F* op, int64_t B,
                   int64_t C, int64_t H, int64_t W, int64_t P) {
  const DenseSplit split(C);
  const int64_t HW = H * W, S = cpu::kBandChannels;
  const int64_t blocks = (P + kDenseBlock - 1) / kDenseBlock;
  // channels [c0, c0 + nc) of image b at the block of points starting at p0, planar
  auto planar_block = [&](int64_t b, int64_t p0, int64_t c0, int64_t nc) {
    int32_t index[4 * kDenseBlock];
    float weight[4 * kDenseBlock];
    const int64_t n = std::min(kDenseBlock, P - p0);
    const cpu::DenseTaps t{index, weight, nullptr, nullptr};
    cpu::dense_taps(cp + (b * P + p0) * 2, n, H, W, t);
    cpu::dense_gather(fp + (b * C + c0) * HW, nc, HW, t, n, op + (b * C + c0) * P + p0, P);
  };
  // Few channels: the image interleaved, each row just before the first block of points that
  // reads it (LazyRows: the gather then finds it in cache), and gathered from
  if (split.slices == 0 && use_quad(C, H, W)) {
    const QuadLayout L(H, W);
    ScratchPool::Lease q = quad_image_pool().lend(B * L.image_floats());
    float* qp = q.data();
    LazyRows packed(B, H);
    auto pack = [&](int64_t b, int64_t r0, int64_t r1) {
      cpu::quad_pack(fp + b * C * HW, C, H, W, L.pitch, r0, r1, qp + b * L.image_floats());
    };
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      int32_t index[4 * kDenseBlock];
      float weight[4 * kDenseBlock];
      int64_t kb = -1, klo = 0, khi = 0;  // rows [klo, khi) of image kb known packed
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, p0 = (task % blocks) * kDenseBlock;
        const int64_t n = std::min(kDenseBlock, P - p0);
        const cpu::DenseTaps t{index, weight, nullptr, nullptr};
        cpu::dense_taps(cp + (b * P + p0) * 2, n, H, W, L.pitch, t);
        const auto [lo, hi] = tap_rows(index, n, L.pitch);
        if (lo < hi && (b != kb || lo < klo || hi > khi)) {
          packed.ensure(b, lo, hi, pack);
          if (b == kb && lo <= khi && hi >= klo) {
            klo = std::min(klo, lo);
            khi = std::max(khi, hi);
          } else {
            kb = b, klo = lo, khi = hi;
          }
        }
        cpu::quad_gather(qp + b * L.image_floats(), C, t, n, op + b * C * P + p0, P);
      }
    });
    return;
  }
  if (split.slices == 0) {  // planar only: parallel over blocks of points, all channels each
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task)
        planar_block(task / blocks, (task % blocks) * kDenseBlock, 0, C);
    });
    return;
  }
  at::parallel_for(0, B * split.tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / split.tasks, q = task % split.tasks, c0 = q * S;
      if (q < split.slices) {
        cpu::band_gather(fp + b * C * HW + c0 * chs, H, W, chs, pxs, cp + b * P * 2, P,
                         op + (b * C + c0) * P, P, scratch.get(W));
      } else {  // the remaining channels, planar
        for (int64_t blk = 0; blk < blocks; ++blk) planar_block(b, blk * kDenseBlock, c0, split.rest);
      }
    }
  });
}

Tensor sample_features_dense_cpu(const Tensor& features, const Tensor& coords) {
  check_dense(features, coords);
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t P = coords.size(1) * coords.size(2);
  const Tensor f = sampling_features(features), xy = coords.contiguous();
  const DenseLayout L(f, H * W);
  Tensor out = empty_large({B, C, coords.size(1), coords.size(2)}, f.options());
  if (H == 0 || W == 0) return out.zero_();  // every point is outside an empty map
  const float* cp = xy.const_data_ptr<float>();
  if (f.scalar_type() == at::kBFloat16) {
    dense_forward(kernel_ptr<uint16_t>(f), L.chs, L.pxs, cp, kernel_ptr_mut<uint16_t>(out), B, C, H, W, P);
  } else {
    dense_forward(kernel_ptr<float>(f), L.chs, L.pxs, cp, kernel_ptr_mut<float>(out), B, C, H, W, P);
  }
  return out;
}

// Backward: one task per (image, 16-channel slice) through the band kernels plus one for the
// remaining channels (all of them when C < 16), which walks blocks of points once: taps with
// their derivatives, then the feature-gradient scatter and the coordinate gradient. With several
// tasks per image each task's coordinate gradient goes to its own partial buffer, summed in task
// order after, so results do not depend on the number of threads. The coordinate gradient is
// planar: gc [B, 2, P] (x plane, y plane); with one task per image (T == 1) each block zeroes
// its part before accumulating, so gc needs no zero fill.
// G: the output gradient's element type, float or (uint16_t) bfloat16; bfloat16 only when every
// channel is in a band slice (the planar rest kernels read float32)
template <typename F, typename G>
void dense_backward(const F* fp, int64_t chs, int64_t pxs, const float* cp, const G* gp,
                    int64_t gsb, int64_t gsc, float* gfp, float* gcp, int64_t B, int64_t C,
                    int64_t H, int64_t W, int64_t P, const at::TensorOptions& opts) {
  const DenseSplit split(C);
  const int64_t HW = H * W, S = cpu::kBandChannels, T = split.tasks;
  Tensor partial = gcp && T > 1 ? zeros_large({B, T, 2, P}, opts.dtype(at::kFloat)) : Tensor();
  float* pp = gcp ? (T > 1 ? partial.mutable_data_ptr<float>() : gcp) : nullptr;
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    int32_t index[4 * kDenseBlock];
    float weight[4 * kDenseBlock], dwdx[4 * kDenseBlock], dwdy[4 * kDenseBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / T, q = task % T, c0 = q * S;
      float* gx = pp ? pp + (b * T + q) * 2 * P : nullptr;
      float* gy = pp ? gx + P : nullptr;
      float* gf = gfp ? gfp + b * C * HW + c0 * chs : nullptr;
      if (q < split.slices) {
        cpu::band_backward(fp + b * C * HW + c0 * chs, chs, pxs, gp + b * gsb + c0 * gsc, gsc, H, W, cp + b * P * 2, P,
                           gf, gx, gy, scratch.get(W));
        continue;
      }
      for (int64_t p0 = 0; p0 < P; p0 += kDenseBlock) {  // the remaining channels, planar
        const int64_t n = std::min(kDenseBlock, P - p0);
        const cpu::DenseTaps t{index, weight, gx ? dwdx : nullptr, gx ? dwdy : nullptr};
        if (gx && T == 1) {
          std::fill(gx + p0, gx + p0 + n, 0.0f);
          std::fill(gy + p0, gy + p0 + n, 0.0f);
        }
        cpu::dense_taps(cp + (b * P + p0) * 2, n, H, W, t);
        if constexpr (std::is_same_v<G, float>) {
          cpu::dense_backward(fp + (b * C + c0) * HW, split.rest, HW, gp + b * gsb + c0 * gsc + p0, gsc,
                              t, n, gf, gx ? gx + p0 : nullptr, gy ? gy + p0 : nullptr);
        } else {
          TORCH_INTERNAL_ASSERT(false, "a bfloat16 output gradient with planar channels");
        }
      }
    }
  });
  if (gcp && T > 1) {
    at::parallel_for(0, B * 2 * P, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {  // m = (b * 2 + e) * P + p
        const int64_t b = m / (2 * P), r = m % (2 * P);
        float acc = pp[b * T * 2 * P + r];
        for (int64_t q = 1; q < T; ++q) acc += pp[(b * T + q) * 2 * P + r];
        gcp[m] = acc;
      }
    });
  }
}

// The quad backward (3 or 4 channels, use_quad): one task per image walks its blocks of points
// in order, scattering into the image's interleaved accumulator and reading the interleaved
// features for the coordinate gradient, and writes the feature-gradient planes from the
// accumulator in the features' dtype. Every value of gf and gc is written. The output gradient G
// is float32 or bfloat16 (read as float: a bfloat16 gradient is not widened into a copy first).
//
// Rows move through cache once: a row of the interleaved features is packed, and a row of the
// accumulator zeroed, just before the first block that reads it (LazyRows); a row of the
// accumulator is unpacked into gf as soon as no later block can touch it (every later block's
// points lie below it: min_y), while it is still in cache. Before, the whole 2 MB images were
// packed, zeroed and unpacked in passes of their own and came back from memory.
template <typename F, typename G>
void quad_backward_images(const F* fp, const float* cp, const G* gp, int64_t gsb, int64_t gsc,
                          F* gfp, float* gcp, int64_t B, int64_t C, int64_t H, int64_t W,
                          int64_t P) {
  const QuadLayout L(H, W);
  const int64_t HW = H * W, Q = L.image_floats();
  const int64_t blocks = (P + kDenseBlock - 1) / kDenseBlock;
  ScratchPool::Lease q = quad_image_pool().lend(gcp ? B * Q : 0);
  ScratchPool::Lease acc = quad_grad_pool().lend(gfp ? B * Q : 0);
  float* qp = q.data();
  float* ap = acc.data();
  LazyRows packed(gcp ? B : 0, H), zeroed(gfp ? B : 0, H);
  auto pack = [&](int64_t b, int64_t r0, int64_t r1) {
    cpu::quad_pack(fp + b * C * HW, C, H, W, L.pitch, r0, r1, qp + b * Q);
  };
  auto zero = [&](int64_t b, int64_t r0, int64_t r1) {
    std::fill(ap + b * Q + r0 * L.pitch * 4, ap + b * Q + r1 * L.pitch * 4, 0.0f);
  };
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    int32_t index[4 * kDenseBlock];
    float weight[4 * kDenseBlock], fx[kDenseBlock], fy[kDenseBlock];
    scratch_vector<int64_t> below(gfp ? blocks + 1 : 0);  // no block >= blk reads a row < below[blk]
    for (int64_t b = begin; b < end; ++b) {
      const float* cb = cp + b * P * 2;
      float* gx = gcp ? gcp + b * 2 * P : nullptr;
      float* gy = gcp ? gx + P : nullptr;
      float* ab = gfp ? ap + b * Q : nullptr;
      F* gfb = gfp ? gfp + b * C * HW : nullptr;
      int64_t unpacked = 0;  // rows [0, unpacked) of gf written
      auto unpack = [&](int64_t r1) {  // rows never touched hold no gradient (and were not zeroed)
        for (int64_t r = unpacked; r < r1; ++r) {
          if (zeroed.is_packed(b, r)) {
            cpu::quad_unpack(ab, H, W, L.pitch, C, gfb, r, r + 1);
          } else {
            for (int64_t c = 0; c < C; ++c) {
              std::fill(gfb + c * HW + r * W, gfb + c * HW + (r + 1) * W, F{});
            }
          }
        }
        unpacked = std::max(unpacked, r1);
      };
      if (gfp) {
        below[blocks] = H;
        for (int64_t blk = blocks - 1; blk >= 0; --blk) {
          const int64_t p0 = blk * kDenseBlock, n = std::min(kDenseBlock, P - p0);
          const float y = cpu::min_y(cb + p0 * 2, n);
          const int64_t lo = !(y >= 0.0f)                 ? 0  // below 0 or -inf; +inf (no y): H
                             : y >= static_cast<float>(H) ? H
                                                          : static_cast<int64_t>(y);
          below[blk] = std::min(below[blk + 1], lo);
        }
      }
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t p0 = blk * kDenseBlock, n = std::min(kDenseBlock, P - p0);
        const cpu::DenseTaps t{index, weight, nullptr, nullptr, gx ? fx : nullptr,
                               gx ? fy : nullptr};
        cpu::dense_taps(cb + p0 * 2, n, H, W, L.pitch, t);
        const auto [lo, hi] = tap_rows(index, n, L.pitch);
        if (gx) packed.ensure(b, lo, hi, pack);
        if (ab) zeroed.ensure(b, lo, hi, zero);
        cpu::quad_backward(gx ? qp + b * Q : nullptr, C, gp + b * gsb + p0, gsc, t, n, ab,
                           gx ? gx + p0 : nullptr, gy ? gy + p0 : nullptr);
        if (ab) unpack(below[blk + 1]);
      }
      if (ab) unpack(H);
    }
  });
}

// The feature gradient as sample_features_dense_backward returns it: in the features' dtype and
// layout, NCHW or channels-last (the fake kernel's rule: pyssl/ops/flow.py, _dense_backward_fake),
// also when the kernels accumulated it in float32 or in NCHW planes
Tensor feature_gradient(const Tensor& gf, const Tensor& features) {
  const auto dtype = features.scalar_type();
  const auto format = DenseLayout::channels_last(features) ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous;
  if (gf.scalar_type() == dtype && gf.is_contiguous(format)) return gf;
  if (format == at::MemoryFormat::ChannelsLast && gf.is_contiguous() && cpu::band_kernels_available()) {
    return transposed_channels(to_large(gf, dtype));
  }
  return copy_large(gf, gf.options().dtype(dtype).memory_format(format));
}

std::tuple<Tensor, Tensor> sample_features_dense_backward_cpu(const Tensor& grad,
                                                              const Tensor& features,
                                                              const Tensor& coords,
                                                              bool features_grad, bool coords_grad) {
  check_dense(features, coords);
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t Ho = coords.size(1), Wo = coords.size(2), P = Ho * Wo;
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == C &&
                        grad.size(2) * grad.size(3) == P,
                    "grad must have shape [B, C, Ho, Wo] of the output, got ", grad.sizes());
  check_floating(grad, "grad");
  check_same_device(grad, features, "grad", "features");
  if (H == 0 || W == 0) {  // an empty map: no feature gradient to hold, every point outside
    return {features_grad ? at::zeros_like(features) : at::empty({0}, features.options()),
            coords_grad ? at::zeros({B, 2, Ho, Wo}, coords.options()).permute({0, 2, 3, 1})
                        : at::empty({0}, coords.options())};
  }
  // The features' values are read only for the coordinate gradient: without it, a map the
  // kernels would read through an NCHW copy is not copied (an uninitialised NCHW stand-in
  // gives the kernels the layout to accumulate in; no kernel reads it, and its pages are never
  // touched)
  const Tensor f = coords_grad || sampled_in_place(features)
                       ? sampling_features(features)
                       : at::empty(features.sizes(), features.options());
  const Tensor xy = coords.contiguous();
  const DenseLayout L(f, H * W);
  const DenseSplit split(C);
  const bool quad = split.slices == 0 && use_quad(C, H, W);
  // the output gradient as planes: any batch and channel strides (an expanded gradient, e.g. of
  // a sum over channels, has channel stride 0 and is not copied), points contiguous; float32,
  // or bfloat16 as it comes for the quad kernels and when every channel is in a band slice
  const bool bf16_grad = quad || (split.slices > 0 && split.rest == 0);
  Tensor g = bf16_grad && grad.scalar_type() == at::kBFloat16 ? grad : to_large(grad, at::kFloat);
  if (!(g.stride(3) == 1 && g.stride(2) == g.size(3))) g = g.contiguous();
  const float* cp = xy.const_data_ptr<float>();
  // The feature gradient accumulates in float32: in the quad path in its accumulator, unpacked
  // into the features' dtype (no zero fill, no conversion pass); otherwise in a zeroed float32
  // tensor converted to bfloat16 features' dtype at the end.
  Tensor gf = !features_grad ? at::empty({0}, f.options())
              : quad         ? empty_large(f.sizes(), f.options())
              : L.pxs == 1   ? zeros_large(f.sizes(), f.options().dtype(at::kFloat))
                             : zeros_large({B, H, W, C}, f.options().dtype(at::kFloat)).permute({0, 3, 1, 2});
  // The coordinate gradient is computed in planes [B, 2, Ho, Wo] and returned as its [B, Ho, Wo,
  // 2] view: the gradient of flow_correspondence's flow [B, 2, H, W] is then that contiguous
  // storage, which autograd stores as the flow's .grad without a copy.
  // With one planar task per image (0 < C and no band slices) the planar loop zeroes its
  // blocks as it goes; band tasks accumulate into a zeroed buffer, and C = 0 runs no task at
  // all (the gradient is 0).
  const bool one_task = split.slices == 0 && split.tasks == 1;
  Tensor gc = !coords_grad ? at::empty({0}, xy.options())
              : one_task   ? empty_large({B, 2, Ho, Wo}, xy.options())
                           : zeros_large({B, 2, Ho, Wo}, xy.options());
  float* gcp = coords_grad ? gc.mutable_data_ptr<float>() : nullptr;
  const int64_t gsb = g.stride(0), gsc = g.stride(1);
  if (quad) {
    auto run = [&](auto* gp) {
      if (f.scalar_type() == at::kBFloat16) {
        quad_backward_images(kernel_ptr<uint16_t>(f), cp, gp, gsb, gsc,
                             features_grad ? kernel_ptr_mut<uint16_t>(gf) : nullptr, gcp, B, C, H, W, P);
      } else {
        quad_backward_images(kernel_ptr<float>(f), cp, gp, gsb, gsc,
                             features_grad ? kernel_ptr_mut<float>(gf) : nullptr, gcp, B, C, H, W, P);
      }
    };
    if (g.scalar_type() == at::kBFloat16) {
      run(kernel_ptr<uint16_t>(g));
    } else {
      run(g.const_data_ptr<float>());
    }
    return {features_grad ? feature_gradient(gf, features) : gf, coords_grad ? gc.permute({0, 2, 3, 1}) : gc};
  }
  float* gfp = features_grad ? gf.mutable_data_ptr<float>() : nullptr;
  auto run = [&](const auto* gp) {
    if (f.scalar_type() == at::kBFloat16) {
      dense_backward(kernel_ptr<uint16_t>(f), L.chs, L.pxs, cp, gp, gsb, gsc, gfp, gcp, B, C, H, W, P, f.options());
    } else {
      dense_backward(kernel_ptr<float>(f), L.chs, L.pxs, cp, gp, gsb, gsc, gfp, gcp, B, C, H, W, P, f.options());
    }
  };
  if (g.scalar_type() == at::kBFloat16) {
    run(kernel_ptr<uint16_t>(g));
  } else {
    run(g.const_data_ptr<float>());
  }
  return {features_grad ? feature_gradient(gf, features) : gf, coords_grad ? gc.permute({0, 2, 3, 1}) : gc};
}

// ---------------------------------------------------------------------------------------------
// The fused dense loss on the dense sampling kernels (pyssl.ops.dense_correspondence_loss): one
// pair per pixel of a dense online map [N, D, Ho, Wo], in pixel order, sampling image n of the
// features at xy (bilinear). The generic pair path above builds per-pair tap pointers, sorts the
// pairs and reads each pixel's D online values D planes apart; here each (image, 16-channel
// slice) task walks its points in blocks through the band kernels (csrc/cpu/sample_band.cpp):
// the source rows a block reads transposed once into a ring of channels-last rows, the online
// values and their gradient moved 8 points x 8 channels at a time. The channels left over (all
// of them without AVX2) go through the planar kernels. Every task writes its own planes (online
// gradient, feature gradient) or its own partial sums, added in slice order after: the results
// do not depend on the number of threads. Float32 or bfloat16 maps (float32 math; features NCHW
// or channels-last, other strides copied to NCHW first), float32 coordinates; otherwise the
// generic path.
// ---------------------------------------------------------------------------------------------

bool dense_loss_path(const Tensor& point_features, const Tensor& features,
                     const std::optional<Tensor>& image_index, const Tensor& xy,
                     const SampleShape& s, int64_t mode) {
  auto float_or_bf16 = [](const Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  return mode == kBilinear && !image_index.has_value() && point_features.dim() == 4 &&
         point_features.size(0) == s.N && s.M > 0 && s.D > 0 && float_or_bf16(features) &&
         float_or_bf16(point_features) && xy.scalar_type() == at::kFloat &&
         s.H * s.W < (int64_t{1} << 31);
}

// The features as the dense-loss kernels read them: NCHW or channels-last as they are, any other
// strides copied to NCHW
Tensor dense_features(const Tensor& f) {
  return f.is_contiguous() || f.is_contiguous(at::MemoryFormat::ChannelsLast) ? f : f.contiguous();
}

// body(b, q, c0, C, features, coords, online, scratch, p0, n) for each (image b, task q) of
// channels [c0, c0 + C) and, with `chunks` > 1, each range [p0, p0 + n) of its points (whole
// blocks); features, coords and online point at the image and channel, not at p0. scratch: set
// for the 16-channel band slices, null for the planar rest. L, OL: the features' and the online
// map's layouts (dense_features).
template <typename F, typename O, typename Body>
void dense_loss_tasks(const F* fp, const DenseLayout& L, const SampleShape& s, int64_t P,
                      const float* cp, const O* op, const DenseLayout& OL, int64_t chunks,
                      const Body& body) {
  const DenseSplit split(s.D);
  const int64_t T = split.tasks, HW = s.H * s.W, S = cpu::kBandChannels;
  const int64_t blocks = (P + kDenseBlock - 1) / kDenseBlock;
  const int64_t K = std::clamp<int64_t>(chunks, 1, blocks);
  const int64_t per = (blocks + K - 1) / K * kDenseBlock;  // points per chunk
  at::parallel_for(0, s.N * T * K, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (T * K), q = task / K % T, c0 = q * S;
      const int64_t p0 = task % K * per, n = std::min(P, p0 + per) - p0;
      if (n <= 0) continue;
      const bool band = q < split.slices;
      body(b, q, c0, band ? S : split.rest, fp + b * s.D * HW + c0 * L.chs, cp + b * P * 2,
           op + b * s.D * P + c0 * OL.chs, band ? scratch.get(s.W) : nullptr, p0, n);
    }
  });
}

// fn(features, online) with the kernels' element types: float, or uint16_t for bfloat16
template <typename Fn>
void with_dense_types(const Tensor& features, const Tensor& online, const Fn& fn) {
  auto with_online = [&](const auto* fp) {
    if (online.scalar_type() == at::kBFloat16) {
      fn(fp, kernel_ptr<uint16_t>(online));
    } else {
      fn(fp, online.const_data_ptr<float>());
    }
  };
  if (features.scalar_type() == at::kBFloat16) {
    with_online(kernel_ptr<uint16_t>(features));
  } else {
    with_online(features.const_data_ptr<float>());
  }
}

template <typename T>
using Elem = std::remove_cv_t<std::remove_pointer_t<T>>;

void dense_loss_forward(const DistillInputs& in, const SampleShape& s, int64_t loss, Tensor& stats,
                        double* total, double* weight_sum) {
  const int64_t P = s.per_image, T = DenseSplit(s.D).tasks;
  const Tensor o = dense_features(in.pf);  // float32 or bfloat16, as it came
  const DenseLayout OL(o, P);
  const float* cp = in.p.xy.const_data_ptr<float>();
  Tensor part = empty_large({s.N, T, 3, P}, in.p.xy.options());  // every element written
  float* pp = part.mutable_data_ptr<float>();
  // Per-point sums do not depend on how points are split: with fewer (image, slice) tasks than
  // twice the threads, each task's points are cut into ranges as well (the backward cannot:
  // a task owns the target-gradient planes its points scatter into).
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = threads > 1 ? (2 * threads + s.N * T - 1) / (s.N * T) : 1;
  const Tensor f = dense_features(in.p.features);
  const DenseLayout L(f, s.H * s.W);
  with_dense_types(f, o, [&](const auto* fp, const auto* op) {
    using F = Elem<decltype(fp)>;
    using O = Elem<decltype(op)>;
    dense_loss_tasks(fp, L, s, P, cp, op, OL, chunks,
                     [&](int64_t b, int64_t q, int64_t, int64_t C, const F* f, const float* c,
                         const O* ob, cpu::BandScratch* sc, int64_t p0, int64_t n) {
      float* sums = pp + (b * T + q) * 3 * P + p0;
      const O* o0 = ob + p0 * OL.pxs;
      if (sc) {
        cpu::band_loss_forward(f, s.H, s.W, L.chs, L.pxs, c + 2 * p0, n, o0, OL.chs, OL.pxs, sums,
                               P, sc);
      } else {
        cpu::planar_loss_forward(f, C, s.H, s.W, L.chs, L.pxs, c + 2 * p0, n, o0, OL.chs, OL.pxs,
                                 sums, P);
      }
    });
  });
  const float* w = in.w.defined() ? in.w.const_data_ptr<float>() : nullptr;
  float* out = stats.mutable_data_ptr<float>();
  scratch_vector<double> per(s.M);
  at::parallel_for(0, s.M, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t b = m / P, p = m % P;
      const float* pb = pp + b * T * 3 * P + p;
      float tt = pb[0], oo = pb[P], to = pb[2 * P];
      for (int64_t q = 1; q < T; ++q) {  // the slices' partial sums, in slice order
        tt += pb[q * 3 * P];
        oo += pb[q * 3 * P + P];
        to += pb[q * 3 * P + 2 * P];
      }
      out[3 * m] = std::sqrt(tt);
      out[3 * m + 1] = std::sqrt(oo);
      out[3 * m + 2] = to;
      per[m] = double(distill_value<float>(out[3 * m], out[3 * m + 1], to, loss)) * (w ? double(w[m]) : 1.0);
    }
  });
  double sum = 0, wsum = 0;
  for (int64_t m = 0; m < s.M; ++m) {  // in pair order, as the generic path
    sum += per[m];
    wsum += w ? double(w[m]) : 1.0;
  }
  *total = sum;
  *weight_sum = wsum;
}

void dense_loss_backward(double grad, const DistillInputs& in, const SampleShape& s,
                         const Tensor& stats, int64_t loss, bool need_pf, bool need_features,
                         Tensor& gpf, Tensor& gacc) {
  const int64_t P = s.per_image;
  const Tensor o = dense_features(in.pf);  // float32 or bfloat16, as it came
  const DenseLayout OL(o, P);
  const float* cp = in.p.xy.const_data_ptr<float>();
  const float* w = in.w.defined() ? in.w.const_data_ptr<float>() : nullptr;
  const float* sts = stats.const_data_ptr<float>();
  double wsum = 0;
  for (int64_t m = 0; m < s.M; ++m) wsum += w ? double(w[m]) : 1.0;
  // per image, coefficient planes [4][P]: cf1, cf2, cg1, cg2 (as distill_backward_impl)
  Tensor coef = empty_large({s.N, 4, P}, in.p.xy.options());
  float* kp = coef.mutable_data_ptr<float>();
  at::parallel_for(0, s.M, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float scale = wsum != 0 ? static_cast<float>(grad * (w ? double(w[m]) : 1.0) / wsum) : 0.0f;
      const DistillCoef<float> c = distill_coef<float>(sts[3 * m], sts[3 * m + 1], sts[3 * m + 2], loss);
      float* k = kp + (m / P) * 4 * P + m % P;
      k[0] = c.cf1 * scale;
      k[P] = c.cf2 * scale;
      k[2 * P] = c.cg1 * scale;
      k[3 * P] = c.cg2 * scale;
    }
  });
  // The online gradient in the dtype and layout of the online map (as the fake kernel predicts):
  // written in place when that is the layout read (NCHW or channels-last), else through a buffer
  // in that layout. Every element is written.
  gpf = need_pf ? empty_like_large(in.pf, in.pf.options()) : Tensor();
  const bool direct = need_pf && gpf.strides() == o.strides();
  Tensor go_buf = need_pf && !direct ? empty_like_large(o, o.options()) : gpf;
  const int64_t HW = s.H * s.W;
  const Tensor f = dense_features(in.p.features);
  const DenseLayout L(f, HW);
  // the target gradient accumulates in float32 in the features' layout
  gacc = !need_features     ? Tensor()
         : L.pxs == 1       ? zeros_large(f.sizes(), in.p.xy.options())
                            : zeros_large({s.N, s.H, s.W, s.D}, in.p.xy.options()).permute({0, 3, 1, 2});
  float* gfp = need_features ? gacc.mutable_data_ptr<float>() : nullptr;
  with_dense_types(f, o, [&](const auto* fp, const auto* op) {
    using F = Elem<decltype(fp)>;
    using O = Elem<decltype(op)>;
    O* gop = need_pf ? static_cast<O*>(go_buf.mutable_data_ptr()) : nullptr;
    dense_loss_tasks(fp, L, s, P, cp, op, OL, 1,
                     [&](int64_t b, int64_t, int64_t c0, int64_t C, const F* f, const float* c,
                         const O* ob, cpu::BandScratch* sc, int64_t, int64_t) {
      const float* k = kp + b * 4 * P;
      O* go = gop ? gop + b * s.D * P + c0 * OL.chs : nullptr;
      float* gf = gfp ? gfp + b * s.D * HW + c0 * L.chs : nullptr;
      if (sc) {
        cpu::band_loss_backward(f, s.H, s.W, L.chs, L.pxs, c, P, ob, OL.chs, OL.pxs, k, P, go, gf,
                                sc);
      } else {
        cpu::planar_loss_backward(f, C, s.H, s.W, L.chs, L.pxs, c, P, ob, OL.chs, OL.pxs, k, P, go,
                                  gf);
      }
    });
  });
  if (need_pf && !direct) gpf.copy_(go_buf);
}

// Diagnostic: whether distill_loss on the CPU takes the dense-loss kernels for these inputs (the
// tests check that the inputs meant for them reach them).
bool dense_loss_kernels_cpu(const Tensor& point_features, const Tensor& features,
                            const std::optional<Tensor>& image_index, const Tensor& xy, int64_t mode) {
  const SampleShape s = check_sample(features, image_index, xy, mode);
  check_distill(point_features, features, std::nullopt, s, kCosine);
  return dense_loss_path(point_features, features, image_index, xy, s, mode);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyssl, m) {
  m.def("sample_points(Tensor features, Tensor? image_index, Tensor xy, int mode) -> Tensor");
  m.def("sample_points_backward(Tensor grad, Tensor features, Tensor? image_index, Tensor xy, int mode, bool features_grad, bool xy_grad, bool deterministic) -> (Tensor, Tensor)");
  m.def("sample_features_dense(Tensor features, Tensor coords) -> Tensor");
  m.def("sample_features_dense_backward(Tensor grad, Tensor features, Tensor coords, bool features_grad, bool coords_grad) -> (Tensor, Tensor)");
  m.def("distill_loss(Tensor point_features, Tensor features, Tensor? image_index, Tensor xy, Tensor? weights, int mode, int loss) -> (Tensor loss, Tensor stats)");
  m.def("distill_loss_backward(Tensor grad_loss, Tensor point_features, Tensor features, Tensor? image_index, Tensor xy, Tensor? weights, Tensor stats, int mode, int loss, bool point_features_grad, bool features_grad, bool deterministic) -> (Tensor, Tensor)");
  m.def("dense_loss_kernels(Tensor point_features, Tensor features, Tensor? image_index, Tensor xy, int mode) -> bool");
}

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("sample_points", &sample_points_cpu);
  m.impl("sample_points_backward", &sample_points_backward_cpu);
  m.impl("sample_features_dense", &sample_features_dense_cpu);
  m.impl("sample_features_dense_backward", &sample_features_dense_backward_cpu);
  m.impl("distill_loss", &distill_loss_cpu);
  m.impl("distill_loss_backward", &distill_loss_backward_cpu);
  m.impl("dense_loss_kernels", &dense_loss_kernels_cpu);
}

}  // namespace pyssl::sampling
