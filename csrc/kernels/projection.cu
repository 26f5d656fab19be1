// Projection and segment-pooling CUDA kernels; see csrc/kernels/projection.h.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda_common.cuh"
#include "kernels/projection.h"
#include "kernels/projection_math.h"

namespace pyssl::cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), int64_t{1} << 20)));
}

template <typename T>
struct DevProjector {
  const T* pts;
  const T* M;
  const T* K;
  const T* size;
  const int64_t* batch;
  ProjArgs a;

  __device__ Projection<T> operator()(int64_t p, int64_t c) const {
    const int64_t bc = (batch ? batch[p] : 0) * a.C + c;
    const T* q = pts + p * a.F;
    return project_point<T>(q[0], q[1], q[2], M + bc * 16, K + bc * 9, size[bc * 2],
                            size[bc * 2 + 1], T(a.min_depth), T(a.margin), a.rounding);
  }
};

template <typename T>
__global__ void project_kernel(DevProjector<T> proj, T* __restrict__ pixels, T* __restrict__ depth,
                               bool* __restrict__ valid) {
  const int64_t P = proj.a.P;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P;
       p += int64_t(gridDim.x) * blockDim.x) {
    for (int64_t c = 0; c < proj.a.C; ++c) {
      const Projection<T> r = proj(p, c);
      pixels[(c * P + p) * 2] = r.u;
      pixels[(c * P + p) * 2 + 1] = r.v;
      depth[c * P + p] = r.depth;
      valid[c * P + p] = r.valid;
    }
  }
}

template <typename T>
__global__ void pair_count_kernel(DevProjector<T> proj, int cameras, int64_t* __restrict__ counts) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < proj.a.P;
       p += int64_t(gridDim.x) * blockDim.x) {
    int64_t n = 0;
    for (int64_t c = 0; c < proj.a.C; ++c) n += proj(p, c).valid ? 1 : 0;
    counts[p] = cameras == 0 ? n : (n > 0 ? 1 : 0);
  }
}

template <typename T>
__global__ void pair_write_kernel(DevProjector<T> proj, int cameras, const double* __restrict__ random,
                                  const int64_t* __restrict__ offsets,
                                  const int64_t* __restrict__ counts, int64_t* __restrict__ pi,
                                  int64_t* __restrict__ ci, int64_t* __restrict__ ri,
                                  int64_t* __restrict__ co) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < proj.a.P;
       p += int64_t(gridDim.x) * blockDim.x) {
    int64_t o = offsets[p];
    // Never past the slots pair_count_kernel counted, even if a recomputed projection differed.
    const int64_t end = o + counts[p];
    if (o == end) continue;
    int64_t pick = 0;
    if (cameras == 2) {
      int64_t nvalid = 0;
      for (int64_t c = 0; c < proj.a.C; ++c) nvalid += proj(p, c).valid ? 1 : 0;
      if (nvalid == 0) continue;
      pick = pick_camera(random[p], nvalid);
    }
    int64_t seen = 0;
    for (int64_t c = 0; c < proj.a.C; ++c) {
      const Projection<T> q = proj(p, c);
      if (!q.valid) continue;
      if (cameras == 0 || (cameras == 1 && seen == 0) || (cameras == 2 && seen == pick)) {
        pi[o] = p;
        ci[o] = c;
        ri[o] = static_cast<int64_t>(q.v);
        co[o] = static_cast<int64_t>(q.u);
        ++o;
        if (cameras != 0 || o == end) break;
      }
      ++seen;
    }
  }
}

__global__ void segment_count_kernel(const int64_t* __restrict__ ids, int64_t N, int64_t S,
                                     int64_t* __restrict__ counts, int32_t* flag) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N;
       n += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = ids[n];
    if (s < -1 || s >= S) {
      atomicOr(flag, 1);
    } else if (s >= 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + s), 1ull);
    }
  }
}

template <typename F>
__global__ void segment_atomic_kernel(const F* __restrict__ v, const int64_t* __restrict__ ids,
                                      int64_t N, int64_t D, acc_t<F>* __restrict__ sums) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < N * D;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / D, d = t % D;
    const int64_t s = ids[n];
    if (s >= 0) atomicAdd(sums + s * D + d, to_acc(v[t]));
  }
}

template <typename F>
__global__ void segment_sorted_kernel(const F* __restrict__ v, const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ targets,
                                      const int64_t* __restrict__ starts,
                                      const int64_t* __restrict__ lengths, int64_t segments,
                                      int64_t D, acc_t<F>* __restrict__ sums) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < segments * D;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = t / D, d = t % D;
    const int64_t target = targets[s];
    if (target < 0) continue;
    acc_t<F> acc = 0;
    for (int64_t j = starts[s]; j < starts[s] + lengths[s]; ++j) acc += to_acc(v[order[j] * D + d]);
    sums[target * D + d] = acc;
  }
}

template <typename F>
__global__ void segment_divide_kernel(const acc_t<F>* __restrict__ sums,
                                      const int64_t* __restrict__ counts, int64_t S, int64_t D,
                                      F* __restrict__ means) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < S * D;
       t += int64_t(gridDim.x) * blockDim.x) {
    // times the reciprocal, as the CPU kernel (ops/projection.cpp): the same bits for the same sums
    const int64_t n = counts[t / D];
    const acc_t<F> inv = n > 0 ? acc_t<F>(1) / acc_t<F>(n) : acc_t<F>(0);
    means[t] = from_acc<F>(sums[t] * inv);
  }
}

