// Point-sampling CUDA kernels; see csrc/kernels/sampling.h.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda_common.cuh"
#include "kernels/sampling.h"
#include "kernels/sampling_math.h"

namespace pyssl::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t image_of(const int64_t* idx, int64_t m, int64_t per_image) {
  return idx ? idx[m] : m / per_image;
}

__device__ __forceinline__ int64_t tap_pointer(int64_t offset, const SampleArgs& a) {
  return tap_offset(offset, a.W, a.sH, a.sW);
}

__device__ __forceinline__ int64_t grad_pointer(int64_t n, int64_t d, int64_t offset,
                                                const SampleArgs& a) {
  return n * a.gN + d * a.gD + tap_offset(offset, a.W, a.gH, a.gW);
}

// Blocks of kThreads threads for `work` items (grid-stride kernels), at most 2^20.
unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), int64_t{1} << 20)));
}

// Channel d of point m in image n: the taps' weighted sum, in tap order.
template <typename F>
__device__ __forceinline__ acc_t<F> sample_one(const F* f, const Taps<acc_t<F>>& tp, int64_t n,
                                               int64_t d, const SampleArgs& a) {
  acc_t<F> acc = 0;
  const F* base = f + n * a.sN + d * a.sD;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int64_t po = tap_pointer(tp.offset[c], a);
    if (po >= 0) acc += tp.weight[c] * to_acc(base[po]);
  }
  return acc;
}

// d sample / dx and d sample / dy of one channel (base: its plane in the point's image; po: the
// taps' element offsets, -1 outside), in tap order.
template <typename F>
__device__ __forceinline__ void sample_grad_xy(const F* base, const Taps<acc_t<F>>& tp,
                                               const int64_t (&po)[4], acc_t<F>& sx,
                                               acc_t<F>& sy) {
  sx = 0;
  sy = 0;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if (po[c] < 0) continue;
    const acc_t<F> v = to_acc(base[po[c]]);
    sx += tp.dwdx[c] * v;
    sy += tp.dwdy[c] * v;
  }
}

template <typename F>
__global__ void forward_kernel(const F* __restrict__ f, const int64_t* __restrict__ idx,
                               const acc_t<F>* __restrict__ xy, SampleArgs a, F* __restrict__ out) {
  using A = acc_t<F>;
  const int64_t total = a.M * a.D;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = t / a.D, d = t % a.D;
    const int64_t n = image_of(idx, m, a.per_image);
    const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
    out[t] = from_acc<F>(sample_one(f, tp, n, d, a));
  }
}

// How a scatter term w * grad lands in its accumulator element: a float atomic add, or (the
// deterministic sample_points_backward_fixed) the term rounded to an integer number of units and
// added with a 64-bit integer atomic. Integer addition is associative, so that sum, and the
// gradient, do not depend on the order of the atomics: deterministic at the cost of float
// atomics, where sorting the taps (tap_keys_kernel, segment_sum_kernel) cost about as much again
// as the whole atomic backward on an H100.
struct FloatAdd {
  template <typename A>
  __device__ __forceinline__ void operator()(A* acc, int64_t i, A v) const { atomicAdd(acc + i, v); }
};

struct FixedAdd {
  double inv_unit;  // a power of two: the scaling is exact
  __device__ __forceinline__ void operator()(unsigned long long* acc, int64_t i, float v) const {
    atomicAdd(acc + i, static_cast<unsigned long long>(llrint(double(v) * inv_unit)));
  }
};

template <typename F, typename Out, typename Add>
__global__ void scatter_kernel(const F* __restrict__ g, const int64_t* __restrict__ idx,
                               const acc_t<F>* __restrict__ xy, SampleArgs a,
                               Out* __restrict__ out, Add add) {
  using A = acc_t<F>;
  const int64_t total = a.M * a.D;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = t / a.D, d = t % a.D;
    const int64_t n = image_of(idx, m, a.per_image);
    const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
    const A gv = to_acc(g[m * a.tM + d * a.tD]);
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (tp.offset[c] >= 0) add(out, grad_pointer(n, d, tp.offset[c], a), tp.weight[c] * gv);
  }
}

// A fixed-point sum in units of `unit` (a power of two), as a float.
__device__ __forceinline__ float fixed_to_float(int64_t v, double unit) {
  return static_cast<float>(static_cast<double>(v) * unit);
}

// gfix [N, HW, D] -> out with the same layout (a channels-last map's gradient).
template <typename F>
__global__ void fixed_to_grad_kernel(const int64_t* __restrict__ gfix, int64_t count, double unit,
                                     F* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_acc<F>(fixed_to_float(gfix[i], unit));
}

