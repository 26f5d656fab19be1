// DINO-loss CUDA kernels: the same chunked, one-pass algorithm as the CPU implementation
// (csrc/ops/dino_loss.cpp), with fixed reduction trees (bitwise repeatable).
//
// Forward: every warp owns a statistics chunk of kWarpChunk prototypes (each lane kWarpElems of
// them) for a group of images; for every image it keeps the teacher's exp(a - m) values in
// registers and streams the student crops past them, producing per-(row, chunk) max / sum-exp
// statistics and teacher-student dot products with warp shuffles only (no block barriers, so a
// warp's loads of the next row need not wait for other warps). A merge kernel (one block per
// image, a warp per row or pair) combines the chunks; the last of its blocks to finish sums the
// loss over images, and its extra blocks finish the teacher mean. Two launches in all: the
// final sum and the column sums were launches of their own (five in all), each a few us of a
// K = 8192 forward whose inputs take ~5 us to read. The first version reduced over
// 1024-prototype block chunks with two block barriers per row; at B = 32 its 64-512 blocks each
// ran ~56 rows one after another (0.18 ms at K = 8192 on an H100, 0.08 ms of which the
// bandwidth floor would allow at K = 65536).
// Backward: one block per (image, chunk), no reductions: q from the teacher row and its saved
// log-sum-exp, p from the student row and its saved log-sum-exp.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda_common.cuh"
#include "kernels/dino_loss.h"

