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

#include <atomic>

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
class RequestBuffer {
 public:
  RequestBuffer() = default;
  RequestBuffer(Session* session, std::byte* data) : session_(session), data_(data) {}
  RequestBuffer(RequestBuffer&& other) noexcept;
  RequestBuffer& operator=(RequestBuffer&& other) noexcept;
  ~RequestBuffer();
  std::byte* data() const { return data_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  Session* session_ = nullptr;
  std::byte* data_ = nullptr;
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
  void stop_receiving();
  void unmount();
  bool mounted() const { return mounted_; }

  // fuse_reply_open, plus open flags libfuse 3.14 cannot express (e.g.
  // FOPEN_PARALLEL_DIRECT_WRITES, 1 << 6).
  void reply_open(fuse_req_t request, const fuse_file_info* file, std::uint32_t extra_open_flags);

  // Only valid inside a handler: keeps the current request's buffer alive.
  RequestBuffer claim_request_buffer();

  // The thread for large READ replies; stopped by unmount().
  ReplyWorker& reply_worker() { return reply_worker_; }

 private:
  friend class RequestBuffer;
  void wait_readable();
  void receive();
  std::byte* take_buffer();
  void give_back(std::byte* buffer);
  void patch_reply(struct iovec* parts, int count);

  asio::posix::stream_descriptor descriptor_;
  fuse_lowlevel_ops operations_;
  void* user_data_;
  fuse_session* session_ = nullptr;
  bool mounted_ = false;
  bool unmounted_ = false;
  bool receiving_ = false;
  std::function<void()> on_ended_;
  std::size_t buffer_size_ = 0;
  std::vector<std::byte*> free_buffers_;
  std::byte* current_buffer_ = nullptr;
  // Read by the writev hook, which also runs on the reply worker's thread.
  std::atomic<std::uint32_t> extra_open_flags_{0};
  ReplyWorker reply_worker_;
};

}  // namespace fuse_front
