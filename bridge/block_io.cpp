// Alignment, durability, zeroing and seeking on top of the connection pool.
// Loop thread only; see block_io.hpp.
#include "bridge/block_io.hpp"

#include <libnbd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace bridge {

namespace {

using nbd_client::Connection;
using nbd_client::use_result;

std::error_code errno_code(int value) { return {value, std::generic_category()}; }

// Block status is asked for in pieces of at most this much; servers may answer less.
constexpr std::uint64_t status_span = std::uint64_t(1) << 30;
// An O_SYNC write (on a server without FUA) that keeps seeing a connection lost
// between its write and its flush gets EIO after this many tries, not a loop.
constexpr int durable_write_attempts = 3;

}  // namespace

bool find_in_extents(const std::vector<nbd_client::Extent>& extents, std::uint64_t offset, bool want_data,
                     std::uint64_t& found) {
  for (const auto& extent : extents) {
    if (extent.offset + extent.length <= offset) continue;
    if (is_hole(extent.flags) != want_data) {
      found = std::max(extent.offset, offset);
      return true;
    }
  }
  return false;
}

asio::awaitable<std::error_code> BlockIo::read(std::byte* out, std::size_t length, std::uint64_t offset,
                                               RequestLimits limits) {
  const std::uint64_t unit = block();
  if (unit == 1 || (offset % unit == 0 && length % unit == 0)) {
    co_return co_await command(Operation::read, [&](Connection& connection) {
      return connection.async_pread(out, length, offset, use_result);
    }, {.limits = limits});
  }
  // Widen to whole blocks, then copy out the part asked for.
  std::uint64_t start = align_down(offset, unit);
  std::uint64_t end = std::min(align_up(offset + length, unit), info_.size);
  BufferPool::Lease whole = buffers_.acquire(end - start);
  std::error_code error = co_await command(Operation::read, [&](Connection& connection) {
    return connection.async_pread(whole.data(), end - start, start, use_result);
  }, {.limits = limits});
  if (!error) std::memcpy(out, whole.data() + (offset - start), length);
  co_return error;
}

asio::awaitable<std::error_code> BlockIo::write_aligned(const std::byte* data, std::size_t length,
                                                        std::uint64_t offset, bool durable,
                                                        RequestLimits limits) {
  std::uint32_t flags = durable && info_.can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  const bool flush_after = durable && !info_.can_fua && info_.can_flush;  // without flush, acknowledged is durable
  for (int attempt = 1;; ++attempt) {
    std::uint64_t losses_mark = 0;
    std::size_t written_on = 0;
    std::error_code error = co_await command(Operation::write, [&](Connection& connection) {
      losses_mark = pool_.disconnects();  // as the write is sent (again, if retried)
      written_on = connection.index();
      return connection.async_pwrite(data, length, offset, flags, use_result);
    }, {.durable = flags != 0, .limits = limits});
    if (error || !flush_after) co_return error;
    std::size_t flushed_on = 0;
    if ((error = co_await flush(true, limits, &flushed_on))) co_return error;
    // The write's connection lost before the flush succeeded may have taken the write
    // with the server's cache, and the flush's own, lost and made again, may have gone
    // to a server that never had it. The request is not answered yet: it writes again.
    // (Other connections' losses, a block-status one say, do not count.)
    if (!pool_.lost_since(written_on, losses_mark) && !pool_.lost_since(flushed_on, losses_mark))
      co_return std::error_code{};
    if (attempt == durable_write_attempts || limits.given_up(Clock::now())) co_return errno_code(EIO);
  }
}