// The float-atomic scatter four channels at a time, for float accumulators whose channels are
// contiguous (the channels-last accumulator) with D % 4 == 0: one 16-byte vector atomic
// (sm_90: atom.global.add.v4.f32) per tap instead of four scalar ones, a quarter of the atomic
// requests the L2 has to serialise. Launched on compute capability 9.0 or newer only (its
// scalar fallback, for builds that also target older architectures, would be slower than
// scatter_kernel's adjacent lanes).
template <typename F>
__global__ void scatter4_kernel(const F* __restrict__ g, const int64_t* __restrict__ idx,
                                const float* __restrict__ xy, SampleArgs a,
                                float* __restrict__ gacc) {
  const int64_t D4 = a.D / 4, total = a.M * D4;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = t / D4, d = (t % D4) * 4;
    const int64_t n = image_of(idx, m, a.per_image);
    const Taps<float> tp = sample_taps<float>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
    const F* gm = g + m * a.tM + d * a.tD;
    const float g0 = to_acc(gm[0]), g1 = to_acc(gm[a.tD]), g2 = to_acc(gm[2 * a.tD]),
                g3 = to_acc(gm[3 * a.tD]);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (tp.offset[c] < 0) continue;
      const float w = tp.weight[c];
      float* p = gacc + grad_pointer(n, d, tp.offset[c], a);
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(PYSSL_CUDA_EMULATOR)
      atomicAdd(reinterpret_cast<float4*>(p), make_float4(w * g0, w * g1, w * g2, w * g3));
#else
      atomicAdd(p, w * g0);
      atomicAdd(p + 1, w * g1);
      atomicAdd(p + 2, w * g2);
      atomicAdd(p + 3, w * g3);
#endif
    }
  }
}

// Maps whose channels are not contiguous (NCHW: channel stride H * W) with 16 channels or more
// take a tiled forward. forward_kernel gives consecutive threads consecutive channels of one
// point: on an NCHW map each of a warp's reads lands in another channel plane. On an H100 that
// made the NCHW warp 1.7x slower than grid_sample at B=8, C=64 (benchmarks/RESULTS.md). A tiled
// block handles 32 points x 32 channels: threads along points read neighbouring pixels of one
// channel plane, and a shared-memory tile turns the rows of the [M, D] output into coalesced
// writes. Each element's arithmetic is unchanged. (The feature gradient needs no tiles: its
// accumulator is channels-last, csrc/ops/sampling.h, so consecutive channels are adjacent. The
// xy gradient reads the map like the forward: backward_xy_tiled_kernel.)
constexpr int kTileP = 32, kTileD = 32, kTileRows = 8;  // block (32, 8)
static_assert(kTileP * kTileRows == kThreads, "a tile block has kThreads threads: grid_for sizes its grid");

bool tiled(const SampleArgs& a) { return a.sD != 1 && a.D >= 16; }


// gfix [N, HW, D] -> out [N, D, HW] (an NCHW map's gradient, written in its layout so that no
// copy follows): a block converts 32 pixels x 32 channels, reading rows of channels and writing
// rows of pixels through a shared-memory tile, both coalesced.
template <typename F>
__global__ void __launch_bounds__(kTileP * kTileRows)
fixed_to_planar_kernel(const int64_t* __restrict__ gfix, int64_t N, int64_t HW, int64_t D,
                       double unit, F* __restrict__ out) {
  __shared__ float tile[kTileD][kTileP + 1];  // [channel][pixel]
  const int64_t tiles_p = ceil_div(HW, kTileP), tiles_d = ceil_div(D, kTileD);
  const int64_t tiles = N * tiles_p * tiles_d;
  for (int64_t tt = blockIdx.x; tt < tiles; tt += gridDim.x) {
    const int64_t n = tt / (tiles_p * tiles_d), r = tt % (tiles_p * tiles_d);
    const int64_t p0 = (r / tiles_d) * kTileP, d0 = (r % tiles_d) * kTileD;
    const int64_t* src = gfix + n * HW * D;
    for (int pp = threadIdx.y; pp < kTileP; pp += kTileRows) {
      const int64_t p = p0 + pp, d = d0 + threadIdx.x;
      if (p < HW && d < D) tile[threadIdx.x][pp] = fixed_to_float(src[p * D + d], unit);
    }
    __syncthreads();
    F* dst = out + n * HW * D;
    for (int dd = threadIdx.y; dd < kTileD; dd += kTileRows) {
      const int64_t p = p0 + threadIdx.x, d = d0 + dd;
      if (p < HW && d < D) dst[d * HW + p] = from_acc<F>(tile[dd][threadIdx.x]);
    }
    __syncthreads();
  }
}

