// Application I/O made to fit the server: alignment to its minimum block size
// (read-modify-write under a range lock), durability (FUA or write+flush), zeroing
// with fallbacks, and SEEK_DATA/SEEK_HOLE from block status. Loop thread only;
// every buffer passed in must outlive the awaited call.
#pragma once

#include "bridge/buffer_pool.hpp"
#include "bridge/fault_injection.hpp"
#include "bridge/geometry.hpp"
#include "bridge/statistics.hpp"
#include "bridge/range_lock.hpp"
#include "nbd_client/connection_pool.hpp"

#include <asio/awaitable.hpp>
#include <asio/redirect_error.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <optional>
#include <system_error>
#include <vector>

namespace bridge {


// A hole for lseek must read as zeros: the server must say both "hole" and "zero".
constexpr bool is_hole(std::uint32_t flags) { return (flags & 1u) && (flags & 2u); }

// From extents covering [offset, ...) in order: the first position >= offset that
// is data (want_data) or hole (!want_data). Returns false if the extents end first.
bool find_in_extents(const std::vector<nbd_client::Extent>& extents, std::uint64_t offset, bool want_data,
                     std::uint64_t& found);

// What ends a request's claim on the server before its commands finish.
struct RequestLimits {
  using Clock = std::chrono::steady_clock;
  // The request was answered already (--request-timeout, a signal, a stop): nothing more is
  // sent for it, nor waited for through a reconnect (its buffers are held meanwhile).
  // Whoever sets it wakes the waits (BlockIo::release_answered()).
  const bool* answered = nullptr;
  // From then on no command of it is sent, not even again after a lost connection:
  // the request has been answered with EIO (--request-timeout), and a late copy of a
  // write could land after the application's next write to the range.
  Clock::time_point send_until = Clock::time_point::max();

  // The request's injected faults were drawn already (request_server draws them before
  // it chooses a path, the stop's flush wants none): a command of it injects none again.
  bool faults_drawn = false;
  // The delay they took: the NBD span of the request's first command includes it.
  std::chrono::nanoseconds injected_delay{0};

  bool given_up(Clock::time_point now) const { return (answered && *answered) || now >= send_until; }
};

class BlockIo {
 public:
  using Clock = std::chrono::steady_clock;
  BlockIo(asio::any_io_executor executor, nbd_client::ConnectionPool& pool, BufferPool& buffers)
      : executor_(executor), pool_(pool), buffers_(buffers), rmw_lock_(executor) {}

  void configure(const nbd_client::ExportInfo& info) { info_ = info; }
  // Both optional; they must outlive every command.
  void observe(Statistics* statistics, FaultInjector* faults) {
    statistics_ = statistics;
    faults_ = faults && faults->enabled() ? faults : nullptr;
  }
  const nbd_client::ExportInfo& info() const { return info_; }

  // Every request's commands end with EIO once its limits say so (RequestLimits).
  // Exactly [offset, offset+length) into out; the caller keeps the range within the export.
  asio::awaitable<std::error_code> read(std::byte* out, std::size_t length, std::uint64_t offset,
                                        RequestLimits limits = {});
  // durable: acknowledged only once on stable storage (O_SYNC/O_DSYNC writers).
  asio::awaitable<std::error_code> write(const std::byte* data, std::size_t length, std::uint64_t offset,
                                         bool durable, RequestLimits limits = {});
  // Makes the range read as zeros. allow_unmap: the server may deallocate it.
  asio::awaitable<std::error_code> zero(std::uint64_t offset, std::uint64_t length, bool allow_unmap,
                                        RequestLimits limits = {});
  // always: send the flush even when every acknowledged write is covered already
  // (fsync, durable writes). Without it (close's flush) nothing is sent then: a close
  // after fsync, or with nothing written, costs no round trip, nor waits for a reconnect.
  // flushed_slot: set to the connection slot the flush succeeded on.
  asio::awaitable<std::error_code> flush(bool always = true, RequestLimits limits = {},
                                         std::size_t* flushed_slot = nullptr);
  // Some requests were answered early (RequestLimits::answered): their waits for a
  // reconnect or for blocks another write holds end now, and their buffers go back.
  void release_answered() {
    pool_.wake_waiters();
    rmw_lock_.wake_all();
  }
  // Losses of connections that left acknowledged writes' fate unknown (fsync tells of them).
  std::uint64_t unknown_writes_events() const { return pool_.unknown_writes_events(); }
  // Acknowledged writes that no flush has covered yet (always false without flush).
  bool has_unflushed_writes() const { return info_.can_flush && pool_.has_unflushed_writes(); }
  // A flush could go out now, without waiting for a reconnect.
  bool can_flush_now() const { return pool_.any_usable(nbd_client::Purpose::flush); }
  // A large READ could go out now, without waiting for a reconnect.
  bool can_read_now() const { return pool_.any_usable(nbd_client::Purpose::large_read); }
  // lseek SEEK_DATA (want_data) / SEEK_HOLE; ENXIO at or past EOF or with no data after offset.
  asio::awaitable<std::error_code> seek(std::uint64_t offset, bool want_data, std::uint64_t& result,
                                        RequestLimits limits = {});
  // Bytes the server reports as allocated, scanning at most `max_commands` block-status
  // replies; the rest counts as allocated.
  asio::awaitable<std::uint64_t> allocated_bytes(unsigned max_commands);

