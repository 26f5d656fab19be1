// A CUDA emulator for testing pyssl's kernels on a machine without a GPU (x86-64 Linux, g++).
//
// tests/cuda_emu/build.py copies csrc/kernels/*.cu to .cpp files that include this header first
// and turns every `kernel<<<grid, block, smem, stream>>>(args)` into
// `::emu::launch(::emu::Cfg(grid, block, smem, stream), kernel, args)`. A launch runs its blocks
// one after another on the calling thread, in a pseudo-random order (CUDA promises none); within
// a block every CUDA thread is a fiber (its own stack, cooperative switches), so __syncthreads
// and warp shuffles are real rendezvous of all the block's or warp's threads, in the order CUDA
// defines, not a sequential approximation.
//
// What it checks beyond the arithmetic: launch configurations CUDA refuses (an empty grid, more
// than 1024 threads per block, grid.y/z > 65535, shared memory beyond 48 KB), shuffles of a
// partial or diverged warp, shuffles that read a lane which has exited, and barriers that some
// thread never reaches (a deadlock, reported instead of hanging). Failures are collected and
// raised by the glue's error check as a CUDA launch error. Built with AddressSanitizer
// (build.py, PYSSL_EMU_ASAN=1), reads and writes past a tensor's end or past a kernel's shared
// memory are reported too, as compute-sanitizer's memcheck would on a GPU. Each block runs its
// fibers in a pseudo-random order of its own, so a missing barrier shows from either side.
//
// What it does not model: timing, memory coalescing, float atomics' order (they run in fiber
// order), the last bits of __expf (its float-rounded argument is modelled), FMA contraction
// (nvcc fuses where g++ on x86-64 without -mfma does not), the device's memory (pointers are
// host pointers), and data races between threads (fibers switch only at a barrier or shuffle).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <cuda_runtime.h>  // before the macros below: it names gridDim etc. in its templates
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if !defined(__x86_64__) || !defined(__linux__)
#error "the pyssl CUDA emulator switches fibers with x86-64 (System V) assembly"
#endif

namespace emu {

// ---- errors -----------------------------------------------------------------------------------
// Defined once, in emu_module.cpp: the first failure since the last cudaGetLastError.
std::string& failure();
cudaError_t last_error();  // that failure as a launch error (printed to stderr), then cleared
inline void fail(const std::string& what) {
  if (failure().empty()) failure() = what;
}
// sm_90 vector atomics run so far (emu_module.cpp; torch.ops.pyssl_emu.vector_atomics() reads
// it): tests see which scatter path a launch took.
int64_t& vector_atomics();
inline const char* error_string(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated launch failure (see stderr)";
}

// ---- fibers -------------------------------------------------------------------------------------
extern "C" void pyssl_emu_switch(void** save_sp, void* load_sp);

struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  uint3 tid{};
  int linear = 0;
  bool done = false;
  bool waiting = false;  // at a barrier
};

struct Warp {
  Barrier bar;
  int size = 0;
  unsigned long long slot[32] = {};
  bool exited[32] = {};
};

struct Block {
  uint3 idx{};
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<void*> filled;  // static shared arrays given this block's garbage already
};

struct Launch {
  dim3 grid, block;
  size_t dyn_smem = 0;
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  std::function<void()> body;
  Block* blk = nullptr;
  void* sched_sp = nullptr;
  uint64_t progress = 0;  // barrier releases and exits: a round without any is a deadlock
};

inline Launch*& current_launch() {
  static Launch* l = nullptr;
  return l;
}
inline Fiber*& current_fiber() {
  static Fiber* f = nullptr;
  return f;
}

inline void yield() {
  Launch* l = current_launch();
  Fiber* f = current_fiber();
  pyssl_emu_switch(&f->sp, l->sched_sp);
}

// Arrive and wait until every expected participant has arrived.
inline void barrier_wait(Barrier& b) {
  const uint64_t g = b.generation;
  if (++b.arrived >= b.expected) {
    b.arrived = 0;
    ++b.generation;
    ++current_launch()->progress;
    return;
  }
  Fiber* f = current_fiber();
  f->waiting = true;
  while (b.generation == g) yield();
  f->waiting = false;
}

// An exited thread no longer takes part (CUDA counts exited threads as arrived).
inline void barrier_drop(Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived >= b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

inline void fiber_entry() {
  Launch* l = current_launch();
  Fiber* f = current_fiber();
  l->body();
  Warp& w = l->blk->warps[f->linear / 32];
  w.exited[f->linear % 32] = true;
  barrier_drop(w.bar);
  barrier_drop(l->blk->bar);
  f->done = true;
  ++l->progress;
  pyssl_emu_switch(&f->sp, l->sched_sp);
  std::abort();  // a finished fiber is never resumed
}

constexpr size_t kStack = 256 * 1024;

// A fresh stack whose first switch "returns" into fiber_entry (see pyssl_emu_switch's frame).
inline void prepare(Fiber& f) {
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStack) & ~uintptr_t{15};
  auto* p = reinterpret_cast<uint64_t*>(top);
  p[-1] = 0;                                               // fiber_entry's "return address" slot
  p[-2] = reinterpret_cast<uint64_t>(&fiber_entry);        // ret target
  for (int r = 3; r <= 8; ++r) p[-r] = 0;                  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr = 0x1F80;
  uint16_t fcw = 0x037F;
  std::memcpy(&p[-10], &fcw, sizeof(fcw));                 // x87 control word at sp
  std::memcpy(reinterpret_cast<char*>(&p[-10]) + 8, &mxcsr, sizeof(mxcsr));  // MXCSR at sp + 8
  f.sp = &p[-10];
  f.done = false;
  f.waiting = false;
}

