// Pixel-interleaved ("quad") images for the dense sampling and flow kernels of few channels
// (csrc/cpu/sample_dense.h): the pools their scratch comes from, their layout, and the parallel
// packing of [B][C][H*W] planes into [B][H][pitch][4].
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/sample_dense.h"
#include "ops/scratch_pool.h"

namespace pyssl {

inline ScratchPool& quad_image_pool() {  // interleaved features or backward flows
  static ScratchPool pool;
  return pool;
}
inline ScratchPool& quad_grad_pool() {  // feature-gradient accumulators: all-zero when lent and given back
  static ScratchPool pool;
  return pool;
}

// Frees what the quad pools keep (pyssl.release_cpu_scratch); returns the bytes freed
inline int64_t release_quad_scratch() {
  return quad_image_pool().release() + quad_grad_pool().release();
}

// The layout of B quad images of H x W: rows `pitch` pixels apart (cpu::quad_pitch)
struct QuadLayout {
  int64_t H, W, pitch;
  QuadLayout(int64_t h, int64_t w) : H(h), W(w), pitch(cpu::quad_pitch(w)) {}
  int64_t image_floats() const { return H * pitch * cpu::kQuadChannels; }
};

// q [B][H][pitch][4] from the planes [B][C][H*W] (C <= 4), in parallel over bands of rows
template <typename F>
void pack_quad_images(const F* planes, int64_t B, int64_t C, const QuadLayout& L, float* q) {
  const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(L.W, 1));
  const int64_t bands = (L.H + rows - 1) / rows;
  at::parallel_for(0, B * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / bands, r0 = (task % bands) * rows;
      cpu::quad_pack(planes + b * C * L.H * L.W, C, L.H, L.W, L.pitch, r0, std::min(L.H, r0 + rows),
                     q + b * L.image_floats());
    }
  });
}

}  // namespace pyssl
