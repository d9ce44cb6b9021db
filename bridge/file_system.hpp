// The bridge: FUSE requests on the exported file become pipelined NBD commands.
// Single-threaded on the loop; each READ/WRITE/FLUSH/FSYNC is one coroutine that
// owns copies of what it needs (only fuse_req_t outlives a handler) and replies
// exactly once, through the in-flight list so shutdown can answer stragglers.
#pragma once

#include "bridge/block_io.hpp"
#include "bridge/buffer_pool.hpp"
#include "bridge/read_ahead.hpp"
#include "fuse_front/operations.hpp"
#include "fuse_front/session.hpp"
#include "nbd_client/connection_pool.hpp"

#include <asio/awaitable.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/steady_timer.hpp>

#include <chrono>
#include <cstdint>
#include <ctime>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>
#include <string>
#include <vector>

namespace bridge {

enum class CacheMode { none, page };

struct FileSystemOptions {
  std::string file_name;  // directory mode: the export's name in the root; empty: file mode
  CacheMode cache = CacheMode::none;
  bool verbose = false;
  std::chrono::milliseconds request_timeout{0};  // 0: requests may take as long as they take
  // READ replies at least this long go out from the session's reply thread (0: never).
  std::size_t reply_thread_minimum = 128 * 1024;
  // READs at least this long are answered by splice() from the NBD socket
  // through a pipe (fuse_front/reply_pipe.hpp) when the connection allows (0: never).
  std::size_t spliced_read_minimum = 128 * 1024;
  // WRITEs at least this long hand their payload's pages to the NBD socket
  // instead of a copy (socket_batching::SentByReference) when the connection
  // allows (0: never).
  std::size_t spliced_write_minimum = 128 * 1024;
  // After this long without a READ, WRITE or other data request, the buffers' memory
  // goes back to the system (0: kept for the next burst).
  std::chrono::milliseconds idle_release{10000};
  // Small sequential buffered READs under CacheMode::none are answered from windows
  // fetched ahead (bridge/read_ahead.hpp); O_DIRECT ones never are.
  bool read_ahead = true;
};

class FileSystem final : public fuse_front::Handlers {
 public:
  FileSystem(asio::any_io_executor executor, nbd_client::ConnectionPool& pool, fuse_front::Session& session,
             FileSystemOptions options);

  void set_export(const nbd_client::ExportInfo& info);

  // Counters and latency histograms of every request; lives as long as the file system.
  Statistics& statistics() { return *statistics_; }
  // Optional client-side fault injection (--inject-delay/--inject-error).
  void inject_faults(std::unique_ptr<FaultInjector> faults);

  // Runs once, after the kernel's INIT has been answered and the first count of the
  // export's allocation (st_blocks) is in, or live_wait_bound has passed: the mount is
  // live. A tool started then (cp --sparse=auto) must not see the whole export as
  // allocated, or it reads every hole instead of seeking past them.
  std::function<void()> on_live;
  static constexpr std::chrono::seconds live_wait_bound{2};

  // Waits up to `bound` for requests in flight, then answers the rest with EIO.
  asio::awaitable<void> drain(std::chrono::milliseconds bound);
  // drain()'s flush at stop was needed but not done: writes no fsync covered may be lost.
  bool stop_left_writes_unflushed() const { return stop_left_writes_unflushed_; }
  std::size_t in_flight() const { return in_flight_count_; }

  void init(fuse_conn_info* connection) override;
  void lookup(fuse_req_t request, fuse_ino_t parent, const char* name) override;
  void getattr(fuse_req_t request, fuse_ino_t inode) override;
  void setattr(fuse_req_t request, fuse_ino_t inode, const struct stat& attributes, int to_set,
               const fuse_file_info* file) override;
  void open(fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) override;
  void read(fuse_req_t request, std::size_t size, off_t offset, const fuse_file_info* file) override;
  void write(fuse_req_t request, const char* data, std::size_t size, off_t offset,
             const fuse_file_info* file) override;
  void flush(fuse_req_t request, const fuse_file_info* file) override;
  void fsync(fuse_req_t request, bool data_only, const fuse_file_info* file) override;
  void opendir(fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) override;
  void readdir(fuse_req_t request, fuse_ino_t inode, std::size_t size, off_t offset) override;
  void statfs(fuse_req_t request) override;
  void fallocate(fuse_req_t request, int mode, off_t offset, off_t length) override;
  void lseek(fuse_req_t request, off_t offset, int whence, const fuse_file_info* file) override;
  void release(fuse_req_t request, fuse_ino_t inode, const fuse_file_info* file) override;