namespace pyssl::cuda {
namespace {

constexpr int kThreads = 256;                  // backward and log-sum-exp kernels
constexpr int kElems = 4;
constexpr int64_t kChunk = kThreads * kElems;  // prototypes per backward block
constexpr int kWarpElems = 8;                  // prototypes per lane in the forward
constexpr int64_t kWarpChunk = 32 * kWarpElems;  // prototypes per forward statistics chunk
constexpr int kForwardThreads = 128;           // 4 warps, 4 chunks, per forward block
constexpr int64_t kBlockSpan = kWarpChunk * (kForwardThreads / 32);
constexpr int64_t kMaxGroup = 4;               // images per forward warp, at most
// The forward can keep the teacher's column sums per group of images, [B / group, K] in the
// workspace, while that holds at most kMaxColsum elements (32 MB in fp32; DINO at B = 64,
// K = 65536 needs 2M). Otherwise (one image per group, or iBOT's thousands of masked patches,
// which would need ~400 MB at M = 6000) the teacher's columns are summed from its rows, reading
// it once more (column_chunks).
constexpr int64_t kMaxColsum = int64_t{1} << 23;

int64_t stat_chunks(const DinoArgs& a) { return ceil_div(a.K, kWarpChunk); }

// Images per forward warp: one while the grid has fewer warps than an H100 holds at once (132
// SMs x 64), so that every row's loads are in flight together; more only for larger batches.
int64_t forward_group(const DinoArgs& a) {
  return std::clamp<int64_t>(a.B * stat_chunks(a) / 8192, 1, kMaxGroup);
}

bool fused_colsum(const DinoArgs& a) {
  const int64_t g = forward_group(a);
  return g > 1 && ceil_div(a.B, g) * a.K <= kMaxColsum;
}

// Without fused column sums, the teacher mean sums its T * B rows in chunks of at most
// kChunkRows rows (at least kColChunks chunks; extra blocks of the forward kernel), then the
// merge kernel's extra blocks sum the chunks in order: one thread per column looping over every
// row left a K = 8192 grid of 32 blocks waiting on 64 dependent-latency loads each. Chunks of
// bounded length keep iBOT's thousands of rows (375 per chunk at M = 6000 with 16 chunks) from
// leaving a tail of long partial sums; their partial sums stay within kMaxColsum elements.
// Few rows: the merge kernel's blocks sum the rows.
constexpr int64_t kColChunks = 16;
constexpr int64_t kChunkRows = 32;
int64_t column_chunks(const DinoArgs& a) {
  const int64_t rows = a.T * a.B;
  if (fused_colsum(a) || rows < 4 * kColChunks) return 1;
  const int64_t room = std::max<int64_t>(kColChunks, kMaxColsum / a.K);
  return std::clamp<int64_t>(ceil_div(rows, kChunkRows), kColChunks, room);
}

template <typename T> __device__ __forceinline__ acc_t<T> neg_inf() { return -INFINITY; }

// Online log-sum-exp: (m, z) with z = sum exp(y - m); NaN and +inf poison m (a NaN result, as
// on the CPU: "+inf logits give NaN"), -inf terms add nothing.
template <typename A>
__device__ __forceinline__ void lse_push(A& m, A& z, A y) {
  if (y != y || y == A(INFINITY)) {
    m = A(NAN);
  } else if (y > m) {
    z = z * device_exp(m - y) + A(1);
    m = y;
  } else if (y > A(-INFINITY)) {
    z += device_exp(y - m);
  }
}

// Four elements of T in one vector load or store: 16 bytes of float, 8 of half / bfloat16
// (packed into a uint2 by value, not through a pointer of another type). The store goes through
// __stwb: a plain assignment of a float4 built in registers came out as four scalar stores.
__device__ __forceinline__ void load4(const float* p, float (&out)[4]) {
  PYSSL_ASSUME_ALIGNED(p, 16);
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

__device__ __forceinline__ void store4(float* p, const float (&in)[4]) {
  PYSSL_ASSUME_ALIGNED(p, 16);
  __stwb(reinterpret_cast<float4*>(p), make_float4(in[0], in[1], in[2], in[3]));
}

__device__ __forceinline__ float half_bits_to_acc(unsigned short b, __half) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ float half_bits_to_acc(unsigned short b, __nv_bfloat16) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}
__device__ __forceinline__ unsigned acc_to_half_bits(float x, __half) {
  return __half_as_ushort(__float2half_rn(x));
}
__device__ __forceinline__ unsigned acc_to_half_bits(float x, __nv_bfloat16) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

template <typename T>  // __half or __nv_bfloat16
__device__ __forceinline__ void load4(const T* p, float (&out)[4]) {
  PYSSL_ASSUME_ALIGNED(p, 8);
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  out[0] = half_bits_to_acc(static_cast<unsigned short>(v.x & 0xffffu), T());
  out[1] = half_bits_to_acc(static_cast<unsigned short>(v.x >> 16), T());
  out[2] = half_bits_to_acc(static_cast<unsigned short>(v.y & 0xffffu), T());
  out[3] = half_bits_to_acc(static_cast<unsigned short>(v.y >> 16), T());
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&in)[4]) {
  PYSSL_ASSUME_ALIGNED(p, 8);
  __stwb(reinterpret_cast<uint2*>(p),
         make_uint2(acc_to_half_bits(in[0], T()) | (acc_to_half_bits(in[1], T()) << 16),
                    acc_to_half_bits(in[2], T()) | (acc_to_half_bits(in[3], T()) << 16)));
}

// A lane's kWarpElems prototypes of its warp's chunk, at base + lane_offset<kVec>(j):
// strided (j * 32: each j is 32 adjacent prototypes over the warp) or, with kVec (K % 4 == 0,
// aligned rows), two groups of four adjacent ones (each group of 32 lanes: 128 adjacent), read
// with one vector load per group.
template <bool kVec>
__device__ __forceinline__ constexpr int64_t lane_offset(int j) {
  return kVec ? (j >> 2) * 128 + (j & 3) : int64_t{32} * j;
}

template <bool kVec, typename T>
__device__ __forceinline__ void load_lane(const T* p, const bool (&ok)[kWarpElems],
                                          acc_t<T> (&out)[kWarpElems]) {
  if constexpr (kVec) {
#pragma unroll
    for (int h = 0; h < kWarpElems / 4; ++h) {
      acc_t<T> v[4] = {};
      if (ok[4 * h]) load4(p + 128 * h, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) out[4 * h + q] = v[q];
    }
  } else {
#pragma unroll
    for (int j = 0; j < kWarpElems; ++j) out[j] = ok[j] ? to_acc(p[32 * j]) : acc_t<T>(0);
  }
}

// One block's share of the chunked teacher mean: for the kBlockSpan prototypes of block row
// blockIdx.y, the sum of teacher rows [c * chunk, (c + 1) * chunk) in row order (0 for an empty
// chunk), into partial[c, k]. Each thread keeps kSpan columns, so a row's kSpan loads are in
// flight together.
template <typename T>
__device__ __forceinline__ void column_partial(const T* __restrict__ x, int64_t rows,
                                               int64_t chunk, int64_t K, int64_t c,
                                               acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  constexpr int kSpan = static_cast<int>(kBlockSpan / kForwardThreads);
  const int64_t k0 = int64_t(blockIdx.y) * kBlockSpan + threadIdx.x;
  const int64_t r0 = c * chunk, r1 = min(rows, r0 + chunk);
  A s[kSpan];
#pragma unroll
  for (int j = 0; j < kSpan; ++j) s[j] = 0;
  for (int64_t r = r0; r < r1; ++r) {
#pragma unroll
    for (int j = 0; j < kSpan; ++j) {
      const int64_t k = k0 + int64_t(j) * kForwardThreads;
      if (k < K) s[j] += to_acc(x[r * K + k]);
    }
  }
#pragma unroll
  for (int j = 0; j < kSpan; ++j) {
    const int64_t k = k0 + int64_t(j) * kForwardThreads;
    if (k < K) partial[c * K + k] = s[j];
  }
}

template <typename T, int kMaxT, bool kVec>
__global__ void __launch_bounds__(kForwardThreads)
dino_forward_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                    const acc_t<T>* __restrict__ center, int64_t B, int S, int Tc, int64_t K,
                    int64_t nk, int64_t group_size, acc_t<T> inv_ts, acc_t<T> inv_tt,
                    acc_t<T>* __restrict__ tm, acc_t<T>* __restrict__ tz,
                    acc_t<T>* __restrict__ sm, acc_t<T>* __restrict__ sz,
                    acc_t<T>* __restrict__ dots, acc_t<T>* __restrict__ colsum,
                    int64_t chunks, int64_t col_chunk, acc_t<T>* __restrict__ partial,
                    unsigned* __restrict__ merged) {
  using A = acc_t<T>;
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *merged = 0u;  // dino_merge_kernel's count
  if (blockIdx.x < chunks) {
    // The first blocks of each block row (chunked teacher mean only; first, so that they start
    // early rather than trail the grid): partial[c, k] = sum of the teacher's rows
    // [c * col_chunk, (c + 1) * col_chunk) in order, c = blockIdx.x, for this block's
    // kBlockSpan prototypes; the merge kernel sums the chunks in order.
    column_partial(teacher, Tc * B, col_chunk, K, int64_t(blockIdx.x), partial);
    return;  // the whole block: no barrier follows
  }
  const int64_t group = int64_t(blockIdx.x) - chunks;  // images on x (up to 2^31 - 1 blocks)
  const int64_t kc = int64_t(blockIdx.y) * (kForwardThreads / 32) + (threadIdx.x >> 5);
  if (kc >= nk) return;  // a whole warp: no block-wide synchronisation follows
  // The lane's prototypes: k0 + lane_offset<kVec>(j). Offsets from one base, not an index per
  // j, keep registers for the values.
  const int lane = threadIdx.x & 31;
  const int64_t k0 = kc * kWarpChunk + (kVec ? 4 * lane : lane);
  const bool lead = lane == 0;
  // valid: j < nv (strided: each j is 32 further) or whole groups of four (kVec, K % 4 == 0)
  const int64_t left = K - k0;
  const int nv = left <= 0 ? 0
                 : kVec    ? (left > 128 ? kWarpElems : 4)
                           : static_cast<int>(min(int64_t{kWarpElems}, (left + 31) / 32));
  bool ok[kWarpElems];
  A cen[kWarpElems], col[kWarpElems];
#pragma unroll
  for (int j = 0; j < kWarpElems; ++j) {
    ok[j] = j < nv;
    col[j] = 0;
  }
  load_lane<kVec>(center + k0, ok, cen);
  const int64_t b1 = min(B, (group + 1) * group_size);
  for (int64_t b = group * group_size; b < b1; ++b) {
    A e[kMaxT][kWarpElems];
#pragma unroll
    for (int i = 0; i < kMaxT; ++i) {
      if (i >= Tc) break;
      const int64_t row = i * B + b;
      A t[kWarpElems];
      load_lane<kVec>(teacher + row * K + k0, ok, t);
      A m = neg_inf<T>();
#pragma unroll
      for (int j = 0; j < kWarpElems; ++j) {
        col[j] += t[j];
        e[i][j] = ok[j] ? (t[j] - cen[j]) * inv_tt : neg_inf<T>();
        m = nan_max(m, e[i][j]);
      }
      m = warp_max(m);
      const A shift = m == neg_inf<T>() ? A(0) : m;
      A z = 0;
#pragma unroll
      for (int j = 0; j < kWarpElems; ++j) {
        e[i][j] = ok[j] ? device_exp(e[i][j] - shift) : A(0);
        z += e[i][j];
      }
      z = warp_sum(z);
      if (lead) {
        tm[row * nk + kc] = m;
        tz[row * nk + kc] = z;
      }
    }
    for (int v = 0; v < S; ++v) {
      const int64_t row = v * B + b;
      A s[kWarpElems];
      load_lane<kVec>(student + row * K + k0, ok, s);
      A m = neg_inf<T>();
#pragma unroll
      for (int j = 0; j < kWarpElems; ++j) {
        if (ok[j]) m = nan_max(m, s[j] * inv_ts);
      }
      m = warp_max(m);
      const A shift = m == neg_inf<T>() ? A(0) : m;
      A acc[kMaxT + 1];
#pragma unroll
      for (int n = 0; n <= kMaxT; ++n) acc[n] = 0;
#pragma unroll
      for (int j = 0; j < kWarpElems; ++j) {
        if (ok[j]) acc[kMaxT] += device_exp(s[j] * inv_ts - shift);
#pragma unroll
        for (int i = 0; i < kMaxT; ++i)
          if (i < Tc) acc[i] += e[i][j] * s[j];
      }
#pragma unroll
      for (int n = 0; n <= kMaxT; ++n)
        if (n < Tc || n == kMaxT) acc[n] = warp_sum(acc[n]);  // Tc is uniform over the warp
      if (lead) {
        sm[row * nk + kc] = m;
        sz[row * nk + kc] = acc[kMaxT];
#pragma unroll
        for (int i = 0; i < kMaxT; ++i)
          if (i < Tc) dots[((int64_t(i) * S + v) * B + b) * nk + kc] = acc[i];
      }
    }
  }
  if (colsum) {
#pragma unroll
    for (int j = 0; j < kWarpElems; ++j)
      if (ok[j]) colsum[group * K + k0 + lane_offset<kVec>(j)] = col[j];
  }
}

