// Drives one libnbd handle from the Asio loop and turns its completion callbacks
// into posted resumptions. Single-threaded: see connection.hpp.
#include "nbd_client/connection.hpp"
#include "nbd_client/request_split.hpp"

#include <asio/redirect_error.hpp>
#include <asio/use_awaitable.hpp>
#include <libnbd.h>

#include <algorithm>
#include <cerrno>

namespace nbd_client {

namespace {

// libnbd's own ceiling per command; servers may advertise less.
constexpr std::uint64_t libnbd_request_limit = 64u << 20;

}  // namespace

int on_chunk_done(void* user_data, int* error) {
  auto* command = static_cast<PendingCommand*>(user_data);
  if (*error != 0 && command->first_error == 0) command->first_error = *error;
  if (--command->callbacks_outstanding == 0 && !command->submitting) {
    command->finished = true;
    command->finish(std::error_code(command->first_error, std::generic_category()));
  }
  return 1;  // retire the command
}

void on_chunk_freed(void* user_data) {
  auto* command = static_cast<PendingCommand*>(user_data);
  if (--command->frees_outstanding == 0 && !command->submitting) {
    // Freed without its callback: the handle was closed under it.
    if (!command->finished) {
      command->finished = true;
      command->finish(std::error_code(ESHUTDOWN, std::generic_category()));
    }
    command->destroy();
  }
}

namespace {

std::string last_libnbd_error() {
  const char* message = nbd_get_error();
  return message ? message : "unknown libnbd error";
}

}  // namespace

std::string Target::describe() const {
  switch (kind) {
    case Kind::uri: return uri;
    case Kind::unix_socket: return "unix socket " + unix_path;
    case Kind::tcp: return host + ":" + port;
    case Kind::socket_fd: return "fd " + std::to_string(fd);
    case Kind::command: {
      std::string text = "[";
      for (const auto& word : command) text += " " + word;
      return text + " ]";
    }
  }
  return "?";
}

Connection::Connection(asio::any_io_executor executor)
    : executor_(executor), descriptor_(executor), connect_wakeup_(executor) {}

Connection::~Connection() { close(); }

bool Connection::usable() const { return handle_ && !lost_ && !connecting_; }

void Connection::bind_descriptor(int fd) {
  if (fd == bound_fd_) return;
  release_descriptor();
  if (fd < 0) return;
  descriptor_.assign(fd);
  bound_fd_ = fd;
}

void Connection::release_descriptor() {
  if (bound_fd_ < 0) return;
  // libnbd owns the fd: give it back without closing. Pending waits are cancelled.
  descriptor_.release();
  bound_fd_ = -1;
  read_armed_ = write_armed_ = false;
}

// Called after every libnbd call that may change what the handle waits for.
// The fd and direction are read afresh each time: both change during connect.
void Connection::arm() {
  if (!handle_) return;
  notice_state_change();
  if (!handle_ || lost_) return;
  bind_descriptor(nbd_aio_get_fd(handle_));
  if (bound_fd_ < 0) return;
  unsigned direction = nbd_aio_get_direction(handle_);
  if ((direction & LIBNBD_AIO_DIRECTION_READ) && !read_armed_) {
    read_armed_ = true;
    descriptor_.async_wait(asio::posix::descriptor_base::wait_read, [this](std::error_code error) {
      if (error) return;  // cancelled by release_descriptor
      read_armed_ = false;
      on_readable();
    });
  }
  if ((direction & LIBNBD_AIO_DIRECTION_WRITE) && !write_armed_) {
    write_armed_ = true;
    descriptor_.async_wait(asio::posix::descriptor_base::wait_write, [this](std::error_code error) {
      if (error) return;
      write_armed_ = false;
      on_writable();
    });
  }
}

void Connection::on_readable() {
  if (!handle_) return;
  if (nbd_aio_notify_read(handle_) == -1 && error_message_.empty()) error_message_ = last_libnbd_error();
  arm();
}

void Connection::on_writable() {
  if (!handle_) return;
  // Replies first: the read side may already have data that frees the writer.
  if (nbd_aio_notify_write(handle_) == -1 && error_message_.empty()) error_message_ = last_libnbd_error();
  arm();
}

void Connection::notice_state_change() {
  bool dead = nbd_aio_is_dead(handle_) || nbd_aio_is_closed(handle_);
  if (connecting_) {
    if (dead || nbd_aio_is_ready(handle_)) connect_wakeup_.cancel();
    if (dead) release_descriptor();
    return;
  }
  if (dead && !lost_) {
    lost_ = true;
    release_descriptor();
    if (on_lost) on_lost(error_message_.empty() ? "the server closed the connection" : error_message_);
  }
}

int Connection::start_connect(const Target& target) {
  switch (target.kind) {
    case Target::Kind::uri:
      return nbd_aio_connect_uri(handle_, target.uri.c_str());
    case Target::Kind::unix_socket:
      return nbd_aio_connect_unix(handle_, target.unix_path.c_str());
    case Target::Kind::tcp:
      return nbd_aio_connect_tcp(handle_, target.host.c_str(), target.port.c_str());
    case Target::Kind::socket_fd:
      return nbd_aio_connect_socket(handle_, target.fd);
    case Target::Kind::command: {
      std::string socket_path;
      if (server_process_.start(target.command, pass_server_stderr_, socket_path, error_message_)) return -1;
      return nbd_aio_connect_unix(handle_, socket_path.c_str());
    }
  }
  return -1;
}

asio::awaitable<std::error_code> Connection::async_connect(const Target& target, ConnectOptions options) {
  pass_server_stderr_ = options.pass_server_stderr;
  handle_ = nbd_create();
  if (!handle_) {
    error_message_ = last_libnbd_error();
    co_return std::error_code(ENOMEM, std::generic_category());
  }
  // Paths in URIs (tls-psk-file=, socket=) are the user's own choice on the command line.
  nbd_set_uri_allow_local_file(handle_, true);
  nbd_set_full_info(handle_, true);
  if (target.kind != Target::Kind::uri) nbd_set_export_name(handle_, target.export_name.c_str());

  connecting_ = true;
  if (start_connect(target) == -1) {
    if (error_message_.empty()) error_message_ = last_libnbd_error();
    connecting_ = false;
    co_return std::error_code(ECONNREFUSED, std::generic_category());
  }
  arm();
  if (!nbd_aio_is_ready(handle_) && !nbd_aio_is_dead(handle_)) {
    connect_wakeup_.expires_after(options.timeout);
    std::error_code ignored;
    co_await connect_wakeup_.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
  }
  connecting_ = false;
  if (!nbd_aio_is_ready(handle_)) {
    std::string how;
    if (target.kind == Target::Kind::command && server_process_.exited(how)) {
      error_message_ = "the server command failed to start (" + how + ")";
    } else if (error_message_.empty()) {
      error_message_ = nbd_aio_is_dead(handle_) ? last_libnbd_error()
                                                : "no answer from the server within " +
                                                      std::to_string(options.timeout.count() / 1000) + " s";
    }
    release_descriptor();
    nbd_close(handle_);
    handle_ = nullptr;
    server_process_.stop();
    co_return std::error_code(ECONNREFUSED, std::generic_category());
  }
  read_export_info();
  if (options.readonly) info_.read_only = true;
  arm();
  co_return std::error_code{};
}

void Connection::read_export_info() {
  int64_t size = nbd_get_size(handle_);
  info_.size = size > 0 ? std::uint64_t(size) : 0;
  info_.read_only = nbd_is_read_only(handle_) == 1;
  info_.can_flush = nbd_can_flush(handle_) == 1;
  info_.can_fua = nbd_can_fua(handle_) == 1;
  info_.can_multi_conn = nbd_can_multi_conn(handle_) == 1;
  int64_t minimum = nbd_get_block_size(handle_, LIBNBD_SIZE_MINIMUM);
  int64_t preferred = nbd_get_block_size(handle_, LIBNBD_SIZE_PREFERRED);
  int64_t maximum = nbd_get_block_size(handle_, LIBNBD_SIZE_MAXIMUM);
  if (minimum > 0) info_.minimum_block = std::uint64_t(minimum);
  if (preferred > 0) info_.preferred_block = std::uint64_t(preferred);
  info_.maximum_request = maximum > 0 ? std::min<std::uint64_t>(maximum, libnbd_request_limit)
                                      : std::uint64_t(32u << 20);
}

void Connection::issue(PendingCommand* command, CommandKind kind, std::byte* buffer, std::size_t length,
                       std::uint64_t offset, std::uint32_t flags) {
  command->submitting = true;
  if (!usable()) {
    command->first_error = ENOTCONN;
  } else if (kind == CommandKind::flush) {
    ++command->callbacks_outstanding;
    ++command->frees_outstanding;
    nbd_completion_callback callback{&on_chunk_done, command, &on_chunk_freed};
    if (nbd_aio_flush(handle_, callback, 0) == -1) {
      --command->callbacks_outstanding;
      command->first_error = nbd_get_errno() ? nbd_get_errno() : EIO;
    }
  } else {
    // Chunks go out back to back; each is a separate NBD command with its own reply.
    for_each_chunk(length, std::size_t(info_.maximum_request), [&](std::size_t done, std::size_t chunk) {
      ++command->callbacks_outstanding;
      ++command->frees_outstanding;
      nbd_completion_callback callback{&on_chunk_done, command, &on_chunk_freed};
      int64_t cookie = kind == CommandKind::read
                           ? nbd_aio_pread(handle_, buffer + done, chunk, offset + done, callback, 0)
                           : nbd_aio_pwrite(handle_, buffer + done, chunk, offset + done, callback, flags);
      if (cookie != -1) return true;
      --command->callbacks_outstanding;
      command->first_error = nbd_get_errno() ? nbd_get_errno() : EIO;
      return false;
    });
  }
  command->submitting = false;
  if (command->callbacks_outstanding == 0 && !command->finished) {
    command->finished = true;
    command->finish(std::error_code(command->first_error, std::generic_category()));
  }
  if (command->frees_outstanding == 0) command->destroy();
  // Sending may have stopped at a full socket; wait for writability if so.
  if (handle_ && !connecting_) arm();
}

void Connection::close() {
  connect_wakeup_.cancel();
  if (handle_) {
    release_descriptor();
    // Queue NBD_CMD_DISC without waiting: nbd_shutdown would block on a dead server.
    if (nbd_aio_is_ready(handle_) || nbd_aio_is_processing(handle_)) nbd_aio_disconnect(handle_, 0);
    nbd_close(handle_);  // frees in-flight commands: they finish with ESHUTDOWN
    handle_ = nullptr;
  }
  server_process_.stop();
}

}  // namespace nbd_client
