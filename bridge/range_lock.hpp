// Exclusive locks on byte ranges, for read-modify-write of partial blocks: two
// writes touching the same server block must not interleave their read and
// write-back; also the range of a write answered early, still running at the server
// (hold_now()). Loop thread only; waiters sleep on a timer that release() and
// wake_all() cancel, and are served in arrival order where their ranges overlap.
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

  // Holds [begin, end) once no holder and no earlier waiter overlaps it: first come,
  // first served among overlapping ranges, so a read-modify-write is not starved by
  // aligned writes to the same block that keep arriving. Gives up, holding nothing (an
  // empty Guard), once *abandoned is true after a wake_all(): the caller's request was
  // answered meanwhile and sends nothing more.
  asio::awaitable<Guard> acquire(std::uint64_t begin, std::uint64_t end, const bool* abandoned = nullptr) {
    if (overlaps(begin, end) || waiter_overlaps(waiters_.end(), begin, end)) {
      if (abandoned && *abandoned) co_return Guard();
      asio::steady_timer wake(executor_, asio::steady_timer::time_point::max());
      auto waiting = waiters_.insert(waiters_.end(), {begin, end, &wake});
      // Also when the coroutine is destroyed while it waits (the loop shutting down).
      struct Leave {
        std::list<Waiter>& waiters;
        std::list<Waiter>::iterator waiting;
        ~Leave() { waiters.erase(waiting); }
      } leave{waiters_, waiting};
      do {
        std::error_code ignored;
        co_await wake.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
        if (abandoned && *abandoned) co_return Guard();
      } while (overlaps(begin, end) || waiter_overlaps(waiting, begin, end));
    }
    co_return Guard(this, held_.insert(held_.end(), {begin, end}));
  }

  // Holds [begin, end) at once, whoever else holds part of it: for a write already sent
  // (answered early while its command runs on), which later writes must not overtake.
  Guard hold_now(std::uint64_t begin, std::uint64_t end) { return Guard(this, held_.insert(held_.end(), {begin, end})); }

  // Nothing held, nobody waiting.
  bool idle() const { return held_.empty() && waiters_.empty(); }

  // Every waiter looks again (see acquire()'s abandoned).
  void wake_all() {
    for (const Waiter& waiter : waiters_) waiter.wake->cancel();
  }

  bool overlaps(std::uint64_t begin, std::uint64_t end) const {
    for (const auto& [held_begin, held_end] : held_)
      if (begin < held_end && held_begin < end) return true;
    return false;
  }

 private:
  struct Waiter {
    std::uint64_t begin;
    std::uint64_t end;
    asio::steady_timer* wake;
  };
  // Whether a waiter queued before `before` wants part of [begin, end).
  bool waiter_overlaps(std::list<Waiter>::const_iterator before, std::uint64_t begin, std::uint64_t end) const {
    for (auto waiter = waiters_.begin(); waiter != before; ++waiter)
      if (begin < waiter->end && waiter->begin < end) return true;
    return false;
  }

  void release(std::list<std::pair<std::uint64_t, std::uint64_t>>::iterator held) {
    held_.erase(held);
    wake_all();  // everyone re-checks, in queue order; the ranges are few (one per write in flight)
  }

  asio::any_io_executor executor_;
  std::list<std::pair<std::uint64_t, std::uint64_t>> held_;
  std::list<Waiter> waiters_;  // in arrival order
};

}  // namespace bridge
