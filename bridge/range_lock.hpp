// Exclusive locks on byte ranges, for read-modify-write of partial blocks: two
// writes touching the same server block must not interleave their read and
// write-back. Loop thread only; waiters sleep on a timer that release() cancels.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/redirect_error.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <cstdint>
#include <list>

namespace bridge {

class RangeLock {
 public:
  explicit RangeLock(asio::any_io_executor executor) : executor_(executor) {}

  // Holds [begin, end) until destroyed.
  class Guard {
   public:
    Guard() = default;
    Guard(RangeLock* lock, std::list<std::pair<std::uint64_t, std::uint64_t>>::iterator held)
        : lock_(lock), held_(held) {}
    Guard(Guard&& other) noexcept : lock_(std::exchange(other.lock_, nullptr)), held_(other.held_) {}
    Guard& operator=(Guard&&) = delete;
    ~Guard() {
      if (lock_) lock_->release(held_);
    }

   private:
    RangeLock* lock_ = nullptr;
    std::list<std::pair<std::uint64_t, std::uint64_t>>::iterator held_;
  };

  asio::awaitable<Guard> acquire(std::uint64_t begin, std::uint64_t end) {
    while (overlaps(begin, end)) {
      asio::steady_timer wake(executor_, asio::steady_timer::time_point::max());
      auto waiting = waiters_.insert(waiters_.end(), &wake);
      std::error_code ignored;
      co_await wake.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
      waiters_.erase(waiting);
    }
    co_return Guard(this, held_.insert(held_.end(), {begin, end}));
  }

  bool overlaps(std::uint64_t begin, std::uint64_t end) const {
    for (const auto& [held_begin, held_end] : held_)
      if (begin < held_end && held_begin < end) return true;
    return false;
  }

 private:
  void release(std::list<std::pair<std::uint64_t, std::uint64_t>>::iterator held) {
    held_.erase(held);
    // Everyone re-checks; the ranges are few (one per write in flight).
    for (asio::steady_timer* waiter : waiters_) waiter->cancel();
  }

  asio::any_io_executor executor_;
  std::list<std::pair<std::uint64_t, std::uint64_t>> held_;
  std::list<asio::steady_timer*> waiters_;
};

}  // namespace bridge