asio::awaitable<std::error_code> BlockIo::write(const std::byte* data, std::size_t length, std::uint64_t offset,
                                                bool durable, RequestLimits limits) {
  const std::uint64_t unit = block();
  // Without a minimum block the lock matters only while a write answered early holds a
  // range (hold_after_answer()); then the path below takes it, its blocks being bytes.
  if (unit == 1 && rmw_lock_.idle()) co_return co_await write_aligned(data, length, offset, durable, limits);

  std::uint64_t start = align_down(offset, unit);
  std::uint64_t end = std::min(align_up(offset + length, unit), info_.size);
  // Every write to a server with a minimum block takes the lock over the whole
  // blocks it touches: an aligned write racing a read-modify-write of the same
  // block would otherwise be undone by the stale write-back.
  RangeLock::Guard guard = co_await rmw_lock_.acquire(start, end, limits.answered);
  if (limits.given_up(Clock::now())) co_return errno_code(EIO);  // answered while it waited: holds nothing
  if (offset == start && offset + length == end)
    co_return co_await write_aligned(data, length, offset, durable, limits);

  BufferPool::Lease whole = buffers_.acquire(end - start);
  // Read only the partial blocks at either end; the middle is overwritten anyway.
  std::uint64_t head_end = std::min(start + unit, end);
  if (offset != start || offset + length < head_end) {
    if (auto error = co_await command(Operation::read, [&](Connection& connection) {
          return connection.async_pread(whole.data(), head_end - start, start, use_result);
        }, {.limits = limits}))
      co_return error;
  }
  std::uint64_t tail_start = std::max(align_down(offset + length, unit), head_end);
  if (tail_start < end && offset + length != end) {
    if (auto error = co_await command(Operation::read, [&](Connection& connection) {
          return connection.async_pread(whole.data() + (tail_start - start), end - tail_start, tail_start, use_result);
        }, {.limits = limits}))
      co_return error;
  }
  std::memcpy(whole.data() + (offset - start), data, length);
  co_return co_await write_aligned(whole.data(), end - start, start, durable, limits);
}

asio::awaitable<std::error_code> BlockIo::zero_aligned(std::uint64_t offset, std::uint64_t length, bool allow_unmap,
                                                       RequestLimits limits) {
  if (length == 0) co_return std::error_code{};
  if (info_.can_zero) {
    std::uint32_t flags = allow_unmap ? 0 : LIBNBD_CMD_FLAG_NO_HOLE;
    co_return co_await command(Operation::trim_zero, [&](Connection& connection) {
      return connection.async_zero(length, offset, flags, use_result);
    }, {.limits = limits});
  }
  // No WRITE_ZEROES: write zero-filled buffers over the whole range. (TRIM alone
  // does not promise that the range reads back as zeros.)
  co_return co_await command(Operation::trim_zero, [&](Connection& connection) {
    return connection.async_write_zero_fill(length, offset, 0, use_result);
  }, {.limits = limits});
}

asio::awaitable<std::error_code> BlockIo::zero(std::uint64_t offset, std::uint64_t length, bool allow_unmap,
                                               RequestLimits limits) {
  const std::uint64_t unit = block();
  // As in write(): with unit 1 the path below only takes the lock, over [offset, offset+length).
  if (unit == 1 && rmw_lock_.idle()) co_return co_await zero_aligned(offset, length, allow_unmap, limits);
  std::uint64_t inner_start = align_up(offset, unit);
  std::uint64_t inner_end = align_down(offset + length, unit);
  if (inner_start >= inner_end) inner_start = inner_end = offset;  // no whole block inside
  // Partial blocks at the ends are written as zeros, by read-modify-write.
  for (auto [piece_start, piece_end] : {std::pair{offset, inner_start}, std::pair{inner_end, offset + length}}) {
    if (piece_start >= piece_end) continue;
    BufferPool::Lease zeros = buffers_.acquire(piece_end - piece_start);
    std::memset(zeros.data(), 0, piece_end - piece_start);
    if (auto error = co_await write(zeros.data(), piece_end - piece_start, piece_start, false, limits))
      co_return error;
  }
  if (inner_start < inner_end) {
    RangeLock::Guard guard = co_await rmw_lock_.acquire(inner_start, inner_end, limits.answered);
    if (limits.given_up(Clock::now())) co_return errno_code(EIO);  // answered while it waited: holds nothing
    co_return co_await zero_aligned(inner_start, inner_end - inner_start, allow_unmap, limits);
  }
  co_return std::error_code{};
}