 private:
  // One request being served; lives in its coroutine's frame and links itself
  // into the in-flight list for as long as it exists.
  class Tracked {
   public:
    // unique: the kernel's id of a READ or lseek, which a signal may interrupt (0: not
    // interruptible).
    Tracked(FileSystem& owner, fuse_req_t request, Operation kind, const char* operation, std::uint64_t offset,
            std::size_t length, std::uint64_t unique = 0);
    ~Tracked();
    Tracked(const Tracked&) = delete;
    Tracked& operator=(const Tracked&) = delete;

    void reply_error(int error);  // 0 means success for FLUSH/FSYNC
    // Answers before the commands finish (a timeout, a signal, a stop): they end
    // without sending more (limits()), or run on until the server answers. Returns
    // whether this answered it.
    bool answer_early(int error);
    void reply_data(const std::byte* data, std::size_t length);
    void reply_written(std::size_t length);
    // Sends the READ reply waiting in pipe (header and length bytes), from the
    // reply thread when other requests are in flight.
    asio::awaitable<void> reply_piped(fuse_front::ReplyPipe& pipe, std::size_t length);
    // For BlockIo: answered (a timeout, a signal, a stop), nothing more is sent for it;
    // and with --request-timeout, no write or zero of it past its expiry.
    RequestLimits limits() const;

   private:
    friend class FileSystem;
    bool begin_reply();
    void trace_reply(int error, std::size_t length) const;
    void record(int error, std::size_t length) const;

    FileSystem& owner_;
    fuse_req_t request_;
    Operation kind_;
    const char* operation_;
    std::uint64_t id_;
    std::uint64_t offset_;
    std::size_t length_;
    std::chrono::steady_clock::time_point started_;
    std::uint64_t unique_;
    std::chrono::steady_clock::time_point interrupted_at_{};  // the epoch: not interrupted
    bool replied_ = false;
    bool answered_early_ = false;
    std::optional<RangeLock::Guard> held_after_answer_;  // a write's range, until its commands end
    Tracked* previous_ = nullptr;
    Tracked* next_ = nullptr;
  };

  // A READ or WRITE for a request server. The WRITE payload lives in the FUSE
  // receive buffer that `payload` owns.
  struct Job {
    Operation kind = Operation::read;
    fuse_req_t request = nullptr;
    std::size_t length = 0;
    std::uint64_t offset = 0;
    fuse_front::RequestBuffer payload;
    const std::byte* data = nullptr;
    bool durable = false;
    std::uint64_t unique = 0;  // READ: the FUSE request's id, for a spliced reply
    std::uint64_t handle = 0;  // READ: the open file's
    bool read_ahead = false;   // READ: small and buffered: may be answered from a read-ahead window
  };
  using Resumption = asio::async_result<asio::use_awaitable_t<>, void()>::handler_type;
  // A coroutine that serves READs and WRITEs one after another and parks in
  // between, as ublksrv keeps one coroutine per queue tag: no coroutine frame is
  // allocated per request (a co_spawn per request churned Asio's frame cache,
  // ~5 heap allocations per request). Loop thread only.
  struct RequestServer {
    Job job;
    std::optional<Resumption> parked;  // set while idle; resuming hands over `job`
    bool stop = false;
  };
  bool keep_pipe(fuse_front::ReplyPipe*& pipe, const nbd_client::socket_batching::PipedPayload& piped,
                 std::error_code error);
  // Whether a READ reply of `length` goes out from the session's reply thread.
  bool reply_from_thread(std::size_t length) const;
  void hand_over(Job job);
  asio::awaitable<std::error_code> draw_faults(RequestLimits& limits);
  // Answers a READ from a read-ahead window if one holds it, and fetches the file's
  // next window when its reads call for one. Whether it answered.
  bool answer_from_read_ahead(Tracked& tracked, const Job& job);
  asio::awaitable<void> fetch_ahead(ReadAhead<BufferPool::Lease>::Fetch fetch);
  asio::awaitable<void> request_server(RequestServer& self);
  void stop_request_servers();
  asio::awaitable<void> serve_flush(fuse_req_t request, bool fsync, std::uint64_t handle);
  asio::awaitable<void> serve_zero(fuse_req_t request, std::uint64_t offset, std::uint64_t length, bool allow_unmap);
  asio::awaitable<void> serve_seek(fuse_req_t request, std::uint64_t offset, bool want_data, std::uint64_t unique);
  // st_blocks follows the server's allocation, re-counted in the background
  // when someone asks after this mount's writes, or once the last count is a few
  // seconds old (other clients write too).
  asio::awaitable<void> count_allocation();
  // With a request timeout: answers requests older than it with EIO. One timer
  // for all requests, so nothing is allocated per request.
  asio::awaitable<void> expire_old_requests();
  void interrupt(std::uint64_t unique);
  asio::awaitable<void> flush_at_stop();
  void answer_interrupts_later();
  // After a write or zero of `allocating` bytes (0 for a punched hole) by this mount.
  void note_allocation_changed(std::uint64_t allocating) {
    allocation_stale_ = true;
    written_since_count_began_ += allocating;
  }
  // st_blocks' bytes: the last count, plus what this mount wrote since that count
  // began (a write may fill a hole the count saw), until a count that began after
  // them is in. Never less than this mount's own writes allocated: tar -S takes
  // st_blocks == 0 for a file of holes and archives none of its data.
  std::uint64_t allocation_estimate() const;
  // The idle check: armed by the first request after a release, so that a busy
  // mount pays one flag test per request and an idle one no wake-ups.
  void arm_idle_release();
  void release_idle_memory();