template <typename F>
__global__ void __launch_bounds__(kTileP * kTileRows)
forward_tiled_kernel(const F* __restrict__ f, const int64_t* __restrict__ idx,
                     const acc_t<F>* __restrict__ xy, SampleArgs a, F* __restrict__ out) {
  using A = acc_t<F>;
  __shared__ A tile[kTileD][kTileP + 1];  // [channel][point]
  const int64_t tiles_d = ceil_div(a.D, kTileD), tiles = ceil_div(a.M, kTileP) * tiles_d;
  for (int64_t tt = blockIdx.x; tt < tiles; tt += gridDim.x) {
    const int64_t m0 = (tt / tiles_d) * kTileP, d0 = (tt % tiles_d) * kTileD;
    const int64_t m = m0 + threadIdx.x;
    if (m < a.M) {
      const int64_t n = image_of(idx, m, a.per_image);
      const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
      for (int dd = threadIdx.y; dd < kTileD && d0 + dd < a.D; dd += kTileRows)
        tile[dd][threadIdx.x] = sample_one(f, tp, n, d0 + dd, a);
    }
    __syncthreads();
    for (int pp = threadIdx.y; pp < kTileP; pp += kTileRows) {
      const int64_t mm = m0 + pp, d = d0 + threadIdx.x;
      if (mm < a.M && d < a.D) out[mm * a.D + d] = from_acc<F>(tile[threadIdx.x][pp]);
    }
    __syncthreads();
  }
}

// The xy gradient on the same NCHW-like maps: backward_xy_kernel's lanes stride over channels,
// so each of a warp's tap reads lands in another channel plane, as in the untiled forward. Here
// a block takes 32 points; for every 32 channels it stages the [32 points x 32 channels] block
// of the [M, D] gradient in shared memory (coalesced rows), then threads along points read
// neighbouring pixels of one plane. Each thread sums its channels (y, y + 8, ...) in order, and
// the 8 partial sums of a point are added in row order: bitwise repeatable.
template <typename F>
__global__ void __launch_bounds__(kTileP * kTileRows)
backward_xy_tiled_kernel(const F* __restrict__ g, const F* __restrict__ f,
                         const int64_t* __restrict__ idx, const acc_t<F>* __restrict__ xy,
                         SampleArgs a, acc_t<F>* __restrict__ gxy) {
  using A = acc_t<F>;
  __shared__ A gt[kTileD][kTileP + 1];          // gradient tile [channel][point]
  __shared__ A part[2][kTileRows][kTileP + 1];  // per-row partial sums of d/dx and d/dy
  const int64_t tiles = ceil_div(a.M, kTileP);
  for (int64_t tt = blockIdx.x; tt < tiles; tt += gridDim.x) {
    const int64_t m0 = tt * kTileP, m = m0 + threadIdx.x;
    const bool valid = m < a.M;
    const int64_t n = valid ? image_of(idx, m, a.per_image) : 0;
    const Taps<A> tp = sample_taps<A>(valid ? xy[2 * m] : A(-2), valid ? xy[2 * m + 1] : A(-2),
                                      a.H, a.W, kBilinear);
    int64_t po[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) po[c] = tap_pointer(tp.offset[c], a);
    A gx = 0, gy = 0;
    for (int64_t d0 = 0; d0 < a.D; d0 += kTileD) {
      for (int pp = threadIdx.y; pp < kTileP; pp += kTileRows) {
        const int64_t mm = m0 + pp, d = d0 + threadIdx.x;
        gt[threadIdx.x][pp] = (mm < a.M && d < a.D) ? to_acc(g[mm * a.tM + d * a.tD]) : A(0);
      }
      __syncthreads();
      if (valid) {
        for (int dd = threadIdx.y; dd < kTileD && d0 + dd < a.D; dd += kTileRows) {
          A sx, sy;
          sample_grad_xy(f + n * a.sN + (d0 + dd) * a.sD, tp, po, sx, sy);
          const A gd = gt[dd][threadIdx.x];
          gx += gd * sx;
          gy += gd * sy;
        }
      }
      __syncthreads();
    }
    part[0][threadIdx.y][threadIdx.x] = gx;
    part[1][threadIdx.y][threadIdx.x] = gy;
    __syncthreads();
    if (threadIdx.y == 0 && valid) {
      A sx = 0, sy = 0;
      for (int r = 0; r < kTileRows; ++r) {
        sx += part[0][r][threadIdx.x];
        sy += part[1][r][threadIdx.x];
      }
      gxy[2 * m] = sx;
      gxy[2 * m + 1] = sy;
    }
    __syncthreads();
  }
}