inline void run_block(Launch& l, Block& b) {
  const int n = static_cast<int>(l.block.x * l.block.y * l.block.z);
  b.bar.expected = n;
  b.warps.assign((n + 31) / 32, Warp{});
  for (int w = 0; w < static_cast<int>(b.warps.size()); ++w) {
    b.warps[w].size = std::min(32, n - 32 * w);
    b.warps[w].bar.expected = b.warps[w].size;
  }
  l.blk = &b;
  std::fill(l.smem.begin(), l.smem.end(), 0xFF);  // shared memory starts as garbage (NaN floats)
  for (auto& f : l.fibers) prepare(f);
  // Fibers run in a different order in every block (a fixed pseudo-random permutation of the
  // block's index): a missing barrier shows when a reader runs before its writer, so varying
  // who runs first finds more of them than thread order alone.
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  uint64_t rng = 0x9E3779B97F4A7C15ull * (1 + b.idx.x + 65536ull * (b.idx.y + 65536ull * b.idx.z));
  for (int i = n - 1; i > 0; --i) {
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    std::swap(order[i], order[(rng * 0x2545F4914F6CDD1Dull >> 33) % (i + 1)]);
  }
  int live = n;
  while (live > 0) {
    const uint64_t before = l.progress;
    bool all_waiting = true;
    for (int i : order) {
      Fiber& f = l.fibers[i];
      if (f.done) continue;
      current_fiber() = &f;
      pyssl_emu_switch(&l.sched_sp, f.sp);
      if (f.done) --live;
      else if (!f.waiting) all_waiting = false;
    }
    if (live > 0 && all_waiting && l.progress == before) {
      fail("deadlock in block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) +
           ", " + std::to_string(b.idx.z) + "): a __syncthreads or warp shuffle that not every "
           "thread reaches");
      return;  // the fibers are abandoned; their stacks are reused by the next block
    }
  }
}

struct Cfg {
  dim3 grid, block;
  size_t smem;
  Cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

// The fiber's CUDA built-ins.
inline uint3 thread_idx() { return current_fiber()->tid; }
inline uint3 block_idx() { return current_launch()->blk->idx; }
inline dim3 block_dim() { return current_launch()->block; }
inline dim3 grid_dim() { return current_launch()->grid; }
inline unsigned char* dynamic_smem() { return current_launch()->smem.data(); }

// A static __shared__ array (build.py adds the call after its declaration): filled with 0xFF
// bytes when the block's first thread gets there, so entries the block reads without writing
// are NaN, not the last block's values.
inline void shared_fill(void* p, size_t bytes) {
  auto& filled = current_launch()->blk->filled;
  if (std::find(filled.begin(), filled.end(), p) != filled.end()) return;
  filled.push_back(p);
  std::memset(p, 0xFF, bytes);
}

template <typename... P, typename... A>
void launch(Cfg c, void (*kernel)(P...), A&&... args) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || threads == 0) {
    fail("launch with an empty grid or block (CUDA: invalid configuration argument)");
    return;
  }
  if (threads > 1024 || c.block.z > 64 || c.grid.y > 65535 || c.grid.z > 65535 ||
      c.grid.x > 2147483647u) {
    fail("launch configuration beyond CUDA's limits: grid (" + std::to_string(c.grid.x) + ", " +
         std::to_string(c.grid.y) + ", " + std::to_string(c.grid.z) + "), block of " +
         std::to_string(threads) + " threads");
    return;
  }
  if (c.smem > 48 * 1024) {
    fail("dynamic shared memory of " + std::to_string(c.smem) + " bytes (> 48 KB by default)");
    return;
  }
  Launch l;
  l.grid = c.grid;
  l.block = c.block;
  l.smem.assign(c.smem, 0);  // exactly: under ASan a read past the end is reported
  std::tuple<std::decay_t<P>...> a(std::forward<A>(args)...);  // converted once, as CUDA does
  l.body = [&]() { std::apply(kernel, a); };
  std::vector<std::unique_ptr<char[]>> stacks;
  l.fibers.resize(threads);
  for (uint64_t t = 0; t < threads; ++t) {
    stacks.emplace_back(new char[kStack + 16]);
    Fiber& f = l.fibers[t];
    f.stack = stacks.back().get();
    f.linear = static_cast<int>(t);
    f.tid = uint3{static_cast<unsigned>(t % c.block.x),
                  static_cast<unsigned>((t / c.block.x) % c.block.y),
                  static_cast<unsigned>(t / (uint64_t(c.block.x) * c.block.y))};
  }
  Launch* outer = current_launch();
  Fiber* outer_fiber = current_fiber();
  current_launch() = &l;
  // Blocks in a pseudo-random order (a fixed permutation per grid shape): CUDA promises no
  // order, so a kernel that counts finished blocks must not find the last block at the last
  // index, nor may any block wait for data of a block before it.
  const uint64_t nblocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  std::vector<uint64_t> blocks(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) blocks[i] = i;
  uint64_t rng = 0xD1B54A32D192ED03ull ^ (nblocks * 0x9E3779B97F4A7C15ull);
  for (uint64_t i = nblocks; i > 1; --i) {
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    std::swap(blocks[i - 1], blocks[(rng * 0x2545F4914F6CDD1Dull >> 33) % i]);
  }
  for (uint64_t i = 0; i < nblocks && failure().empty(); ++i) {
    const uint64_t id = blocks[i];
    Block b;
    b.idx = uint3{static_cast<unsigned>(id % c.grid.x),
                  static_cast<unsigned>(id / c.grid.x % c.grid.y),
                  static_cast<unsigned>(id / (uint64_t(c.grid.x) * c.grid.y))};
    run_block(l, b);
  }
  current_launch() = outer;
  current_fiber() = outer_fiber;
}