  bool is_file(fuse_ino_t inode) const;
  bool exists(fuse_ino_t inode) const;
  struct stat attributes_of(fuse_ino_t inode) const;

  asio::any_io_executor executor_;
  fuse_front::Session& session_;
  FileSystemOptions options_;
  nbd_client::ExportInfo export_;
  BufferPool buffers_;
  std::unique_ptr<Statistics> statistics_;
  std::unique_ptr<FaultInjector> faults_;
  BlockIo io_;
  ReadAhead<BufferPool::Lease> read_ahead_;  // its windows' buffers go back to buffers_, declared before it
  static constexpr std::size_t fetches_at_most = 8;
  std::size_t fetches_running_ = 0;
  // Open handles of the .stats file: each holds the JSON taken at its open.
  std::unordered_map<std::uint64_t, std::string> stats_snapshots_;
  std::uint64_t next_stats_handle_ = 2;
  // Open handles of the export: how many losses of acknowledged writes (BlockIo::
  // unknown_writes_events()) each was told of by fsync; and the most any was told of.
  std::unordered_map<std::uint64_t, std::uint64_t> unknown_writes_told_;
  std::uint64_t unknown_writes_reported_ = 0;
  std::uint64_t next_export_handle_ = 1;
  std::uint64_t allocated_bytes_ = 0;
  std::uint64_t written_since_count_began_ = 0;  // since the latest count (running or done) began
  std::uint64_t written_before_count_began_ = 0;  // from allocated_bytes_' count's start to the latest's
  bool allocation_stale_ = true;
  bool allocation_counting_ = false;
  bool allocation_counted_ = false;  // the first count is in: st_blocks is no longer a guess
  std::chrono::steady_clock::time_point allocation_counted_at_{};  // when the last count began
  double file_attribute_timeout() const;
  timespec mounted_at_{};
  uid_t owner_uid_;
  gid_t owner_gid_;
  std::uint64_t next_request_id_ = 1;
  std::size_t in_flight_count_ = 0;
  Tracked* in_flight_head_ = nullptr;
  std::vector<std::unique_ptr<RequestServer>> request_servers_;
  std::vector<RequestServer*> idle_request_servers_;
  asio::steady_timer drained_;
  asio::steady_timer expiry_sweep_;
  asio::steady_timer live_deadline_;
  asio::steady_timer interrupt_timer_;
  bool interrupt_timer_armed_ = false;
  asio::steady_timer idle_release_timer_;
  bool idle_release_armed_ = false;
  std::uint64_t request_id_at_idle_check_ = 0;
  void go_live();
  bool draining_ = false;
  bool stop_left_writes_unflushed_ = false;
};

}  // namespace bridge
