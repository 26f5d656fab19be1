// Float scratch buffers kept between calls of the CPU kernels.
//
// A fresh allocation of a few MiB is mapped anew by the C library and every 4 KiB page of it
// faults on first touch; on the machines here that costs about as long as a light pass over the
// buffer (0.3 ms for 3 MB), which for the dense sampling fast path is a large share of the op.
// A ScratchPool keeps one buffer (up to kKeepFloats) and lends it to one caller at a time; a
// caller that finds it lent, or needs more than kKeepFloats, gets a buffer of its own, freed
// after use. A lent buffer holds whatever its last borrower left in it.
#pragma once

#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "ops/common.h"

namespace pyssl {

class ScratchPool {
 public:
  static constexpr int64_t kKeepFloats = int64_t{16} << 20;  // 64 MiB

  class Lease {
   public:
    Lease(ScratchPool* pool, scratch_vector<float> buffer, bool pooled)
        : pool_(pool), buffer_(std::move(buffer)), pooled_(pooled) {}
    Lease(Lease&& other) noexcept
        : pool_(other.pool_), buffer_(std::move(other.buffer_)), pooled_(other.pooled_) {
      other.pooled_ = false;
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() {
      if (pooled_) pool_->give_back(std::move(buffer_));
    }
    float* data() { return buffer_.data(); }

   private:
    ScratchPool* pool_;
    scratch_vector<float> buffer_;
    bool pooled_;
  };

  // Frees the kept buffer unless it is lent; returns the bytes freed.
  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (lent_) return 0;
    const int64_t bytes = static_cast<int64_t>(kept_.capacity() * sizeof(float));
    scratch_vector<float>().swap(kept_);
    return bytes;
  }

  // A buffer of at least `floats` floats.
  Lease lend(int64_t floats) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!lent_ && floats <= kKeepFloats) {
        lent_ = true;
        if (static_cast<int64_t>(kept_.size()) < floats) {
          kept_.clear();
          kept_.shrink_to_fit();
          kept_.resize(floats, 0.0f);
        }
        return Lease(this, std::move(kept_), true);
      }
    }
    return Lease(this, scratch_vector<float>(floats, 0.0f), false);
  }

 private:
  void give_back(scratch_vector<float> buffer) {
    std::lock_guard<std::mutex> lock(mutex_);
    kept_ = std::move(buffer);
    lent_ = false;
  }

  std::mutex mutex_;
  scratch_vector<float> kept_;
  bool lent_ = false;
};

}  // namespace pyssl