template <typename F>
__global__ void segment_gather_kernel(const F* __restrict__ g, const int64_t* __restrict__ ids,
                                      const int64_t* __restrict__ counts, int64_t N, int64_t S,
                                      int64_t D, F* __restrict__ out) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < N * D;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = ids[t / D];
    if (s < 0 || s >= S) {
      out[t] = F(0.0f);
      continue;
    }
    const acc_t<F> inv = acc_t<F>(1) / acc_t<F>(counts[s] > 0 ? counts[s] : 1);  // as the CPU
    out[t] = from_acc<F>(to_acc(g[s * D + t % D]) * inv);
  }
}

template <typename F>
cudaError_t with_geometry(DType acc, F&& f) {
  if (acc == DType::kFloat64) return f(static_cast<double*>(nullptr));
  return f(static_cast<float*>(nullptr));
}

}  // namespace

#define PYSSL_PROJECTOR(T)                                                                   \
  DevProjector<T> proj{static_cast<const T*>(points), static_cast<const T*>(M),              \
                       static_cast<const T*>(K), static_cast<const T*>(size), batch, a}

cudaError_t project_points(const void* points, DType acc, const void* M, const void* K,
                           const void* size, const int64_t* batch, const ProjArgs& a,
                           void* pixels, void* depth, bool* valid, cudaStream_t stream) {
  if (a.P == 0 || a.C == 0) return cudaSuccess;
  return with_geometry(acc, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    PYSSL_PROJECTOR(T);
    project_kernel<T><<<grid_for(a.P), kThreads, 0, stream>>>(proj, static_cast<T*>(pixels),
                                                              static_cast<T*>(depth), valid);
    return cudaGetLastError();
  });
}

cudaError_t pair_counts(const void* points, DType acc, const void* M, const void* K,
                        const void* size, const int64_t* batch, const ProjArgs& a, int cameras,
                        int64_t* counts, cudaStream_t stream) {
  if (a.P == 0) return cudaSuccess;
  return with_geometry(acc, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    PYSSL_PROJECTOR(T);
    pair_count_kernel<T><<<grid_for(a.P), kThreads, 0, stream>>>(proj, cameras, counts);
    return cudaGetLastError();
  });
}

cudaError_t pair_write(const void* points, DType acc, const void* M, const void* K,
                       const void* size, const int64_t* batch, const ProjArgs& a, int cameras,
                       const double* random, const int64_t* offsets, const int64_t* counts,
                       int64_t* point_index, int64_t* camera_index, int64_t* row, int64_t* col,
                       cudaStream_t stream) {
  if (a.P == 0) return cudaSuccess;
  return with_geometry(acc, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    PYSSL_PROJECTOR(T);
    pair_write_kernel<T><<<grid_for(a.P), kThreads, 0, stream>>>(
        proj, cameras, random, offsets, counts, point_index, camera_index, row, col);
    return cudaGetLastError();
  });
}

cudaError_t segment_counts(const int64_t* ids, int64_t N, int64_t S, int64_t* counts,
                           int32_t* flag, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  segment_count_kernel<<<grid_for(N), kThreads, 0, stream>>>(ids, N, S, counts, flag);
  return cudaGetLastError();
}

cudaError_t segment_sum_atomic(const void* values, DType dtype, const int64_t* ids, int64_t N,
                               int64_t D, void* sums, cudaStream_t stream) {
  if (N * D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    segment_atomic_kernel<F><<<grid_for(N * D), kThreads, 0, stream>>>(
        static_cast<const F*>(values), ids, N, D, static_cast<acc_t<F>*>(sums));
    return cudaGetLastError();
  });
}

cudaError_t segment_sum_sorted(const void* values, DType dtype, const int64_t* order,
                               const int64_t* targets, const int64_t* starts,
                               const int64_t* lengths, int64_t segments, int64_t D, void* sums,
                               cudaStream_t stream) {
  if (segments * D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    segment_sorted_kernel<F><<<grid_for(segments * D), kThreads, 0, stream>>>(
        static_cast<const F*>(values), order, targets, starts, lengths, segments, D,
        static_cast<acc_t<F>*>(sums));
    return cudaGetLastError();
  });
}

cudaError_t segment_divide(const void* sums, const int64_t* counts, DType dtype, int64_t S,
                           int64_t D, void* means, cudaStream_t stream) {
  if (S * D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    segment_divide_kernel<F><<<grid_for(S * D), kThreads, 0, stream>>>(
        static_cast<const acc_t<F>*>(sums), counts, S, D, static_cast<F*>(means));
    return cudaGetLastError();
  });
}

cudaError_t segment_gather(const void* grad, DType dtype, const int64_t* ids,
                           const int64_t* counts, int64_t N, int64_t S, int64_t D, void* out,
                           cudaStream_t stream) {
  if (N * D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using F = std::remove_pointer_t<decltype(tag)>;
    segment_gather_kernel<F><<<grid_for(N * D), kThreads, 0, stream>>>(
        static_cast<const F*>(grad), ids, counts, N, S, D, static_cast<F*>(out));
    return cudaGetLastError();
  });
}

}  // namespace pyssl::cuda
