// Reusable I/O buffers in power-of-two size classes, so the steady state does
// no heap allocation per request. Single-threaded: used only on the loop thread.
#pragma once

#include <array>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

namespace bridge {

class BufferPool {
 public:
  static constexpr std::size_t smallest = 4096;
  static constexpr std::size_t class_count = 13;  // 4 KiB .. 16 MiB
  static constexpr std::size_t keep_per_class = 128;

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
    for (auto& list : free_)
      for (std::byte* buffer : list) std::free(buffer);
  }

  Lease acquire(std::size_t size) {
    std::size_t index = class_of(size);
    if (index >= class_count) return Lease(this, allocate(size), size);
    std::size_t capacity = smallest << index;
    auto& list = free_[index];
    if (!list.empty()) {
      std::byte* buffer = list.back();
      list.pop_back();
      return Lease(this, buffer, capacity);
    }
    return Lease(this, allocate(capacity), capacity);
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

  void give_back(std::byte* buffer, std::size_t capacity) {
    std::size_t index = class_of(capacity);
    if (index < class_count && (smallest << index) == capacity && free_[index].size() < keep_per_class) {
      free_[index].push_back(buffer);
      return;
    }
    std::free(buffer);
  }

  std::array<std::vector<std::byte*>, class_count> free_;
};

}  // namespace bridge
