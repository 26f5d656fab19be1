// Pixel-interleaved ("quad") images for the dense sampling and flow kernels of few channels
// (csrc/cpu/sample_dense.h): the pools their scratch comes from, their layout, and the rows of
// them packed on first use.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "cpu/sample_dense.h"
#include "ops/scratch_pool.h"

namespace pyssl {

inline ScratchPool& quad_image_pool() {  // interleaved features or backward flows
  static ScratchPool pool;
  return pool;
}
inline ScratchPool& quad_grad_pool() {  // feature-gradient accumulators (rows zeroed on first use)
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

// Rows of scratch images packed on first use, so that a row is read while the packing has just
// left it in cache (a whole 2 MB image packed up front is out of L2 by the time the points
// reach its later rows: the C=3 gather then took twice as long per point). Shared by the
// threads of one call: ensure(b, lo, hi, pack) calls pack(b, r0, r1) for the rows of image b in
// [lo, hi) that nobody has packed yet, and returns once all of them are packed (a row another
// thread is packing is waited for; a thread packs its own claimed rows before it waits, so no
// thread waits while holding a claim).
class LazyRows {
 public:
  LazyRows(int64_t images, int64_t rows)
      : rows_(rows), state_(std::make_unique<std::atomic<uint8_t>[]>(images * rows)) {
    for (int64_t i = 0; i < images * rows; ++i) state_[i].store(kEmpty, std::memory_order_relaxed);
  }

  // whether row r of image b is packed (for the thread that packed it, or after ensure)
  bool is_packed(int64_t b, int64_t r) const {
    return state_[b * rows_ + r].load(std::memory_order_acquire) == kPacked;
  }

  template <typename Pack>
  void ensure(int64_t b, int64_t lo, int64_t hi, Pack&& pack) {
    std::atomic<uint8_t>* st = state_.get() + b * rows_;
    int64_t r = lo;
    while (r < hi) {
      if (st[r].load(std::memory_order_acquire) == kPacked) {
        ++r;
        continue;
      }
      int64_t r1 = r;  // claim a run of empty rows [r, r1)
      while (r1 < hi) {
        uint8_t expect = kEmpty;
        if (!st[r1].compare_exchange_strong(expect, kPacking, std::memory_order_acquire)) break;
        ++r1;
      }
      if (r1 > r) {
        pack(b, r, r1);
        for (int64_t k = r; k < r1; ++k) st[k].store(kPacked, std::memory_order_release);
        r = r1;
        continue;
      }
      while (st[r].load(std::memory_order_acquire) != kPacked) {  // another thread packs row r
        std::this_thread::yield();
      }
      ++r;
    }
  }

 private:
  static constexpr uint8_t kEmpty = 0, kPacking = 1, kPacked = 2;
  int64_t rows_;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;
};

// The rows [lo, hi) of an image with rows `pitch` pixels apart that the taps of a block of n
// points read (indices >= 0); lo == hi when they read none
inline std::pair<int64_t, int64_t> tap_rows(const int32_t* index, int64_t n, int64_t pitch) {
  int32_t lo, hi;
  cpu::index_range(index, 4 * n, &lo, &hi);
  if (hi < 0) return {0, 0};
  return {lo / pitch, hi / pitch + 1};
}

}  // namespace pyssl