template <typename A>
__global__ void tap_keys_kernel(const int64_t* __restrict__ idx, const A* __restrict__ xy,
                                SampleArgs a, int64_t* __restrict__ keys) {
  const int64_t HW = a.H * a.W;
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < a.M;
       m += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = image_of(idx, m, a.per_image);
    const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
#pragma unroll
    for (int c = 0; c < 4; ++c) keys[4 * m + c] = tp.offset[c] < 0 ? -1 : n * HW + tp.offset[c];
  }
}

// One thread per (segment, channel): the taps of a segment share a target pixel and are summed
// in their stable sorted order (= point order), so the result is bitwise repeatable.
template <typename F>
__global__ void segment_sum_kernel(const F* __restrict__ g, const int64_t* __restrict__ idx,
                                   const acc_t<F>* __restrict__ xy, SampleArgs a,
                                   const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ targets,
                                   const int64_t* __restrict__ starts,
                                   const int64_t* __restrict__ counts, int64_t segments,
                                   acc_t<F>* __restrict__ gacc) {
  using A = acc_t<F>;
  const int64_t total = segments * a.D;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = t / a.D, d = t % a.D;
    const int64_t target = targets[s];
    if (target < 0) continue;
    A acc = 0;
    for (int64_t j = starts[s]; j < starts[s] + counts[s]; ++j) {
      const int64_t e = order[j];
      const int64_t m = e >> 2;
      const int c = static_cast<int>(e & 3);
      const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
      acc += tp.weight[c] * to_acc(g[m * a.tM + d * a.tD]);
    }
    const int64_t HW = a.H * a.W;
    gacc[grad_pointer(target / HW, d, target % HW, a)] = acc;
  }
}

// One warp per point: lanes stride over channels, then a fixed-order warp reduction.
template <typename F>
__global__ void backward_xy_kernel(const F* __restrict__ g, const F* __restrict__ f,
                                   const int64_t* __restrict__ idx, const acc_t<F>* __restrict__ xy,
                                   SampleArgs a, acc_t<F>* __restrict__ gxy) {
  using A = acc_t<F>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t m = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; m < a.M; m += warps) {
    const int64_t n = image_of(idx, m, a.per_image);
    const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, kBilinear);
    int64_t po[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) po[c] = tap_pointer(tp.offset[c], a);
    A gx = 0, gy = 0;
    for (int64_t d = lane; d < a.D; d += 32) {
      A sx, sy;
      sample_grad_xy(f + n * a.sN + d * a.sD, tp, po, sx, sy);
      const A gd = to_acc(g[m * a.tM + d * a.tD]);
      gx += gd * sx;
      gy += gd * sy;
    }
    for (int off = 16; off > 0; off >>= 1) {
      gx += __shfl_xor_sync(0xffffffffu, gx, off);
      gy += __shfl_xor_sync(0xffffffffu, gy, off);
    }
    if (lane == 0) {
      gxy[2 * m] = gx;
      gxy[2 * m + 1] = gy;
    }
  }
}


// ---------------------------------------------------------------------------------------------
// Fused distillation loss
// ---------------------------------------------------------------------------------------------

constexpr double kEps = 1e-12;

template <typename F>
__global__ void distill_forward_kernel(const acc_t<F>* __restrict__ g, RowLayout pl,
                                       const acc_t<F>* __restrict__ w, const F* __restrict__ f,
                                       const int64_t* __restrict__ idx,
                                       const acc_t<F>* __restrict__ xy, SampleArgs a, int loss,
                                       acc_t<F>* __restrict__ stats, acc_t<F>* __restrict__ per) {
  using A = acc_t<F>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t m = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; m < a.M; m += warps) {
    const int64_t n = image_of(idx, m, a.per_image);
    const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
    A ff = 0, gg = 0, fg = 0;
    const A* gm = g + pl.base(m);
    for (int64_t d = lane; d < a.D; d += 32) {
      const A fv = sample_one(f, tp, n, d, a), gv = gm[d * pl.sD];
      ff += fv * fv;
      gg += gv * gv;
      fg += fv * gv;
    }
    for (int off = 16; off > 0; off >>= 1) {
      ff += __shfl_xor_sync(0xffffffffu, ff, off);
      gg += __shfl_xor_sync(0xffffffffu, gg, off);
      fg += __shfl_xor_sync(0xffffffffu, fg, off);
    }
    if (lane == 0) {
      const A nfr = sqrt(ff), ngr = sqrt(gg);
      const A nf = max(nfr, A(kEps)), ng = max(ngr, A(kEps));
      const A ab = fg / (nf * ng);
      stats[3 * m] = nfr;
      stats[3 * m + 1] = ngr;
      stats[3 * m + 2] = fg;
      per[m] = (loss == 0 ? A(1) - ab : ff / (nf * nf) + gg / (ng * ng) - A(2) * ab) * (w ? w[m] : A(1));
    }
  }
}