 private:
  // Issues start(connection) on a usable connection; a command the connection
  // broke under was never acknowledged, so it is issued again once the pool has
  // reconnected (or fails with EIO when the pool gives up). start returns the
  // awaitable of one Connection::async_* call with use_result.
  struct CommandOptions {
    // false for the bridge's own background commands, so that the injected
    // sequence seen by the application depends only on the seed.
    bool inject = true;
    bool durable = false;  // a write sent with FUA: on stable storage once acknowledged
    RequestLimits limits;
  };
  // An injected delay. A timer alone woke 50-150 us late here (timer slack, the wake-up
  // itself): it sleeps until shortly before the moment and yields to the loop from
  // there. A request answered meanwhile (a stop, --request-timeout) ends it within
  // a slice: a long delay must not keep a stopped bridge alive. Returns the delay
  // taken, for the statistics.
  asio::awaitable<std::chrono::nanoseconds> wait_precisely(std::chrono::nanoseconds delay, RequestLimits limits) {
    constexpr auto yielding = std::chrono::microseconds(150);
    constexpr auto slice = std::chrono::milliseconds(100);
    const auto began = Clock::now();
    const auto deadline = began + delay;
    asio::steady_timer wait(executor_);
    for (auto now = began; deadline - now > yielding && !limits.given_up(now); now = Clock::now()) {
      wait.expires_at(std::min<Clock::time_point>(deadline - yielding, now + slice));
      std::error_code ignored;
      co_await wait.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
    }
    while (Clock::now() < deadline && !limits.given_up(Clock::now()))
      co_await asio::post(executor_, asio::use_awaitable);
    co_return Clock::now() - began;
  }
  template <typename Start>
  asio::awaitable<std::error_code> command(Operation operation, Start start, CommandOptions options = {}) {
    // An injected delay stands for the network: the first attempt's NBD span includes it.
    std::chrono::nanoseconds injected_delay = options.limits.injected_delay;
    if (faults_ && options.inject && !options.limits.faults_drawn)
      if (auto error = co_await inject_faults(options.limits, injected_delay)) co_return error;
    const auto purpose = operation == Operation::block_status ? nbd_client::Purpose::block_status
                         : operation == Operation::flush      ? nbd_client::Purpose::flush
                                                              : nbd_client::Purpose::data;
    // A command refused as "shutting down" is issued again after the reconnect. A
    // refusal that made the pool close its connections for a stop (drain) does not
    // count: a server restarted again and again stops each time. A server that refuses
    // while it stays (the pool took it for a refusal: no drain) is taken at its word
    // the second time.
    int shutdown_refusals = 0;
    // A command whose connection breaks under it again and again, soon after it is
    // sent (a server that crashes on it and is restarted each time: every outage is
    // short, so the pool never gives up), is issued again for at most the retry timeout
    // from the first such break. One that was in flight that long before breaking
    // broke for a reason of its own: the count starts again.
    std::optional<Clock::time_point> first_break;
    for (;;) {
      nbd_client::Connection* connection = pool_.least_loaded_usable(purpose);
      if (!connection) {
        if (options.limits.given_up(Clock::now())) co_return std::error_code(EIO, std::generic_category());
        connection = co_await pool_.usable_connection(purpose, options.limits.answered);  // through a reconnect
      }
      if (!connection || options.limits.given_up(Clock::now())) co_return std::error_code(EIO, std::generic_category());
      // The NBD span is each attempt's own (the first's with the injected delay): a
      // command issued again after a reconnect is a second command, and the outage
      // before it, or before the first, is not the server's latency.
      const auto attempt_sent = Clock::now();
      const auto sent = first_break ? attempt_sent : attempt_sent - injected_delay;
      auto [error] = co_await start(*connection);
      if (finished(operation, *connection, sent, error, options.durable)) co_return error;
      if (error.value() == ESHUTDOWN && !connection->drain_requested() && ++shutdown_refusals >= 2)
        co_return error;
      const auto broke = Clock::now();
      if (!first_break || broke - attempt_sent >= pool_.retry_timeout())
        first_break = broke;
      else if (broke - *first_break >= pool_.retry_timeout())
        co_return std::error_code(EIO, std::generic_category());
    }
  }

