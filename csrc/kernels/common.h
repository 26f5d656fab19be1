// Torch-free helpers shared by the C++ CPU kernels (g++) and the CUDA kernels (nvcc).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYSSL_HD __host__ __device__ __forceinline__
#else
#define PYSSL_HD inline
#endif

namespace pyssl {

// Element types the kernels understand. The glue maps at::ScalarType onto this.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ceil(a / b) for a >= 0, b > 0.
PYSSL_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Order-preserving integer keys for floating-point sort keys: a < b (as floats) iff
// key(a) < key(b); -0.0 and +0.0 map to the same key, every NaN maps to the largest key
// (NaN sorts last, as in torch.sort). Ties are then broken by index, giving a stable order.
PYSSL_HD uint32_t ordered_key(float x) {
  if (x != x) return 0xFFFFFFFFu;
  x = x + 0.0f;  // -0.0 -> +0.0
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

PYSSL_HD uint64_t ordered_key(double x) {
  if (x != x) return 0xFFFFFFFFFFFFFFFFull;
  x = x + 0.0;
  uint64_t u;
  memcpy(&u, &x, sizeof(u));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

}  // namespace pyssl