constexpr int kMergeThreads = 256;

// Merges the per-chunk statistics of one image (one block per image): loss_b = w_b * sum over
// valid pairs of CE. Each warp merges whole rows (the S student and T teacher rows), then whole
// (teacher, student) pairs, its lanes striding over the nk chunks; each warp adds its pairs'
// terms in order and thread 0 adds the warps' sums in order. One thread per image looping over
// every chunk of every row and pair (the first version) took about 0.5 ms at K=65536 on an
// H100, longer than the rest of the forward.
// The block that finishes last (the count `merged`, zeroed by the forward kernel) sums loss_b
// over the images: lane l adds images l, l + 32, ... in order, then a fixed butterfly, so the
// sum is repeatable whichever block is last. Blocks B, B + 1, ... average the teacher's columns
// (teacher mean) from the per-group column sums, the chunks' partial sums or the teacher rows
// themselves (col_acc or col_in, col_rows rows of K), each in row order.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
dino_merge_kernel(const acc_t<T>* __restrict__ tm, const acc_t<T>* __restrict__ tz,
                  const acc_t<T>* __restrict__ sm, const acc_t<T>* __restrict__ sz,
                  const acc_t<T>* __restrict__ dots, const acc_t<T>* __restrict__ weights,
                  int64_t B, int S, int Tc, int64_t nk, double inv_ts, bool skip,
                  acc_t<T>* __restrict__ student_lse, acc_t<T>* __restrict__ teacher_lse,
                  double* __restrict__ loss_b, unsigned* __restrict__ merged, int64_t n_terms,
                  acc_t<T>* __restrict__ loss, const acc_t<T>* __restrict__ col_acc,
                  const T* __restrict__ col_in, int64_t col_rows, int64_t K, double inv_rows,
                  acc_t<T>* __restrict__ mean) {
  using A = acc_t<T>;
  if (blockIdx.x >= B) {  // a teacher-mean block: the whole block returns, no barrier follows
    const int64_t k = (int64_t(blockIdx.x) - B) * blockDim.x + threadIdx.x;
    if (k >= K) return;
    A c = 0;
    if (col_acc) {
#pragma unroll 8
      for (int64_t r = 0; r < col_rows; ++r) c += col_acc[r * K + k];
    } else {
#pragma unroll 8
      for (int64_t r = 0; r < col_rows; ++r) c += to_acc(col_in[r * K + k]);
    }
    mean[k] = A(double(c) * inv_rows);
    return;
  }
  // Tc <= 8 (dino_forward); blockDim.x <= kMergeThreads, a multiple of 32 (warp 0 is whole)
  __shared__ double t_shift[8], t_z[8], part[kMergeThreads / 32];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  // Rows: r < S is student crop r, r >= S teacher crop r - S.
  for (int r = warp; r < S + Tc; r += nwarps) {
    const bool student = r < S;
    const int64_t row = int64_t(student ? r : r - S) * B + b;
    const A* mx = (student ? sm : tm) + row * nk;
    const A* zz = (student ? sz : tz) + row * nk;
    double M = -INFINITY;
    for (int64_t c = lane; c < nk; c += 32) M = nan_max(M, double(mx[c]));
    M = warp_max(M);
    const double shift = M == -INFINITY ? 0.0 : M;
    double Z = 0;
    for (int64_t c = lane; c < nk; c += 32) Z += double(zz[c]) * exp(double(mx[c]) - shift);
    Z = warp_sum(Z);
    if (lane == 0) {
      const A l = A(shift + log(Z));
      if (student) {
        student_lse[row] = l;
      } else {
        teacher_lse[row] = l;
        t_shift[r - S] = shift;
        t_z[r - S] = Z;
      }
    }
  }
  __syncthreads();  // the block's global writes (student_lse) are visible to it after this
  double acc = 0;
  for (int p = warp; p < Tc * S; p += nwarps) {
    const int i = p / S, v = p % S;
    if (skip && v == i) continue;
    const A* mx = tm + (int64_t(i) * B + b) * nk;
    const A* d = dots + ((int64_t(i) * S + v) * B + b) * nk;
    const double shift = t_shift[i];
    double num = 0;
    for (int64_t c = lane; c < nk; c += 32) num += double(d[c]) * exp(double(mx[c]) - shift);
    num = warp_sum(num);
    acc += double(student_lse[int64_t(v) * B + b]) - num / t_z[i] * inv_ts;
  }
  if (lane == 0) part[warp] = acc;
  __syncthreads();
  if (warp != 0) return;
  int last = 0;
  if (lane == 0) {
    double total = 0;
    for (int w = 0; w < nwarps; ++w) total += part[w];
    loss_b[b] = total * (weights ? double(weights[b]) : 1.0 / double(B));
    __threadfence();  // loss_b[b] reaches every block before the count says it is there
    last = atomicAdd(merged, 1u) == static_cast<unsigned>(B - 1);
    if (last) __threadfence();  // ... and the other blocks' loss_b before this warp reads it
  }
  __syncwarp();  // orders lane 0's fence before the other lanes' reads below
  if (!warp_max(last)) return;  // the whole warp 0 takes the same branch
  double total = 0;
  for (int64_t i = lane; i < B; i += 32) total += __ldcg(loss_b + i);  // past L1: other blocks' writes
  total = warp_sum(total);
  if (lane == 0) *loss = A(total / double(n_terms));
}

