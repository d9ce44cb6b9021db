// Application I/O made to fit the server: alignment to its minimum block size
// (read-modify-write under a range lock), durability (FUA or write+flush), zeroing
// with fallbacks, and SEEK_DATA/SEEK_HOLE from block status. Loop thread only;
// every buffer passed in must outlive the awaited call.
#pragma once

#include "bridge/buffer_pool.hpp"
#include "bridge/range_lock.hpp"
#include "nbd_client/connection_pool.hpp"

#include <asio/awaitable.hpp>

#include <cstdint>
#include <system_error>
#include <vector>

namespace bridge {

// Rounding to a power-of-two-or-not block size, as the server advertises it.
constexpr std::uint64_t align_down(std::uint64_t value, std::uint64_t block) { return value / block * block; }
constexpr std::uint64_t align_up(std::uint64_t value, std::uint64_t block) {
  return (value + block - 1) / block * block;
}

// A hole for lseek must read as zeros: the server must say both "hole" and "zero".
constexpr bool is_hole(std::uint32_t flags) { return (flags & 1u) && (flags & 2u); }

// From extents covering [offset, ...) in order: the first position >= offset that
// is data (want_data) or hole (!want_data). Returns false if the extents end first.
bool find_in_extents(const std::vector<nbd_client::Extent>& extents, std::uint64_t offset, bool want_data,
                     std::uint64_t& found);

class BlockIo {
 public:
  BlockIo(asio::any_io_executor executor, nbd_client::ConnectionPool& pool, BufferPool& buffers)
      : pool_(pool), buffers_(buffers), rmw_lock_(executor) {}

  void configure(const nbd_client::ExportInfo& info) { info_ = info; }
  const nbd_client::ExportInfo& info() const { return info_; }

  // Exactly [offset, offset+length) into out; the caller keeps the range within the export.
  asio::awaitable<std::error_code> read(std::byte* out, std::size_t length, std::uint64_t offset);
  // durable: acknowledged only once on stable storage (O_SYNC/O_DSYNC writers).
  asio::awaitable<std::error_code> write(const std::byte* data, std::size_t length, std::uint64_t offset,
                                         bool durable);
  // Makes the range read as zeros. allow_unmap: the server may deallocate it.
  asio::awaitable<std::error_code> zero(std::uint64_t offset, std::uint64_t length, bool allow_unmap);
  asio::awaitable<std::error_code> flush();
  // lseek SEEK_DATA (want_data) / SEEK_HOLE; ENXIO at or past EOF or with no data after offset.
  asio::awaitable<std::error_code> seek(std::uint64_t offset, bool want_data, std::uint64_t& result);
  // Bytes the server reports as allocated, scanning at most `max_commands` block-status
  // replies; the rest counts as allocated.
  asio::awaitable<std::uint64_t> allocated_bytes(unsigned max_commands);

 private:
  // Issues start(connection) on a usable connection; a command the connection
  // broke under was never acknowledged, so it is issued again once the pool has
  // reconnected (or fails with EIO when the pool gives up). start returns the
  // awaitable of one Connection::async_* call with use_result.
  template <typename Start>
  asio::awaitable<std::error_code> command(Start start) {
    for (;;) {
      nbd_client::Connection* connection = co_await pool_.usable_connection();
      if (!connection) co_return std::error_code(EIO, std::generic_category());
      auto [error] = co_await start(*connection);
      // Still usable after a "connection" error: the server itself said so; do not spin.
      if (!nbd_client::is_connection_failure(error) || connection->usable()) co_return error;
    }
  }

  std::uint64_t block() const { return info_.minimum_block > 1 ? info_.minimum_block : 1; }
  asio::awaitable<std::error_code> write_aligned(const std::byte* data, std::size_t length, std::uint64_t offset,
                                                 bool durable);
  asio::awaitable<std::error_code> zero_aligned(std::uint64_t offset, std::uint64_t length, bool allow_unmap);

  nbd_client::ConnectionPool& pool_;
  BufferPool& buffers_;
  RangeLock rmw_lock_;
  nbd_client::ExportInfo info_;
};

}  // namespace bridge