// loss = sum(per) / sum(w) (w = 1 without weights), fixed reduction tree.
template <typename A>
__global__ void mean_kernel(const A* __restrict__ per, const A* __restrict__ w, int64_t M,
                            A* __restrict__ out) {
  __shared__ A smem[64];
  A v[2] = {0, 0};
  for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
    v[0] += per[m];
    v[1] += w ? w[m] : A(1);
  }
  block_sum(v, smem);
  if (threadIdx.x == 0) *out = v[1] != A(0) ? v[0] / v[1] : A(0);
}

template <typename A>
__global__ void coef_kernel(const A* __restrict__ grad_loss, const A* __restrict__ stats,
                            const A* __restrict__ w, const A* __restrict__ wsum, int64_t M,
                            int loss, A* __restrict__ coef) {
  // a grid-stride loop: grid_for caps the grid (2^28 threads), pairs may be more
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
       m += int64_t(gridDim.x) * blockDim.x) {
    const A total = w ? wsum[0] : A(M);
    const A scale = total != A(0) ? grad_loss[0] * (w ? w[m] : A(1)) / total : A(0);
    const A nfr = stats[3 * m], ngr = stats[3 * m + 1], fg = stats[3 * m + 2];
    const A nf = max(nfr, A(kEps)), ng = max(ngr, A(kEps));
    const A p = loss == 0 ? A(0) : A(2), q = loss == 0 ? A(-1) : A(-2);
    const A ab = fg / (nf * ng);
    const A sa = nfr > A(kEps) ? p * nfr * nfr / (nf * nf) + q * ab : A(0);
    const A sb = ngr > A(kEps) ? p * ngr * ngr / (ng * ng) + q * ab : A(0);
    coef[4 * m] = scale * (p - sa) / (nf * nf);
    coef[4 * m + 1] = scale * q / (nf * ng);
    coef[4 * m + 2] = scale * (p - sb) / (ng * ng);
    coef[4 * m + 3] = scale * q / (nf * ng);
  }
}

// A bound on the terms a pair adds to its pixels: max over its in-image taps of the weight,
// times |coef_f| |f| + |coef_g| |g| (no channel of df = coef_f f + coef_g g exceeds that: a
// channel is at most its vector's norm, saved in stats). 0 for a pair with no tap in the image,
// however large its coefficients (f = 0 there, and nf clamped to 1e-12 makes coef_g enormous).
// NaN, which sends the caller to the sort + ordered sums, for a pair in the image whose f or g
// has a norm at or below the clamp with a nonzero coefficient: its norm may have underflowed
// (squares below 1e-38), so the product no longer bounds the term, and its gradient, ~1e12
// times the others, would make the common unit too coarse for every other pixel.
__global__ void distill_bound_kernel(const float* __restrict__ xy, const float* __restrict__ coef,
                                     const float* __restrict__ stats, SampleArgs a,
                                     float* __restrict__ bound) {
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < a.M;
       m += int64_t(gridDim.x) * blockDim.x) {
    const Taps<float> tp = sample_taps<float>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
    bool in_image = false;
    float w = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (tp.offset[c] < 0) continue;
      in_image = true;
      w = max(w, tp.weight[c]);
    }
    const float cf = coef[4 * m], cg = coef[4 * m + 1], nf = stats[3 * m], ng = stats[3 * m + 1];
    const bool clamped = (nf <= float(kEps) && cf != 0.0f) || (ng <= float(kEps) && cg != 0.0f);
    const float b = fabsf(cf) * nf + fabsf(cg) * ng;  // NaN stays NaN: the caller falls back
    bound[m] = !in_image ? 0.0f : (clamped ? NAN : w * b);
  }
}

template <typename F>
__global__ void distill_grad_points_kernel(const acc_t<F>* __restrict__ g, RowLayout pl,
                                           const F* __restrict__ f,
                                           const int64_t* __restrict__ idx,
                                           const acc_t<F>* __restrict__ xy,
                                           const acc_t<F>* __restrict__ coef, SampleArgs a,
                                           acc_t<F>* __restrict__ out, RowLayout ol) {
  using A = acc_t<F>;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < a.M * a.D;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = t / a.D, d = t % a.D;
    const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
    const A fv = sample_one(f, tp, image_of(idx, m, a.per_image), d, a);
    out[ol.base(m) + d * ol.sD] = coef[4 * m + 2] * g[pl.base(m) + d * pl.sD] + coef[4 * m + 3] * fv;
  }
}

