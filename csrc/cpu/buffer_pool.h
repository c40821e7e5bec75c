// Output buffers for the CPU kernels, recycled instead of returned to malloc.
//
// Why: torch's CPU allocator hands large blocks back to the OS (glibc mmaps them, or trims the heap top once two
// of them are free), so a fresh (768, 128) or (16384, 384) float output is page-faulted and zeroed by the kernel
// page by page on every call. Measured on the 2-core CPU machine, 1 thread, (768, 128) LayerNorm: each op took
// ~25 us alone but ~115 us inside a forward+backward loop, the difference being first-touch faults. The pool keeps
// freed blocks of >= 64 KiB (up to 256 MiB in all, per exact page-rounded size) and hands them out again; smaller
// requests go to torch's allocator. Tensors made here are ordinary CPU tensors (resizable, any lifetime, freed
// from any thread); only where their memory comes from differs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace chargpt {

class BufferPool final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{64} << 10;
  static constexpr size_t kMaxCachedBytes = size_t{256} << 20;
  static constexpr size_t kHeader = 64;  // block size stored in front of the data, which stays 64-byte aligned

  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may outlive static destruction
    return *pool;
  }

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinBytes) return c10::GetCPUAllocator()->allocate(bytes);
    const size_t size = (bytes + kHeader + 4095) / 4096 * 4096;
    void* base = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        cached_ -= size;
      }
    }
    if (base == nullptr) {
      base = std::aligned_alloc(4096, size);
      TORCH_CHECK(base != nullptr, "chargpt: out of memory allocating ", bytes, " bytes");
      *static_cast<size_t*>(base) = size;
    }
    return {static_cast<char*>(base) + kHeader, base, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* base) { instance().put(base); }

  void put(void* base) {
    const size_t size = *static_cast<size_t*>(base);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + size <= kMaxCachedBytes) {
        free_[size].push_back(base);
        cached_ += size;
        return;
      }
    }
    std::free(base);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

// at::empty for a CPU output (float32 unless asked), from the pool.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat) {
  return at::detail::empty_generic(sizes, &BufferPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

}  // namespace chargpt