 public:
  bool injects_faults() const { return faults_ != nullptr; }
  // Injected faults act before a command reaches the server, as a slow or failing
  // network would: waits the delay (ended early if the request is answered), then
  // returns the error to fail the command with, if one is drawn.
  asio::awaitable<std::error_code> inject_faults(RequestLimits limits, std::chrono::nanoseconds& taken) {
    taken = std::chrono::nanoseconds(0);
    if (auto delay = faults_->next_delay(); delay.count() > 0) {
      taken = co_await wait_precisely(delay, limits);
      if (statistics_) statistics_->injected_delay(std::uint64_t(taken.count()));
    }
    if (int error = faults_->next_error()) {
      if (statistics_) statistics_->injected_error();
      co_return std::error_code(error, std::generic_category());
    }
    co_return std::error_code{};
  }

  // The per-request fast path, for a caller that awaits the connection itself and
  // so needs no coroutine frame of ours: a usable data connection when
  // [offset, offset+length) needs no alignment work and durability (if asked) is
  // one FUA write; nullptr when the request must go through read()/write(). A caller
  // draws the request's injected faults first (inject_faults), so that a run with
  // them takes the same path as one without.
  nbd_client::Connection* direct_connection(std::uint64_t offset, std::size_t length, bool durable = false,
                                            nbd_client::Purpose purpose = nbd_client::Purpose::data) const {
    const std::uint64_t unit = block();
    if ((durable && !info_.can_fua) || (unit > 1 && (offset % unit != 0 || length % unit != 0)))
      return nullptr;
    return pool_.least_loaded_usable(purpose);
  }
  // With a server's minimum block, a write holds the whole blocks it touches while in
  // flight, so a read-modify-write of a partial block among them (write()) reads after it
  // and cannot write older bytes back over it. write() takes the hold itself; a caller of
  // direct_connection() must take it around its own command, and drop it before write().
  // Also while a range is held for a write answered early (hold_after_answer()).
  bool writes_hold_blocks() const { return block() > 1 || !rmw_lock_.idle(); }
  // A write or zero answered early (--request-timeout, a stop) may still reach the server
  // after the application has written the same place again: until its commands end, later
  // writes there wait (bounded by their own limits), so that it cannot undo them.
  RangeLock::Guard hold_after_answer(std::uint64_t offset, std::uint64_t length) {
    const std::uint64_t unit = block();
    return rmw_lock_.hold_now(align_down(offset, unit), std::min(align_up(offset + length, unit), info_.size));
  }
  // A request answered while it waits holds nothing (see RangeLock::acquire()); its
  // limits then stop anything being sent.
  asio::awaitable<RangeLock::Guard> hold_blocks(std::uint64_t offset, std::size_t length, RequestLimits limits) {
    const std::uint64_t unit = block();
    return rmw_lock_.acquire(align_down(offset, unit), std::min(align_up(offset + length, unit), info_.size),
                             limits.answered);
  }
  // Writes this long go to the large-write connection when there is one
  // (--connection-threads writes): their copy into the socket then overlaps the
  // loop's copy out of /dev/fuse.
  static nbd_client::Purpose write_purpose(std::size_t length) {
    return length >= large_request ? nbd_client::Purpose::large_write : nbd_client::Purpose::data;
  }
  // Reads this long may also go to the block-status connection (a second socket).
  static nbd_client::Purpose read_purpose(std::size_t length) {
    return length >= large_request ? nbd_client::Purpose::large_read : nbd_client::Purpose::data;
  }
  static constexpr std::size_t large_request = 128 * 1024;
  // Records a command that ran on `connection`; false when the connection broke
  // under it (never acknowledged), so that it must be issued again. durable: a
  // write with FUA.
  bool finished(Operation operation, const nbd_client::Connection& connection,
                std::chrono::steady_clock::time_point sent, std::error_code error, bool durable = false) {
    // Without flush the server keeps no volatile cache: acknowledged is durable.
    if (!error && !durable && info_.can_flush && (operation == Operation::write || operation == Operation::trim_zero))
      pool_.write_acknowledged(connection);
    if (statistics_compiled_in && statistics_)
      statistics_->command_finished(
          operation, connection.index(),
          std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - sent)
                            .count()),
          bool(error));
    // Still usable after a "connection" error: the server itself said so; do not spin.
    return !nbd_client::is_connection_failure(error) || connection.usable();
  }

 private:
  std::uint64_t block() const { return info_.minimum_block > 1 ? info_.minimum_block : 1; }
  asio::awaitable<std::error_code> write_aligned(const std::byte* data, std::size_t length, std::uint64_t offset,
                                                 bool durable, RequestLimits limits);
  asio::awaitable<std::error_code> zero_aligned(std::uint64_t offset, std::uint64_t length, bool allow_unmap,
                                                RequestLimits limits);

  asio::any_io_executor executor_;
  nbd_client::ConnectionPool& pool_;
  BufferPool& buffers_;
  Statistics* statistics_ = nullptr;
  FaultInjector* faults_ = nullptr;
  RangeLock rmw_lock_;
  nbd_client::ExportInfo info_;
};

}  // namespace bridge