// The feature gradient of the distillation loss by a scatter (FloatAdd: float atomics; FixedAdd:
// the deterministic fixed-point sums, as in scatter_kernel).
template <typename F, typename Out, typename Add>
__global__ void distill_atomic_kernel(const acc_t<F>* __restrict__ g, RowLayout pl,
                                      const F* __restrict__ f,
                                      const int64_t* __restrict__ idx,
                                      const acc_t<F>* __restrict__ xy,
                                      const acc_t<F>* __restrict__ coef, SampleArgs a,
                                      Out* __restrict__ gacc, Add add) {
  using A = acc_t<F>;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < a.M * a.D;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = t / a.D, d = t % a.D;
    // A zero-weight pair (an invalid pixel) adds nothing, as on the CPU (not even a NaN).
    if (coef[4 * m] == A(0) && coef[4 * m + 1] == A(0)) continue;
    const int64_t n = image_of(idx, m, a.per_image);
    const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
    const A df = coef[4 * m] * sample_one(f, tp, n, d, a) + coef[4 * m + 1] * g[pl.base(m) + d * pl.sD];
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (tp.offset[c] >= 0) add(gacc, grad_pointer(n, d, tp.offset[c], a), tp.weight[c] * df);
  }
}

template <typename F>
__global__ void distill_sorted_kernel(const acc_t<F>* __restrict__ g, RowLayout pl,
                                      const F* __restrict__ f,
                                      const int64_t* __restrict__ idx,
                                      const acc_t<F>* __restrict__ xy,
                                      const acc_t<F>* __restrict__ coef, SampleArgs a,
                                      const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ targets,
                                      const int64_t* __restrict__ starts,
                                      const int64_t* __restrict__ counts, int64_t segments,
                                      acc_t<F>* __restrict__ gacc) {
  using A = acc_t<F>;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < segments * a.D;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t sidx = t / a.D, d = t % a.D;
    const int64_t target = targets[sidx];
    if (target < 0) continue;
    A acc = 0;
    for (int64_t j = starts[sidx]; j < starts[sidx] + counts[sidx]; ++j) {
      const int64_t e = order[j];
      const int64_t m = e >> 2;
      if (coef[4 * m] == A(0) && coef[4 * m + 1] == A(0)) continue;  // zero weight, as above
      const int c = static_cast<int>(e & 3);
      const Taps<A> tp = sample_taps<A>(xy[2 * m], xy[2 * m + 1], a.H, a.W, a.mode);
      const A df = coef[4 * m] * sample_one(f, tp, image_of(idx, m, a.per_image), d, a) +
                   coef[4 * m + 1] * g[pl.base(m) + d * pl.sD];
      acc += tp.weight[c] * df;
    }
    const int64_t HW = a.H * a.W;
    gacc[grad_pointer(target / HW, d, target % HW, a)] = acc;
  }
}

}  // namespace


cudaError_t sample_points(const void* features, DType dtype, const int64_t* image_index,
                          const void* xy, const SampleArgs& a, void* out, cudaStream_t stream) {
  if (a.M * a.D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    if (tiled(a)) {
      forward_tiled_kernel<F><<<grid_for(ceil_div(a.M, kTileP) * ceil_div(a.D, kTileD) * kThreads),
                               dim3(kTileP, kTileRows), 0, stream>>>(
          static_cast<const F*>(features), image_index, static_cast<const acc_t<F>*>(xy), a,
          static_cast<F*>(out));
      return cudaGetLastError();
    }
    forward_kernel<F><<<grid_for(a.M * a.D), kThreads, 0, stream>>>(
        static_cast<const F*>(features), image_index, static_cast<const acc_t<F>*>(xy), a,
        static_cast<F*>(out));
    return cudaGetLastError();
  });
}

cudaError_t sample_points_backward_atomic(const void* grad, DType dtype,
                                          const int64_t* image_index, const void* xy,
                                          const SampleArgs& a, void* gacc, cudaStream_t stream) {
  if (a.M * a.D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<acc_t<F>, float>) {
      if (a.D % 4 == 0 && a.gD == 1 && a.gW % 4 == 0 && a.gH % 4 == 0 && a.gN % 4 == 0 &&
          aligned16(gacc) && device_has_vector_atomics()) {
        scatter4_kernel<F><<<grid_for(a.M * a.D / 4), kThreads, 0, stream>>>(
            static_cast<const F*>(grad), image_index, static_cast<const float*>(xy), a,
            static_cast<float*>(gacc));
        return cudaGetLastError();
      }
    }
    scatter_kernel<F, acc_t<F>, FloatAdd><<<grid_for(a.M * a.D), kThreads, 0, stream>>>(
        static_cast<const F*>(grad), image_index, static_cast<const acc_t<F>*>(xy), a,
        static_cast<acc_t<F>*>(gacc), FloatAdd{});
    return cudaGetLastError();
  });
}

