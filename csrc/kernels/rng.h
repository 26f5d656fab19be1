// A tiny counter-based generator (SplitMix64, Steele, Lea & Flood 2014) that runs identically
// on the host and on the device: one 64-bit seed per sample gives the same stream on CPU and
// GPU, whatever the number of threads. pyssl/ops/masking.py mirrors it in Python for the
// reference implementation.
#pragma once

#include "kernels/common.h"

namespace pyssl {

struct SplitMix64 {
  uint64_t state;

  PYSSL_HD explicit SplitMix64(uint64_t seed) : state(seed) {}

  PYSSL_HD uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  // Uniform double in [0, 1) with 53 random bits.
  PYSSL_HD double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  // Uniform double in [a, b) (also for b < a, like Python's random.uniform).
  PYSSL_HD double uniform(double a, double b) { return a + (b - a) * uniform(); }

  // Uniform integer in [a, b] (inclusive), b >= a.
  PYSSL_HD int64_t randint(int64_t a, int64_t b) {
    int64_t r = a + static_cast<int64_t>(uniform() * static_cast<double>(b - a + 1));
    return r > b ? b : r;
  }
};

}  // namespace pyssl
