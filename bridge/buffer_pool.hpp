// Reusable I/O buffers in power-of-two size classes, so the steady state does
// no heap allocation per request. Single-threaded: used only on the loop thread.
// Buffers of 256 KiB and more live until the pool dies (they are carved from
// shared chunks), but past kept_resident_bytes per size class a returned one
// gives its memory back to the kernel; smaller ones beyond keep_per_class go
// back to the heap. release_idle() gives every free buffer's memory back (an idle
// mount should not keep a burst's working set).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

#include <sys/mman.h>

namespace bridge {

class BufferPool {
 public:
  static constexpr std::size_t smallest = 4096;
  static constexpr std::size_t class_count = 13;  // 4 KiB .. 16 MiB
  static constexpr std::size_t keep_per_class = 128;
  // Large buffers come from 2 MiB chunks the kernel may back with transparent
  // huge pages (THP is "madvise" on Debian): a 1 MiB read is copied twice, socket
  // -> buffer and buffer -> the application's pages, and /dev/fuse pins the
  // buffer page by page; on one huge page both walk one page-table entry instead
  // of 256. Smaller buffers stay on 4 KiB pages, so small requests keep RSS low.
  static constexpr std::size_t huge_page = std::size_t(2) << 20;
  static constexpr std::size_t chunked_minimum = std::size_t(256) << 10;
  // Free large buffers kept with their memory, per size class: enough for 1 MiB
  // reads at depth 8-16; a burst deeper than that does not keep its memory.
  static constexpr std::size_t kept_resident_bytes = std::size_t(16) << 20;

  // A buffer on loan; returns itself to the pool when destroyed.
  class Lease {
   public:
    Lease() = default;
    Lease(BufferPool* pool, std::byte* data, std::size_t capacity) : pool_(pool), data_(data), capacity_(capacity) {}
    Lease(Lease&& other) noexcept { *this = std::move(other); }
    Lease& operator=(Lease&& other) noexcept {
      if (this != &other) {
        reset();
        pool_ = std::exchange(other.pool_, nullptr);
        data_ = std::exchange(other.data_, nullptr);
        capacity_ = std::exchange(other.capacity_, 0);
      }
      return *this;
    }
    ~Lease() { reset(); }
    std::byte* data() const { return data_; }
    std::size_t capacity() const { return capacity_; }
    void reset() {
      if (pool_) pool_->give_back(data_, capacity_);
      pool_ = nullptr;
      data_ = nullptr;
      capacity_ = 0;
    }

   private:
    BufferPool* pool_ = nullptr;
    std::byte* data_ = nullptr;
    std::size_t capacity_ = 0;
  };

  BufferPool() = default;
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  ~BufferPool() {
    for (std::size_t index = 0; index < class_count; ++index)
      if (!chunked(smallest << index))
        for (std::byte* buffer : free_[index]) std::free(buffer);
    for (std::byte* chunk : chunks_) std::free(chunk);
  }

  Lease acquire(std::size_t size) {
    std::size_t index = class_of(size);
    if (index >= class_count) return Lease(this, allocate(size), size);
    std::size_t capacity = smallest << index;
    auto& list = free_[index];
    for (auto* candidates : {&list, &released_[index]}) {
      if (candidates->empty()) continue;
      std::byte* buffer = candidates->back();
      candidates->pop_back();
      return Lease(this, buffer, capacity);
    }
    if (chunked(capacity)) return Lease(this, carve(index), capacity);
    return Lease(this, allocate(capacity), capacity);
  }

  // After a while without requests: the memory of every free buffer goes back to
  // the kernel or the heap; the next burst faults in what it uses again.
  void release_idle() {
    for (std::size_t index = 0; index < class_count; ++index) {
      const std::size_t capacity = smallest << index;
      auto& list = free_[index];
      if (!chunked(capacity)) {
        for (std::byte* buffer : list) std::free(buffer);
      } else {
        for (std::byte* buffer : list) madvise(buffer, capacity, MADV_DONTNEED);
        released_[index].insert(released_[index].end(), list.begin(), list.end());
      }
      list.clear();
    }
  }

  // Bytes of free large buffers that still hold memory (for tests).
  std::size_t resident_free_bytes() const {
    std::size_t bytes = 0;
    for (std::size_t index = class_of(chunked_minimum); index < class_count; ++index)
      bytes += free_[index].size() * (smallest << index);
    return bytes;
  }

  static constexpr std::size_t class_of(std::size_t size) {
    std::size_t index = 0;
    while ((smallest << index) < size && index < class_count) ++index;
    return index;
  }

 private:
  static std::byte* allocate(std::size_t size) {
    // Page-aligned, so buffers suit O_DIRECT-minded servers and never share a page.
    void* memory = std::aligned_alloc(4096, (size + 4095) / 4096 * 4096);
    if (!memory) throw std::bad_alloc();
    return static_cast<std::byte*>(memory);
  }

  static constexpr bool chunked(std::size_t capacity) { return capacity >= chunked_minimum; }

  // A fresh chunk for class index: one buffer of it for the caller, the rest
  // onto the free list.
  std::byte* carve(std::size_t index) {
    const std::size_t capacity = smallest << index;
    const std::size_t chunk_size = std::max(capacity, huge_page);
    void* memory = std::aligned_alloc(huge_page, chunk_size);
    if (!memory) throw std::bad_alloc();
    // Advice only: without THP the chunk is ordinary memory.
    madvise(memory, chunk_size, MADV_HUGEPAGE);
    auto* chunk = static_cast<std::byte*>(memory);
    chunks_.push_back(chunk);
    for (std::size_t offset = capacity; offset < chunk_size; offset += capacity) free_[index].push_back(chunk + offset);
    return chunk;
  }

  void give_back(std::byte* buffer, std::size_t capacity) {
    std::size_t index = class_of(capacity);
    if (index >= class_count || (smallest << index) != capacity) {
      std::free(buffer);  // an odd size, larger than every class
      return;
    }
    auto& list = free_[index];
    if (!chunked(capacity)) {
      if (list.size() < keep_per_class) list.push_back(buffer);
      else std::free(buffer);
    } else if ((list.size() + 1) * capacity <= std::max(kept_resident_bytes, capacity)) {
      list.push_back(buffer);
    } else {
      madvise(buffer, capacity, MADV_DONTNEED);  // a piece of a chunk: never freed alone
      released_[index].push_back(buffer);
    }
  }

  std::array<std::vector<std::byte*>, class_count> free_;
  // Large buffers whose memory went back to the kernel: used after free_.
  std::array<std::vector<std::byte*>, class_count> released_;
  std::vector<std::byte*> chunks_;
};

}  // namespace bridge