cudaError_t sample_points_backward_fixed(const void* grad, DType dtype, const int64_t* image_index,
                                         const void* xy, const SampleArgs& a, double inv_unit,
                                         int64_t* gfix, cudaStream_t stream) {
  if (dtype == DType::kFloat64) return cudaErrorInvalidValue;
  if (a.M * a.D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    scatter_kernel<F, unsigned long long, FixedAdd><<<grid_for(a.M * a.D), kThreads, 0, stream>>>(
        static_cast<const F*>(grad), image_index, static_cast<const acc_t<F>*>(xy), a,
        reinterpret_cast<unsigned long long*>(gfix), FixedAdd{inv_unit});
    return cudaGetLastError();
  });
}

cudaError_t fixed_to_grad(const int64_t* gfix, int64_t N, int64_t HW, int64_t D, double unit,
                          bool planar, DType dtype, void* out, cudaStream_t stream) {
  if (dtype == DType::kFloat64) return cudaErrorInvalidValue;
  if (N * HW * D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    if constexpr (!std::is_same_v<F, double>) {
      if (planar) {
        fixed_to_planar_kernel<F><<<grid_for(N * ceil_div(HW, kTileP) * ceil_div(D, kTileD) * kThreads),
                                    dim3(kTileP, kTileRows), 0, stream>>>(gfix, N, HW, D, unit,
                                                                         static_cast<F*>(out));
      } else {
        fixed_to_grad_kernel<F><<<grid_for(N * HW * D), kThreads, 0, stream>>>(
            gfix, N * HW * D, unit, static_cast<F*>(out));
      }
    }
    return cudaGetLastError();
  });
}

cudaError_t sample_points_tap_keys(const int64_t* image_index, const void* xy, DType acc_dtype,
                                   const SampleArgs& a, int64_t* keys, cudaStream_t stream) {
  if (a.M == 0) return cudaSuccess;
  if (acc_dtype == DType::kFloat64) {
    tap_keys_kernel<double><<<grid_for(a.M), kThreads, 0, stream>>>(image_index, static_cast<const double*>(xy), a, keys);
  } else {
    tap_keys_kernel<float><<<grid_for(a.M), kThreads, 0, stream>>>(image_index, static_cast<const float*>(xy), a, keys);
  }
  return cudaGetLastError();
}

cudaError_t sample_points_segment_sum(const void* grad, DType dtype, const int64_t* image_index,
                                      const void* xy, const SampleArgs& a, const int64_t* order,
                                      const int64_t* targets, const int64_t* starts,
                                      const int64_t* counts, int64_t segments, void* gacc,
                                      cudaStream_t stream) {
  if (segments * a.D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    segment_sum_kernel<F><<<grid_for(segments * a.D), kThreads, 0, stream>>>(
        static_cast<const F*>(grad), image_index, static_cast<const acc_t<F>*>(xy), a, order,
        targets, starts, counts, segments, static_cast<acc_t<F>*>(gacc));
    return cudaGetLastError();
  });
}

cudaError_t sample_points_backward_xy(const void* grad, const void* features, DType dtype,
                                      const int64_t* image_index, const void* xy,
                                      const SampleArgs& a, void* gxy, cudaStream_t stream) {
  if (a.M == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    if (tiled(a)) {
      backward_xy_tiled_kernel<F><<<grid_for(ceil_div(a.M, kTileP) * kThreads), dim3(kTileP, kTileRows), 0, stream>>>(
          static_cast<const F*>(grad), static_cast<const F*>(features), image_index,
          static_cast<const acc_t<F>*>(xy), a, static_cast<acc_t<F>*>(gxy));
      return cudaGetLastError();
    }
    backward_xy_kernel<F><<<grid_for(a.M * 32), kThreads, 0, stream>>>(
        static_cast<const F*>(grad), static_cast<const F*>(features), image_index,
        static_cast<const acc_t<F>*>(xy), a, static_cast<acc_t<F>*>(gxy));
    return cudaGetLastError();
  });
}

cudaError_t distill_forward(const void* point_features, const RowLayout& pl, const void* weights,
                            const void* features, DType dtype, const int64_t* image_index,
                            const void* xy, const SampleArgs& a, int loss, void* stats,
                            void* per_pair, void* loss_out, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<F>;
    if (a.M > 0) {
      distill_forward_kernel<F><<<grid_for(a.M * 32), kThreads, 0, stream>>>(
          static_cast<const A*>(point_features), pl, static_cast<const A*>(weights),
          static_cast<const F*>(features), image_index,
          static_cast<const A*>(xy), a, loss, static_cast<A*>(stats), static_cast<A*>(per_pair));
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    mean_kernel<A><<<1, kThreads, 0, stream>>>(static_cast<const A*>(per_pair),
                                              static_cast<const A*>(weights), a.M,
                                              static_cast<A*>(loss_out));
    return cudaGetLastError();
  });
}