// kVec (float, half, bfloat16 with K % 4 == 0 and aligned rows): each thread's kElems = 4
// prototypes are adjacent and move in one vector load or store per row, a quarter of the
// memory instructions of the strided layout (thread t: t, t + 256, ...).
template <typename T, int kMaxT, bool kVec>
__global__ void __launch_bounds__(kThreads)
dino_backward_kernel(const acc_t<T>* __restrict__ grad_loss, const T* __restrict__ student,
                     const T* __restrict__ teacher, const acc_t<T>* __restrict__ center,
                     const acc_t<T>* __restrict__ weights, const acc_t<T>* __restrict__ slse,
                     const acc_t<T>* __restrict__ tlse, int64_t B, int S, int Tc, int64_t K,
                     int64_t n_terms, acc_t<T> inv_ts, acc_t<T> inv_tt, bool skip,
                     T* __restrict__ grad) {
  using A = acc_t<T>;
  static_assert(!kVec || kElems == 4, "vector loads move 4 elements");
  const int64_t b = blockIdx.x, kc = blockIdx.y;  // images on x (iBOT: one row per patch)
  const int64_t k0 = kc * kChunk;
  int64_t kk[kElems];
  bool ok[kElems];
  A q[kMaxT][kElems];
#pragma unroll
  for (int j = 0; j < kElems; ++j) {
    kk[j] = kVec ? k0 + 4 * threadIdx.x + j : k0 + threadIdx.x + j * kThreads;
    ok[j] = kk[j] < K;
  }
  A cen[kElems] = {};
  if constexpr (kVec) {
    if (ok[0]) load4(center + kk[0], cen);
  } else {
#pragma unroll
    for (int j = 0; j < kElems; ++j) cen[j] = ok[j] ? center[kk[j]] : A(0);
  }
#pragma unroll
  for (int i = 0; i < kMaxT; ++i) {
    if (i >= Tc) break;
    const int64_t row = i * B + b;
    const A l = tlse[row];
    A t[kElems] = {};
    if constexpr (kVec) {
      if (ok[0]) load4(teacher + row * K + kk[0], t);
    } else {
#pragma unroll
      for (int j = 0; j < kElems; ++j) t[j] = ok[j] ? to_acc(teacher[row * K + kk[j]]) : A(0);
    }
#pragma unroll
    for (int j = 0; j < kElems; ++j)
      q[i][j] = ok[j] ? device_exp((t[j] - cen[j]) * inv_tt - l) : A(0);
  }
  const A wb = weights ? weights[b] : A(1) / A(B);
  const A coef = grad_loss[0] * wb * inv_ts / A(n_terms);
  for (int v = 0; v < S; ++v) {
    const int64_t row = v * B + b;
    const A l = slse[row];
    A Q[kElems] = {};
    int n_v = 0;
#pragma unroll
    for (int i = 0; i < kMaxT; ++i) {
      if (i >= Tc) break;
      if (skip && i == v) continue;
      ++n_v;
#pragma unroll
      for (int j = 0; j < kElems; ++j) Q[j] += q[i][j];
    }
    A x[kElems] = {}, out[kElems];
    if constexpr (kVec) {
      if (!ok[0]) continue;
      load4(student + row * K + kk[0], x);
    } else {
#pragma unroll
      for (int j = 0; j < kElems; ++j) x[j] = ok[j] ? to_acc(student[row * K + kk[j]]) : A(0);
    }
#pragma unroll
    for (int j = 0; j < kElems; ++j)
      out[j] = coef * (A(n_v) * device_exp(x[j] * inv_ts - l) - Q[j]);
    if constexpr (kVec) {
      store4(grad + row * K + kk[0], out);
    } else {
#pragma unroll
      for (int j = 0; j < kElems; ++j)
        if (ok[j]) grad[row * K + kk[j]] = from_acc<T>(out[j]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
lse_rows_kernel(const T* __restrict__ x, int64_t K, const acc_t<T>* __restrict__ ro,
                const acc_t<T>* __restrict__ co, acc_t<T> scale, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  const int64_t r = blockIdx.x;
  const A rv = ro ? ro[r] : A(0);
  A m = neg_inf<T>(), z = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    lse_push(m, z, to_acc(x[r * K + k]) * scale - (co ? co[k] : A(0)) - rv);  // the CPU's order
  const A M = block_max(m, smem);
  const A shift = M == neg_inf<T>() ? A(0) : M;
  A zz[1] = {m == neg_inf<T>() ? A(0) : z * device_exp(m - shift)};
  block_sum(zz, smem);
  if (threadIdx.x == 0) out[r] = shift + log(zz[0]);
}

template <typename T>
__global__ void lse_cols_kernel(const T* __restrict__ x, int64_t R, int64_t K,
                                const acc_t<T>* __restrict__ ro, const acc_t<T>* __restrict__ co,
                                acc_t<T> scale, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= K) return;
  const A cv = co ? co[k] : A(0);
  A m = neg_inf<T>(), z = 0;
  for (int64_t r = 0; r < R; ++r) lse_push(m, z, to_acc(x[r * K + k]) * scale - cv - (ro ? ro[r] : A(0)));
  out[k] = (m == neg_inf<T>() ? m : m + log(z));
}

// Workspace layout (acc elements): per-(row, chunk) statistics, dot products, per-group column
// sums (when fused_colsum), then (at an even offset, so doubles are aligned) one double per
// image.
int64_t dino_loss_b_offset(const DinoArgs& a) {
  const int64_t nk = stat_chunks(a), groups = ceil_div(a.B, forward_group(a));
  const int64_t cols = fused_colsum(a) ? groups * a.K : (column_chunks(a) > 1 ? column_chunks(a) * a.K : 0);
  const int64_t n = 2 * a.T * a.B * nk + 2 * a.S * a.B * nk + a.T * a.S * a.B * nk + cols;
  return (n + 1) / 2 * 2;
}

// Calls launch(max_t, vec) with compile-time constants: max_t = 1, 2, 4 or 8 teacher crops
// (at least `crops`), vec = the vector layout when `vec` holds (never for double).
template <typename T, typename Launch>
void dispatch_kernel(int64_t crops, bool vec, Launch&& launch) {
  const auto with_layout = [&](auto max_t) {
    if constexpr (!std::is_same_v<T, double>) {
      if (vec) {
        launch(max_t, std::true_type{});
        return;
      }
    }
    launch(max_t, std::false_type{});
  };
  if (crops == 1) {
    with_layout(std::integral_constant<int, 1>{});
  } else if (crops == 2) {
    with_layout(std::integral_constant<int, 2>{});
  } else if (crops <= 4) {
    with_layout(std::integral_constant<int, 4>{});
  } else {
    with_layout(std::integral_constant<int, 8>{});
  }
}

template <typename T>
cudaError_t forward_typed(const void* student, const void* teacher, const void* center,
                          const void* weights, const DinoArgs& a, void* workspace, void* loss,
                          void* teacher_mean, void* student_lse, void* teacher_lse,
                          cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t nk = stat_chunks(a), group_size = forward_group(a);
  const int64_t groups = ceil_div(a.B, group_size);
  A* ws = static_cast<A*>(workspace);
  A* tm = ws;
  A* tz = tm + a.T * a.B * nk;
  A* sm = tz + a.T * a.B * nk;
  A* sz = sm + a.S * a.B * nk;
  A* dots = sz + a.S * a.B * nk;
  A* colsum = fused_colsum(a) ? dots + a.T * a.S * a.B * nk : nullptr;
  const int64_t chunks = column_chunks(a), rows = a.T * a.B;
  A* partial = chunks > 1 ? dots + a.T * a.S * a.B * nk : nullptr;  // where colsum would be
  double* loss_b = reinterpret_cast<double*>(ws + dino_loss_b_offset(a));
  auto* merged = reinterpret_cast<unsigned*>(loss_b + a.B);
  // x: (chunked teacher mean) one block per chunk of teacher rows, then the image groups
  const int64_t partial_blocks = partial ? chunks : 0;
  const dim3 grid(static_cast<unsigned>(partial_blocks + groups),
                  static_cast<unsigned>(ceil_div(a.K, kBlockSpan)));
  const auto* s = static_cast<const T*>(student);
  const auto* t = static_cast<const T*>(teacher);
  const auto* c = static_cast<const A*>(center);
  const A its = A(a.inv_student_temp), itt = A(a.inv_teacher_temp);
  const int S = static_cast<int>(a.S), Tc = static_cast<int>(a.T);
  // Vector loads need K % 4 == 0 (then every row starts as aligned as its base) and
  // 16-byte-aligned bases; never for double.
  const bool vec = a.K % 4 == 0 && aligned16(s) && aligned16(t) && aligned16(c);
  dispatch_kernel<T>(a.T, vec, [&](auto max_t, auto v) {
    dino_forward_kernel<T, decltype(max_t)::value, decltype(v)::value><<<grid, kForwardThreads, 0, stream>>>(
        s, t, c, a.B, S, Tc, a.K, nk, group_size, its, itt, tm, tz, sm, sz, dots, colsum,
        partial_blocks, ceil_div(rows, chunks), partial, merged);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // A warp per row at most: iBOT's single-crop rows (S = T = 1, B = thousands) get 2 warps.
  const int merge_threads = 32 * static_cast<int>(std::min<int64_t>(a.S + a.T, kMergeThreads / 32));
  // The teacher mean's blocks after the images': per-group column sums, chunk sums or the rows.
  const A* col_acc = colsum ? colsum : partial;
  const int64_t col_rows = colsum ? groups : (partial ? chunks : rows);
  const int64_t mean_blocks = ceil_div(a.K, int64_t{merge_threads});
  dino_merge_kernel<T><<<static_cast<unsigned>(a.B + mean_blocks), merge_threads, 0, stream>>>(
      tm, tz, sm, sz, dots, static_cast<const A*>(weights), a.B, S, Tc, nk, a.inv_student_temp,
      a.skip_same_view, static_cast<A*>(student_lse), static_cast<A*>(teacher_lse), loss_b,
      merged, a.n_terms, static_cast<A*>(loss), col_acc, col_acc ? nullptr : t, col_rows, a.K,
      1.0 / double(rows), static_cast<A*>(teacher_mean));
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* grad_loss, const void* student, const void* teacher,
                           const void* center, const void* weights, const void* slse,
                           const void* tlse, const DinoArgs& a, void* grad, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t nk = ceil_div(a.K, kChunk);
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>(nk));
  // Vector loads and stores need K % 4 == 0 (then every row starts as aligned as its base)
  // and 16-byte-aligned bases; never for double.
  const bool vec = a.K % 4 == 0 && aligned16(student) && aligned16(teacher) &&
                   aligned16(center) && aligned16(grad);
  dispatch_kernel<T>(a.T, vec, [&](auto max_t, auto v) {
    dino_backward_kernel<T, decltype(max_t)::value, decltype(v)::value><<<grid, kThreads, 0, stream>>>(
        static_cast<const A*>(grad_loss), static_cast<const T*>(student),
        static_cast<const T*>(teacher), static_cast<const A*>(center),
        static_cast<const A*>(weights), static_cast<const A*>(slse), static_cast<const A*>(tlse),
        a.B, static_cast<int>(a.S), static_cast<int>(a.T), a.K, a.n_terms, A(a.inv_student_temp),
        A(a.inv_teacher_temp), a.skip_same_view, static_cast<T*>(grad));
  });
  return cudaGetLastError();
}

}  // namespace

int64_t dino_forward_workspace(const DinoArgs& a) {
  // ... then B doubles (2 acc elements each, which also covers acc = double), then the merge
  // kernel's count of finished blocks (an unsigned; 2 acc elements keep any acc big enough)
  return dino_loss_b_offset(a) + 2 * a.B + 2;
}

cudaError_t dino_forward(const void* student, const void* teacher, DType dtype,
                         const void* center, const void* weights, const DinoArgs& a,
                         void* workspace, void* loss, void* teacher_mean, void* student_lse,
                         void* teacher_lse, cudaStream_t stream) {
  if (a.T > 8) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return forward_typed<T>(student, teacher, center, weights, a, workspace, loss, teacher_mean,
                            student_lse, teacher_lse, stream);
  });
}

cudaError_t dino_backward(const void* grad_loss, const void* student, const void* teacher,
                          DType dtype, const void* center, const void* weights,
                          const void* student_lse, const void* teacher_lse, const DinoArgs& a,
                          void* grad_student, cudaStream_t stream) {
  if (a.T > 8) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return backward_typed<T>(grad_loss, student, teacher, center, weights, student_lse,
                             teacher_lse, a, grad_student, stream);
  });
}

cudaError_t offset_logsumexp(const void* x, DType dtype, int64_t R, int64_t K,
                             const void* row_offset, const void* col_offset, double scale,
                             int dim, void* out, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const auto* xp = static_cast<const T*>(x);
    const auto* ro = static_cast<const A*>(row_offset);
    const auto* co = static_cast<const A*>(col_offset);
    if (dim == 1) {
      if (R == 0) return cudaSuccess;
      lse_rows_kernel<T><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(xp, K, ro, co, A(scale), static_cast<A*>(out));
    } else {
      if (K == 0) return cudaSuccess;
      lse_cols_kernel<T><<<static_cast<unsigned>(ceil_div(K, kThreads)), kThreads, 0, stream>>>(
          xp, R, K, ro, co, A(scale), static_cast<A*>(out));
    }
    return cudaGetLastError();
  });
}

}  // namespace pyssl::cuda