asio::awaitable<std::error_code> BlockIo::flush(bool always, RequestLimits limits, std::size_t* flushed_slot) {
  if (!info_.can_flush || (!always && !pool_.has_unflushed_writes())) co_return std::error_code{};
  std::uint64_t mark = 0;
  std::size_t flushed_on = 0;
  std::error_code error = co_await command(Operation::flush, [&](Connection& connection) {
    // The flush covers what was acknowledged before it is sent (a retry marks again).
    mark = pool_.flush_mark();
    flushed_on = connection.index();
    return connection.async_flush(use_result);
  }, {.limits = limits});
  if (error) {
    // The server failed it (not a timeout, a signal or a lost server: those are
    // accounted elsewhere): what it was to cover may be gone, as Linux drops pages whose
    // writeback failed, so every open file's next fsync is told (unknown_writes_events()).
    if (!limits.given_up(Clock::now()) && pool_.any_usable(nbd_client::Purpose::flush)) pool_.flush_failed();
    co_return error;
  }
  pool_.flush_succeeded(flushed_on, mark);
  if (flushed_slot) *flushed_slot = flushed_on;
  co_return std::error_code{};
}

asio::awaitable<std::error_code> BlockIo::seek(std::uint64_t offset, bool want_data, std::uint64_t& result,
                                               RequestLimits limits) {
  if (offset >= info_.size) co_return errno_code(ENXIO);
  if (!info_.can_block_status) {
    // Without block status everything is data, and the only hole is at EOF.
    result = want_data ? offset : info_.size;
    co_return std::error_code{};
  }
  std::vector<nbd_client::Extent> extents;
  for (std::uint64_t position = offset; position < info_.size;) {
    // A server's minimum block binds block status too (libnbd refuses an unaligned one);
    // find_in_extents skips what lies before position.
    const std::uint64_t asked = align_down(position, block());
    extents.clear();
    if (auto error = co_await command(Operation::block_status, [&](Connection& connection) {
          extents.clear();  // a retried command starts afresh
          return connection.async_block_status(std::size_t(std::min(info_.size - asked, status_span)), asked,
                                               extents, use_result);
        }, {.limits = limits}))
      co_return error;
    if (extents.empty()) {
      // A server that describes nothing: treat the rest as data.
      result = want_data ? position : info_.size;
      co_return std::error_code{};
    }
    std::uint64_t found;
    if (find_in_extents(extents, position, want_data, found)) {
      if (found >= info_.size) break;
      result = found;
      co_return std::error_code{};
    }
    const std::uint64_t described_to = extents.back().offset + extents.back().length;
    if (described_to <= position) {
      // Extents that end before where we are (the spec forbids them): asking again
      // would get the same, forever. Treat the rest as data, as for no extents at all.
      result = want_data ? position : info_.size;
      co_return std::error_code{};
    }
    position = described_to;
  }
  if (want_data) co_return errno_code(ENXIO);
  result = info_.size;  // the implicit hole at EOF
  co_return std::error_code{};
}

asio::awaitable<std::uint64_t> BlockIo::allocated_bytes(unsigned max_commands) {
  if (!info_.can_block_status) co_return info_.size;
  std::uint64_t allocated = 0;
  std::uint64_t position = 0;
  std::vector<nbd_client::Extent> extents;
  for (unsigned asked = 0; asked < max_commands && position < info_.size; ++asked) {
    extents.clear();
    std::error_code error = co_await command(Operation::block_status, [&](Connection& connection) {
      extents.clear();
      return connection.async_block_status(std::size_t(std::min(info_.size - position, status_span)), position,
                                           extents, use_result);
    }, {.inject = false});
    if (error || extents.empty()) break;
    for (const auto& extent : extents) {
      std::uint64_t extent_end = std::min(extent.offset + extent.length, info_.size);
      if (extent_end <= position) continue;
      if (!is_hole(extent.flags)) allocated += extent_end - std::max(extent.offset, position);
    }
    position = std::min(extents.back().offset + extents.back().length, info_.size);
  }
  co_return allocated + (info_.size - position);
}

}  // namespace bridge
