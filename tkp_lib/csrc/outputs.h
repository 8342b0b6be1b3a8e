// The TKP kernels' output tensors, from a cache of freed output buffers.
//
// glibc hands freed blocks of a few MiB back to the OS (unmapped, or trimmed off the top of
// the heap), so the next call's output of that size is faulted in again page by page: a
// deployed ResNet-56 at batch 32 (2 MiB activations) took 1347 faults per call on an AMD Zen 3
// VM, and ran 1.28x faster on 1 thread and 1.22x on 2 with this cache. A network's calls ask
// for the same few sizes over and over, so each kernel keeps up to kMaxBuffers freed outputs
// (kMaxBytes in all; each of the three kernels its own), hands out one of exactly the size
// asked for, and frees the oldest past those bounds. Smaller outputs come from torch's
// allocator, where glibc reuses them anyway. torch's own c10::CPUCachingAllocator works only
// in mobile builds. The tensors are ordinary resizable CPU tensors; only their memory comes
// and goes here. release() frees the kept buffers (tkp_lib.kernels.free_cached_outputs()).
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

namespace tkp_outputs {
// Internal linkage: each kernel's library keeps a cache of its own (g++ would otherwise merge
// the function-local statics below across the three libraries, and across builds of
// different versions of this header loaded into one process).
namespace {

constexpr size_t kMinBytes = size_t(1) << 18;   // 256 KiB: glibc's default mmap threshold is 128 KiB
constexpr size_t kMaxBuffers = 16;
constexpr size_t kMaxBytes = size_t(256) << 20;  // 256 MiB kept at most
constexpr size_t kHeader = 64;                   // before each buffer: its size (keeps 64-byte alignment)

struct Cache {
  std::mutex mutex;
  std::deque<std::pair<size_t, void*>> freed;  // (bytes, block), oldest first
  size_t bytes = 0;
};

// never destroyed: a tensor freed during the interpreter's exit still finds it
inline Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

inline void give_back(void* block) {
  const size_t bytes = *static_cast<size_t*>(block);
  if (bytes > kMaxBytes) return std::free(block);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.freed.emplace_back(bytes, block);
  c.bytes += bytes;
  while (c.freed.size() > kMaxBuffers || c.bytes > kMaxBytes) {
    c.bytes -= c.freed.front().first;
    std::free(c.freed.front().second);
    c.freed.pop_front();
  }
}

// a block of `bytes` usable bytes after its header: a freed one of exactly that size, else new
inline void* take(size_t bytes) {
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    for (auto it = c.freed.rbegin(); it != c.freed.rend(); ++it)
      if (it->first == bytes) {
        void* block = it->second;
        c.bytes -= bytes;
        c.freed.erase(std::next(it).base());
        return block;
      }
  }
  void* block = std::aligned_alloc(64, (kHeader + bytes + 63) / 64 * 64);
  if (block) *static_cast<size_t*>(block) = bytes;
  return block;
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinBytes) return c10::GetCPUAllocator()->allocate(bytes);
    void* block = take(bytes);
    TORCH_CHECK(block, "TKP kernels: out of memory (", bytes, " bytes for an output)");
    return {static_cast<char*>(block) + kHeader, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

inline CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator;
  return *a;
}

// (freed buffers kept, their bytes)
inline std::vector<int64_t> stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {int64_t(c.freed.size()), int64_t(c.bytes)};
}

// frees every buffer kept (outputs still in use are not touched); the bytes freed
inline int64_t release() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const int64_t bytes = int64_t(c.bytes);
  for (const auto& f : c.freed) std::free(f.second);
  c.freed.clear();
  c.bytes = 0;
  return bytes;
}

// like at::empty(sizes, float32 CPU, memory_format)
inline at::Tensor empty(at::IntArrayRef sizes, at::MemoryFormat memory_format = at::MemoryFormat::Contiguous) {
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), at::kFloat,
                                   memory_format);
}

}  // namespace
}  // namespace tkp_outputs
