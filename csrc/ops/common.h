// Helpers shared by every op family: argument checks that name the argument, and the mapping
// from torch dtypes to the torch-free kernels' DType.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <new>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "kernels/common.h"

namespace pyssl {

// Scratch memory of the CPU kernels from torch's CPU allocator, not the C library directly: it
// then shows in torch.profiler's memory events (profile_memory=True) like the op's tensors, and
// in the benchmarks' peak memory (benchmarks/common.py). Same speed: torch's allocator is the
// C library's aligned malloc plus a profiler check.
template <typename T>
struct TorchCpuAllocator {
  using value_type = T;
  TorchCpuAllocator() noexcept = default;
  template <typename U>
  TorchCpuAllocator(const TorchCpuAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(c10::GetCPUAllocator()->raw_allocate(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t) noexcept { c10::GetCPUAllocator()->raw_deallocate(p); }
  template <typename U>
  bool operator==(const TorchCpuAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const TorchCpuAllocator<U>&) const noexcept { return false; }
};
template <typename T>
using scratch_vector = std::vector<T, TorchCpuAllocator<T>>;

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor ", layout,
                    ", got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t d, int64_t expected, const char* name,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, name, ".shape[", d, "] (", what, ") must be ",
                    expected, ", got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed,
                        const char* name) {
  for (auto s : allowed)
    if (t.scalar_type() == s) return;
  std::string list;
  for (auto s : allowed) {
    if (!list.empty()) list += ", ";
    list += c10::toString(s);
  }
  TORCH_CHECK_TYPE(false, name, " must have dtype in {", list, "}, got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  check_dtype(t, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, name);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move them to the same device");
}

// Every value of the int64 tensor `index` must lie in [0, bound): one aminmax and one copy of
// its two values to the host (a single synchronisation on CUDA), and a ValueError naming
// `name` and `what` otherwise.
inline void check_index_range(const at::Tensor& index, int64_t bound, const char* name,
                              const char* what) {
  if (index.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(index);
  const at::Tensor range = at::stack({lo, hi}).to(at::kCPU);
  const int64_t l = range.const_data_ptr<int64_t>()[0], h = range.const_data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(l >= 0 && h < bound, name, " values must be in [0, ", bound, ") (", what,
                    "), got values in [", l, ", ", h, "]");
}

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "pyssl kernels do not support dtype ", s);
  }
}

// Large CPU outputs: ask Linux for transparent huge pages before the first touch. With THP in
// "madvise" mode (the default of many distributions) a fresh 64 MB buffer otherwise costs 16k
// page faults, which on the machines here take longer than the kernels that fill it. Advisory
// only: a refusal changes nothing but speed.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t bytes = t.nbytes();
  if (!t.device().is_cpu() || bytes < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + bytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

inline at::Tensor zeros_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_large(sizes, options).zero_();
}

// at::empty_like / at::zeros_like (same strides) in huge-page-advised memory.
inline at::Tensor empty_like_large(const at::Tensor& t, const at::TensorOptions& options) {
  at::Tensor out = at::empty_like(t, options);
  advise_huge_pages(out);
  return out;
}

inline at::Tensor zeros_like_large(const at::Tensor& t, const at::TensorOptions& options) {
  return empty_like_large(t, options).zero_();
}

// A copy of t with `options` (dtype, memory format) in huge-page-advised memory.
inline at::Tensor copy_large(const at::Tensor& t, const at::TensorOptions& options) {
  at::Tensor out = empty_large(t.sizes(), options);
  out.copy_(t);
  return out;
}

// t converted to dtype (t itself when it has it), a contiguous copy in huge-page-advised memory:
// for the multi-MB conversions around the CPU kernels (a bf16 gradient to float32 and back).
inline at::Tensor to_large(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : copy_large(t, t.options().dtype(dtype));
}

}  // namespace pyssl