// ---- warp-level and block-level primitives --------------------------------------------------------
template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a type over 8 bytes");
  Launch* l = current_launch();
  Fiber* f = current_fiber();
  Warp& w = l->blk->warps[f->linear / 32];
  const int lane = f->linear % 32;
  if (width != 32) fail("__shfl_xor_sync with width != 32 is not emulated");
  if (mask != 0xffffffffu || w.size != 32) fail("__shfl_xor_sync over a partial warp");
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  barrier_wait(w.bar);
  const int src = lane ^ lane_mask;
  if (src < 32 && w.exited[src]) fail("__shfl_xor_sync reads lane " + std::to_string(src) +
                                      ", which has exited");
  T r;
  std::memcpy(&r, &w.slot[src & 31], sizeof(T));
  barrier_wait(w.bar);  // nobody overwrites its slot before every lane has read
  return r;
}

inline void syncthreads() { barrier_wait(current_launch()->blk->bar); }
inline void syncwarp() { barrier_wait(current_launch()->blk->warps[current_fiber()->linear / 32].bar); }

}  // namespace emu

// ---- CUDA's names ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define cudaGetLastError ::emu::last_error
#define cudaGetErrorString ::emu::error_string
#define cudaGetDevice ::emu::get_device
#define cudaDeviceGetAttribute ::emu::device_attribute

namespace emu {
// One emulated device, of compute capability 9.0 with 4 SMs.
inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t device_attribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMultiProcessorCount: *v = 4; break;
    default: *v = 0;
  }
  return cudaSuccess;
}
// A vector load or store's address (PYSSL_ASSUME_ALIGNED in cuda_common.cuh): the GPU faults
// on a misaligned one, the host would not.
inline void check_aligned(const void* p, size_t n) {
  if (reinterpret_cast<uintptr_t>(p) % n)
    fail("a vector access at an address not " + std::to_string(n) + "-byte aligned");
}
}  // namespace emu

template <typename T>
inline void __stwb(T* p, T v) { *p = v; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
// Blocks run one at a time and fibers switch only at barriers: every write is already visible.
inline void __threadfence() {}

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::syncwarp(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::shfl_xor(mask, v, lane_mask, width);
}
// __expf as the GPU computes it: ex2.approx of x * log2(e) rounded to float (that rounding is
// its main error: about |x| * 2^-24 relative, 5e-6 at |x| = 100), subnormal results flushed.
inline float __expf(float x) {
  const float t = x * 1.44269502f;
  const float r = std::exp2(t);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f : r;
}

// Kernels may take a code path the emulator models in place of an architecture test
// (e.g. sm_90's vector atomics).
#define PYSSL_CUDA_EMULATOR 1

// Atomics: fibers switch only at barriers, so a plain read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = std::max(old, v);
  return old;
}
// sm_90's vector atomics (global memory, 8- or 16-byte aligned).
inline float4 atomicAdd(float4* p, float4 v) {
  if (reinterpret_cast<uintptr_t>(p) % 16) ::emu::fail("atomicAdd(float4*) on an address not 16-byte aligned");
  ++::emu::vector_atomics();
  const float4 old = *p;
  *p = make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
  return old;
}
inline float2 atomicAdd(float2* p, float2 v) {
  if (reinterpret_cast<uintptr_t>(p) % 8) ::emu::fail("atomicAdd(float2*) on an address not 8-byte aligned");
  ++::emu::vector_atomics();
  const float2 old = *p;
  *p = make_float2(old.x + v.x, old.y + v.y);
  return old;
}
using std::max;
using std::min;
