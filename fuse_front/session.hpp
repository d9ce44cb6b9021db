// The libfuse low-level session: mount, unmount, and the non-blocking /dev/fuse
// fd read from the Asio loop. Single-threaded: handlers run inside receive(), on
// the loop thread. Each request arrives in its own buffer; a handler that needs
// the payload after it returns (WRITE) claims that buffer, so no buffer is reused
// under a request still in flight.
#pragma once

#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 34
#endif

#include <fuse_lowlevel.h>

#include <asio/any_io_executor.hpp>
#include <asio/posix/stream_descriptor.hpp>

#include "fuse_front/reply_worker.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

namespace fuse_front {

class Session;

// Owns one receive buffer; gives it back to its session's free list when destroyed.
// payload_resident: the buffer's huge-page region has been written to (a large
// request used it), so it holds memory until released.
class RequestBuffer {
 public:
  RequestBuffer() = default;
  RequestBuffer(Session* session, std::byte* data, bool payload_resident)
      : session_(session), data_(data), payload_resident_(payload_resident) {}
  RequestBuffer(RequestBuffer&& other) noexcept;
  RequestBuffer& operator=(RequestBuffer&& other) noexcept;
  ~RequestBuffer();
  std::byte* data() const { return data_; }
  explicit operator bool() const { return data_ != nullptr; }
  // Its pages may still be read by someone else (a socket that took them by
  // reference and was abandoned): at release they are unmapped, never reused.
  void retire_when_released() { retire_ = true; }

 private:
  void release();
  Session* session_ = nullptr;
  std::byte* data_ = nullptr;
  bool payload_resident_ = false;
  bool retire_ = false;
};

class Session {
 public:
  Session(asio::any_io_executor executor, const fuse_lowlevel_ops& operations, void* user_data);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // mount_options are the comma-free words given with -o, plus our own.
  std::error_code mount(const std::string& mountpoint, const std::vector<std::string>& mount_options,
                        std::string& error_message);

  // Starts reading requests; on_ended runs once when the kernel reports the
  // filesystem unmounted (fusermount3 -u, umount) or the connection aborted.
  void start(std::function<void()> on_ended);
  // FUSE_INTERRUPT: a signal for the thread waiting on request `unique`. Taken here,
  // not by libfuse; the handler may answer that request (at most once, as always).
  void on_interrupt(std::function<void(std::uint64_t unique)> handler) { on_interrupt_ = std::move(handler); }
  void stop_receiving();
  void unmount();
  bool mounted() const { return mounted_; }
  // -o max_read=N as given (0: none): libfuse refuses INIT unless init() sets the same.
  unsigned requested_max_read() const { return requested_max_read_; }
  // libfuse refused the kernel's INIT (the mount never served a request); why, in one line.
  bool init_refused() const { return init_refused_; }
  const std::string& init_failure() const { return init_failure_; }

  // fuse_reply_open, plus open flags libfuse 3.14 cannot express (e.g.
  // FOPEN_PARALLEL_DIRECT_WRITES, 1 << 6).
  void reply_open(fuse_req_t request, const fuse_file_info* file, std::uint32_t extra_open_flags);

  // Only valid inside a handler: keeps the current request's buffer alive.
  RequestBuffer claim_request_buffer();

  // The thread for large READ replies; stopped by unmount().
  ReplyWorker& reply_worker() { return reply_worker_; }

  // Busy-polling: after work (a request received, note_activity()), the loop
  // keeps polling its descriptors for this long before it may sleep; a sleeping
  // loop woken from the other CPU costs tens of microseconds per hop (depth 1).
  // It runs inside one io_context::run(): Asio's per-thread memory recycling
  // (coroutine frames, handlers) lasts one run()/poll() call, so an outer loop
  // of poll() calls lost it at every pass (1.5 mallocs per 1 MiB read).
  void set_busy_poll(std::chrono::microseconds budget) { busy_poll_budget_ = budget; }
  // The next request is expected within `soon` (a sequential reader answered from
  // memory comes back once it has used the data): while busy-polling is on at all, this
  // time's polling goes on that long if the budget is shorter.
  void expect_request_within(std::chrono::microseconds soon) {
    if (busy_poll_budget_.count() == 0) return;
    expected_within_ = std::max(expected_within_, soon);
    note_activity();
  }
  // Work seen on the loop thread (a reply sent, say): polling goes on.
  void note_activity() {
    ++activity_;
    if (!spinning_ && receiving_ && busy_poll_budget_.count() > 0) start_spinning();
  }

  // Spliced READ replies (reply_pipe.hpp): the pipes, the request's id for the
  // reply header (only valid inside a handler), and the device to send them to.
  ReplyPipes& reply_pipes() { return reply_pipes_; }
  std::uint64_t current_unique() const { return current_unique_; }

  // After a while without requests: the free receive buffers give their memory
  // back (a few stay mapped, their huge pages released). Loop thread only.
  void release_idle_buffers();
  int device() const { return fuse_session_fd(session_); }

 private:
  friend class RequestBuffer;
  void wait_readable();
  void receive();
  std::byte* take_buffer(bool& payload_resident);
  void give_back(std::byte* buffer, bool payload_resident);
  void patch_reply(struct iovec* parts, int count);
  void note_init_request(const std::byte* buffer, std::size_t length);
  void start_spinning();
  void spin();
  void post_spin();

  asio::posix::stream_descriptor descriptor_;
  fuse_lowlevel_ops operations_;
  void* user_data_;
  fuse_session* session_ = nullptr;
  bool mounted_ = false;
  bool unmounted_ = false;
  unsigned requested_max_read_ = 0;
  bool init_refused_ = false;
  std::string init_failure_;
  bool receiving_ = false;
  std::function<void()> on_ended_;
  std::function<void(std::uint64_t unique)> on_interrupt_;
  std::size_t buffer_size_ = 0;
  // Free receive buffers whose huge-page region is untouched, and those where a
  // large request left it resident (bounded, so a burst of large writes does
  // not keep its memory).
  std::vector<std::byte*> free_buffers_;
  std::vector<std::byte*> free_resident_buffers_;
  std::byte* current_buffer_ = nullptr;
  bool current_resident_ = false;
  std::uint64_t current_unique_ = 0;
  // Busy-polling: a handler that re-posts itself while activity_ changed within
  // the budget; while it is queued, Asio's reactor polls with a zero timeout.
  std::chrono::microseconds busy_poll_budget_{0};
  std::chrono::microseconds expected_within_{0};  // until polling stops (expect_request_within)
  std::uint64_t activity_ = 0;
  std::uint64_t activity_seen_ = 0;
  std::chrono::steady_clock::time_point idle_since_;  // the first lap that saw no new work
  bool idle_since_known_ = false;
  bool spinning_ = false;
  // Read by the writev hook, which also runs on the reply worker's thread.
  std::atomic<std::uint32_t> extra_open_flags_{0};
  // The INIT request's id while its reply is due and should allow shared mmap.
  std::atomic<std::uint64_t> mmap_init_unique_{0};
  ReplyPipes reply_pipes_;  // before the worker: it stops before the pipes close
  ReplyWorker reply_worker_;
};

}  // namespace fuse_front