cudaError_t distill_coefficients(const void* grad_loss, const void* stats, const void* weights,
                                 const void* weight_sum, DType acc_dtype, int64_t M, int loss,
                                 void* coef, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (acc_dtype == DType::kFloat64) {
    coef_kernel<double><<<grid_for(M), kThreads, 0, stream>>>(static_cast<const double*>(grad_loss),
        static_cast<const double*>(stats), static_cast<const double*>(weights),
        static_cast<const double*>(weight_sum), M, loss, static_cast<double*>(coef));
  } else {
    coef_kernel<float><<<grid_for(M), kThreads, 0, stream>>>(static_cast<const float*>(grad_loss),
        static_cast<const float*>(stats), static_cast<const float*>(weights),
        static_cast<const float*>(weight_sum), M, loss, static_cast<float*>(coef));
  }
  return cudaGetLastError();
}

cudaError_t distill_grad_points(const void* point_features, const RowLayout& pl,
                                const void* features, DType dtype, const int64_t* image_index,
                                const void* xy, const void* coef, const SampleArgs& a, void* grad,
                                const RowLayout& gl, cudaStream_t stream) {
  if (a.M * a.D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<F>;
    distill_grad_points_kernel<F><<<grid_for(a.M * a.D), kThreads, 0, stream>>>(
        static_cast<const A*>(point_features), pl, static_cast<const F*>(features), image_index,
        static_cast<const A*>(xy), static_cast<const A*>(coef), a, static_cast<A*>(grad), gl);
    return cudaGetLastError();
  });
}

cudaError_t distill_grad_features_atomic(const void* point_features, const RowLayout& pl,
                                         const void* features, DType dtype,
                                         const int64_t* image_index, const void* xy,
                                         const void* coef, const SampleArgs& a, void* gacc,
                                         cudaStream_t stream) {
  if (a.M * a.D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<F>;
    distill_atomic_kernel<F, A, FloatAdd><<<grid_for(a.M * a.D), kThreads, 0, stream>>>(
        static_cast<const A*>(point_features), pl, static_cast<const F*>(features), image_index,
        static_cast<const A*>(xy), static_cast<const A*>(coef), a, static_cast<A*>(gacc), FloatAdd{});
    return cudaGetLastError();
  });
}

cudaError_t distill_term_bound(const void* xy, const void* coef, const void* stats,
                               const SampleArgs& a, void* bound, cudaStream_t stream) {
  if (a.M == 0) return cudaSuccess;
  distill_bound_kernel<<<grid_for(a.M), kThreads, 0, stream>>>(
      static_cast<const float*>(xy), static_cast<const float*>(coef),
      static_cast<const float*>(stats), a, static_cast<float*>(bound));
  return cudaGetLastError();
}

cudaError_t distill_grad_features_fixed(const void* point_features, const RowLayout& pl,
                                        const void* features, DType dtype,
                                        const int64_t* image_index, const void* xy,
                                        const void* coef, const SampleArgs& a, double inv_unit,
                                        int64_t* gfix, cudaStream_t stream) {
  if (dtype == DType::kFloat64) return cudaErrorInvalidValue;
  if (a.M * a.D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<F>;
    if constexpr (std::is_same_v<A, float>) {
      distill_atomic_kernel<F, unsigned long long, FixedAdd><<<grid_for(a.M * a.D), kThreads, 0, stream>>>(
          static_cast<const A*>(point_features), pl, static_cast<const F*>(features), image_index,
          static_cast<const A*>(xy), static_cast<const A*>(coef), a,
          reinterpret_cast<unsigned long long*>(gfix), FixedAdd{inv_unit});
    }
    return cudaGetLastError();
  });
}

cudaError_t distill_grad_features_sorted(const void* point_features, const RowLayout& pl,
                                         const void* features, DType dtype,
                                         const int64_t* image_index, const void* xy,
                                         const void* coef, const SampleArgs& a,
                                         const int64_t* order, const int64_t* targets,
                                         const int64_t* starts, const int64_t* counts,
                                         int64_t segments, void* gacc, cudaStream_t stream) {
  if (segments * a.D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<F>;
    distill_sorted_kernel<F><<<grid_for(segments * a.D), kThreads, 0, stream>>>(
        static_cast<const A*>(point_features), pl, static_cast<const F*>(features), image_index,
        static_cast<const A*>(xy), static_cast<const A*>(coef), a, order, targets, starts, counts,
        segments, static_cast<A*>(gacc));
    return cudaGetLastError();
  });
}

}  // namespace pyssl::cuda
