// Torch-free helpers for the CPU kernels in csrc/cpu/*.cpp: a vectorisable exp, bf16
// conversions, fixed-lane reductions, and run-time dispatch between AVX-512, AVX2+FMA and
// baseline builds of a kernel body.
//
// Kernel bodies are written as plain loops over fixed-width lane arrays (kLanes accumulators)
// so that (a) GCC vectorises them without -ffast-math and (b) the summation order does not
// depend on the SIMD width: every build gives bitwise identical results. The kernel files
// (csrc/cpu/*.cpp) are compiled with -fno-trapping-math (CMakeLists.txt), which lets GCC
// if-convert the selects below into vector blends.
//
// The helpers have internal linkage (anonymous namespace / static), so the AVX2 bodies never leak
// into symbols shared with baseline code; only the dispatch queries at the end are shared.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace pyssl::cpu {
namespace {

constexpr int kLanes = 16;

#define PYSSL_INLINE __attribute__((always_inline)) inline

PYSSL_INLINE uint32_t f2u(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
PYSSL_INLINE float u2f(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// exp(x) for x <= 88, relative error < 1e-7 (Cody-Waite range reduction + degree-6
// polynomial for e^r on [-ln2/2, ln2/2]). Inputs below -87 (where exp is at most ~1.6e-38)
// give exactly 0, so exp(-inf) = 0 as in IEEE (a masked prototype has probability 0, and
// 0 * log 0 is NaN as in float64); NaN stays NaN.
PYSSL_INLINE float exp_approx(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln2) in the mantissa
  const float n = t - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(f2u(t)) - 0x4B400000;
  const float e = p * u2f(static_cast<uint32_t>(ni + 127) << 23);
  return underflow ? 0.0f : e;
}
PYSSL_INLINE double exp_approx(double x) { return std::exp(x); }

PYSSL_INLINE float bf16_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }
PYSSL_INLINE uint16_t float_to_bf16(float x) {  // round to nearest even; NaN stays NaN
  const uint32_t u = f2u(x);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : r);
}

// IEEE binary16 <-> float32, written with selects so that row loops over them vectorise.
// half -> float is exact (NaN payloads kept as they are, signalling ones too); float -> half
// rounds to nearest even, overflows to inf and turns NaN into the quiet NaN 0x7E00 (sign kept):
// bit for bit what torch's .to(torch.float16) gives.
PYSSL_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  const float normal = u2f(((exp + 112u) << 23) | (man << 13));
  const float sub = static_cast<float>(static_cast<int32_t>(man)) * 5.9604644775390625e-8f;  // 2^-24
  const float special = u2f(0x7F800000u | (man << 13));  // inf, NaN (payload kept)
  const float mag = exp == 0 ? sub : (exp == 31 ? special : normal);
  return u2f(f2u(mag) | sign);
}
PYSSL_INLINE uint16_t float_to_half(float x) {
  const uint32_t u = f2u(x);
  const uint32_t sign = (u >> 16) & 0x8000u, ax = u & 0x7FFFFFFFu;
  // normal halves: rebias, then round the 13 dropped bits to nearest even (a carry may move
  // into the exponent, up to inf at 65520 and above)
  const uint32_t r = ax - (112u << 23);
  const uint32_t normal = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  // below 2^-14: the FPU rounds |x| + 0.5 to a multiple of 2^-24 (ties to even), whose low
  // mantissa bits are the subnormal's (0x400: rounded up to the smallest normal)
  const uint32_t sub = f2u(u2f(ax) + 0.5f) - 0x3F000000u;
  uint32_t mag = ax < 0x38800000u ? sub : normal;
  mag = ax >= 0x477FF000u ? 0x7C00u : mag;
  mag = ax > 0x7F800000u ? 0x7E00u : mag;
  return static_cast<uint16_t>(sign | mag);
}

PYSSL_INLINE float max_of(float a, float b) { return a > b ? a : b; }
PYSSL_INLINE double max_of(double a, double b) { return a > b ? a : b; }

}  // namespace

// The widest build the run-time dispatch may pick: 2 = AVX-512, 1 = AVX2+FMA, 0 = baseline.
// The environment variable PYSSL_CPU_ISA = baseline | avx2 | avx512 lowers it (tests compare the
// builds' results bit for bit); it never raises it above what the CPU has. Inline functions with
// external linkage: one cached value for the whole extension, latched when pyssl._C loads
// (csrc/module.cpp), after pyssl/_native.py has rejected any other value.
inline int cpu_isa_cap() {
  static const int cap = [] {
    const char* e = std::getenv("PYSSL_CPU_ISA");
    if (e == nullptr) return 2;
    if (std::strcmp(e, "baseline") == 0) return 0;
    if (std::strcmp(e, "avx2") == 0) return 1;
    return 2;
  }();
  return cap;
}

inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok =
      cpu_isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {  // the subset PYSSL_MULTIVERSION_AVX512 builds for (AVX-512 F/BW/VL/DQ)
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = cpu_isa_cap() >= 2 && cpu_has_avx2_fma() &&
                         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

// The build the dispatch picks on this CPU: "avx512", "avx2" or "baseline".
inline const char* cpu_isa_name() {
  return cpu_has_avx512() ? "avx512" : cpu_has_avx2_fma() ? "avx2" : "baseline";
}

}  // namespace pyssl::cpu

// Defines `name(args)` that runs `body` compiled for AVX2+FMA when the CPU has them, else the
// baseline build of the same body. `body` must be an always-inline function.
#if defined(__x86_64__) && defined(__GNUC__)
#define PYSSL_MULTIVERSION(ret, name, params, args, body)                      \
  __attribute__((target("avx2,fma"))) static ret name##_avx2 params {          \
    return body args;                                                          \
  }                                                                            \
  static ret name##_base params { return body args; }                          \
  ret name params {                                                            \
    return ::pyssl::cpu::cpu_has_avx2_fma() ? name##_avx2 args : name##_base args; \
  }
#else
#define PYSSL_MULTIVERSION(ret, name, params, args, body) \
  ret name params { return body args; }
#endif

// As PYSSL_MULTIVERSION, with a third build of `body` for AVX-512 (512-bit vectors), picked
// first when the CPU has it. Lane-array bodies give the same bits in all three builds. Used
// where a benchmark showed the 512-bit build pays (the DINO loss's row passes, project_points).
#if defined(__x86_64__) && defined(__GNUC__)
#define PYSSL_MULTIVERSION_AVX512(ret, name, params, args, body)                                \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"))) \
  static ret name##_avx512 params {                                                             \
    return body args;                                                                           \
  }                                                                                             \
  __attribute__((target("avx2,fma"))) static ret name##_avx2 params { return body args; }      \
  static ret name##_base params { return body args; }                                           \
  ret name params {                                                                             \
    return ::pyssl::cpu::cpu_has_avx512()     ? name##_avx512 args                              \
           : ::pyssl::cpu::cpu_has_avx2_fma() ? name##_avx2 args                                \
                                              : name##_base args;                               \
  }
#else
#define PYSSL_MULTIVERSION_AVX512(ret, name, params, args, body) \
  ret name params { return body args; }
#endif
