// AVX2 loads and stores of 8 float32 or bfloat16 values as 8 float lanes, shared by the dense
// sampling kernels (sample_dense.cpp, sample_band.cpp). x86-64 GCC/Clang only: include it inside
// the files' AVX2 sections. bfloat16 -> float is exact; float -> bfloat16 rounds to nearest even
// and keeps NaN a NaN, as float_to_bf16 in simd.h.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace pyssl::cpu {
namespace {

#define PYSSL_AVX2 __attribute__((target("avx2,fma")))

PYSSL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PYSSL_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
PYSSL_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
PYSSL_AVX2 inline void store8(uint16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// Stores of lanes that hold float32 or bfloat16 values exactly (load8 of the same type): the
// bits as they are, NaN payloads and signs too (store8 rounds, and makes every NaN 0x7FC0)
PYSSL_AVX2 inline void move8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
PYSSL_AVX2 inline void move8(uint16_t* p, __m256 v) {
  const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(v), 16);  // 0..0xFFFF: no saturation
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

}  // namespace
}  // namespace pyssl::cpu
