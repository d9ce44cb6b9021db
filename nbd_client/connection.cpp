// Drives one libnbd handle from the Asio loop (or the connection's own thread) and
// turns its completion callbacks into resumptions. Thread rules: see connection.hpp.
#include "nbd_client/connection.hpp"
#include "nbd_client/libnbd_error.hpp"
#include "nbd_client/request_split.hpp"
#include "nbd_client/socket_batching.hpp"
#include "nbd_client/socket_peer.hpp"

#include <asio/redirect_error.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <libnbd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <poll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <pthread.h>

namespace nbd_client {

namespace {

// libnbd's own ceiling per command; servers may advertise less.
constexpr std::uint64_t libnbd_request_limit = 64u << 20;

// "30", "0.5", "2.25": a --connect-timeout as the user gave it (milliseconds at most).
std::string seconds_text(std::chrono::milliseconds duration) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3f", double(duration.count()) / 1000);
  std::string result = text;
  result.erase(result.find_last_not_of('0') + 1);
  if (result.back() == '.') result.pop_back();
  return result;
}

}  // namespace

void ReadyList::push(PendingCommand* command) {
  command->next_ready = nullptr;
  if (tail) tail->next_ready = command;
  else head = command;
  tail = command;
}

PendingCommand* ReadyList::take_all() {
  tail = nullptr;
  return std::exchange(head, nullptr);
}

PendingCommand* ReadyList::pop() {
  PendingCommand* command = head;
  if (command) {
    head = command->next_ready;
    if (!head) tail = nullptr;
    command->next_ready = nullptr;
  }
  return command;
}

CommandMemory::~CommandMemory() {
  for (void* block : free_blocks_) ::operator delete(block);
}

void* CommandMemory::take(std::size_t size) {
  std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
  if (shared_) lock.lock();
  ++outstanding_;
  if (size > block_size || free_blocks_.empty()) return ::operator new(std::max(size, block_size));
  void* block = free_blocks_.back();
  free_blocks_.pop_back();
  return block;
}

void CommandMemory::give(void* block, std::size_t size) {
  std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
  if (shared_) lock.lock();
  --outstanding_;
  if (size > block_size) ::operator delete(block);
  else free_blocks_.push_back(block);
}

// Operator new's alignment is all a block has; Asio's operations ask for no more.
void* CommandMemory::do_allocate(std::size_t size, std::size_t alignment) {
  if (alignment > __STDCPP_DEFAULT_NEW_ALIGNMENT__) return ::operator new(size, std::align_val_t(alignment));
  return take(size);
}

void CommandMemory::do_deallocate(void* block, std::size_t size, std::size_t alignment) {
  if (alignment > __STDCPP_DEFAULT_NEW_ALIGNMENT__) ::operator delete(block, std::align_val_t(alignment));
  else give(block, size);
}

namespace {

// Before a command's handler can run: its issuer may reuse the payload at once.
void stop_piping(PendingCommand* command) {
  if (command->piped) socket_batching::forget_payload(command->registered_socket, command->piped);
  if (command->by_reference) socket_batching::forget_send(command->registered_socket, command->by_reference);
  command->piped = nullptr;
  command->by_reference = nullptr;
}

}  // namespace

int on_chunk_done(void* user_data, int* error) {
  auto* command = static_cast<PendingCommand*>(user_data);
  if (*error != 0 && command->first_error == 0) command->first_error = *error;
  // Noticed by the connection as the notify call returns, before any handler runs.
  if (*error == ESHUTDOWN && command->ready_list) command->ready_list->server_shutting_down = true;
  if (--command->callbacks_outstanding == 0 && !command->submitting) {
    command->finished = true;
    stop_piping(command);
    if (command->in_flight_counter) --*command->in_flight_counter;
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
      stop_piping(command);
      if (command->in_flight_counter) --*command->in_flight_counter;
      command->finish(std::error_code(ESHUTDOWN, std::generic_category()));
    }
    command->destroy();
  }
}

namespace {

// Called under the handle's lock for each block-status reply chunk: only records.
int on_extents(void* user_data, const char* context, uint64_t offset, uint32_t* entries, size_t count, int* error) {
  auto* extents = static_cast<std::vector<Extent>*>(user_data);
  if (*error || std::strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
  for (size_t i = 0; i + 1 < count; i += 2) {
    extents->push_back({offset, entries[i], entries[i + 1]});
    offset += entries[i];
  }
  return 0;
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

bool Connection::usable() const { return handle_ && established_ && !lost_ && !draining_; }

void Connection::bind_descriptor(int fd) {
  // While connecting, libnbd closes a socket that failed and opens the next address's,
  // which may get the same number: the old epoll registration went with the old socket,
  // so the number alone says nothing then. Register afresh (a few times per connect).
  if (fd == bound_fd_ && !connecting_) return;
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
  // NBD asks a client to wait for its replies before NBD_CMD_DISC.
  if (draining_ && !disconnect_sent_ && in_flight_.load(std::memory_order_relaxed) == 0 &&
      (nbd_aio_is_ready(handle_) || nbd_aio_is_processing(handle_))) {
    disconnect_sent_ = true;
    nbd_aio_disconnect(handle_, 0);
    notice_state_change();
    if (!handle_ || lost_) return;
  }
  bind_descriptor(nbd_aio_get_fd(handle_));
  if (bound_fd_ < 0) return;
  unsigned direction = nbd_aio_get_direction(handle_);
  // Held requests go out once the handlers queued now have issued theirs, or at
  // once when nothing else is in flight (depth 1: nothing to wait for); libnbd
  // counts them sent, so a full socket is ours to wait for.
  if (batched_ && socket_batching::held_output(bound_fd_) > 0) {
    if (!output_blocked_ && in_flight_.load(std::memory_order_relaxed) <= 1)
      output_blocked_ = !socket_batching::flush(bound_fd_);
    else if (!output_blocked_)
      schedule_flush();
    if (output_blocked_) direction |= LIBNBD_AIO_DIRECTION_WRITE;
  }
  if ((direction & LIBNBD_AIO_DIRECTION_READ) && !read_armed_) {
    read_armed_ = true;
    descriptor_.async_wait(asio::posix::descriptor_base::wait_read, [this](std::error_code error) {
      if (error) return;  // cancelled by release_descriptor
      read_armed_ = false;
      service();
    });
  }
  if ((direction & LIBNBD_AIO_DIRECTION_WRITE) && !write_armed_) {
    write_armed_ = true;
    descriptor_.async_wait(asio::posix::descriptor_base::wait_write, [this](std::error_code error) {
      if (error) return;
      write_armed_ = false;
      service();
    });
  }
}

// Asio's epoll registration is edge-triggered and its wake-ups may be stale,
// while libnbd wants level-triggered notifications: it may stop after one reply
// with more in the socket, and a notify_read with nothing to read while a write
// payload is paused leaves it waiting for a reply the server cannot send yet (a
// deadlock seen with 1 MiB writes at depth 2). So each wake-up asks poll() what
// is really ready now and notifies libnbd until nothing is, replies first.
void Connection::service() {
  constexpr int rounds_per_wakeup = 64;  // then yield to the rest of the loop
  bool speculated = false;
  for (int round = 0; round < rounds_per_wakeup; ++round) {
    if (!handle_ || lost_ || bound_fd_ < 0) return;
    unsigned direction = nbd_aio_get_direction(handle_);
    if (batched_) output_blocked_ = !socket_batching::flush(bound_fd_);
    bool readable = false;
    bool writable = false;
    if (batched_ && direction == LIBNBD_AIO_DIRECTION_READ) {
      // Reading ahead answers "is there a reply?" and fetches it in one call.
      readable = socket_batching::buffered_input(bound_fd_) > 0 ||
                 socket_batching::fill(bound_fd_) != socket_batching::Fill::empty;
    } else {
      pollfd ready{bound_fd_, short(((direction & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                                    ((direction & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0)),
                   0};
      int polled = ::poll(&ready, 1, 0);
      bool read_ahead = batched_ && socket_batching::buffered_input(bound_fd_) > 0;
      readable = (direction & LIBNBD_AIO_DIRECTION_READ) &&
                 (read_ahead || (polled > 0 && (ready.revents & (POLLIN | POLLHUP | POLLERR))));
      writable = polled > 0 && (ready.revents & POLLOUT);
    }
    // TLS may hold decrypted replies that poll() cannot see. Reading once more is
    // safe only with no paused write (direction READ alone) and replies owed.
    if (!readable && !writable && tls_ && !speculated && direction == LIBNBD_AIO_DIRECTION_READ &&
        nbd_aio_in_flight(handle_) > 0) {
      readable = speculated = true;
    }
    bool notify_read = readable && (direction & LIBNBD_AIO_DIRECTION_READ);
    bool notify_write = !notify_read && writable && (direction & LIBNBD_AIO_DIRECTION_WRITE);
    if (!notify_read && !notify_write) break;
    ready_.collecting = true;
    int result = notify_read ? nbd_aio_notify_read(handle_) : nbd_aio_notify_write(handle_);
    ready_.collecting = false;
    if (result == -1 && error_message_.empty()) error_message_ = last_libnbd_error();
    if (result == -1 && connecting_ && !connect_error_) connect_error_ = last_connect_error(false);
    notice_state_change();
    // Resumed handlers may issue commands here: the handle is not locked now, and
    // the next round re-reads its state.
    deliver_ready();
    if (on_progress_ && !threaded_) on_progress_();
    if (round + 1 == rounds_per_wakeup) {
      asio::post(descriptor_.get_executor(), [this] { service(); });
      return;
    }
  }
  arm();
}

// One sendmsg() for every request issued before this runs: the FUSE requests
// read in one batch, and the commands their handlers issued, go out together.
void Connection::schedule_flush() {
  if (flush_scheduled_) return;
  flush_scheduled_ = true;
  auto flush = asio::bind_allocator(command_memory_.allocator(), [this] {
    flush_scheduled_ = false;
    if (!handle_ || lost_ || bound_fd_ < 0) return;
    output_blocked_ = !socket_batching::flush(bound_fd_);
    if (output_blocked_) arm();
  });
  // io_context's own executor, so that the allocator above is used.
  auto executor = descriptor_.get_executor();
  if (auto* context_executor = executor.target<asio::io_context::executor_type>())
    asio::post(*context_executor, std::move(flush));
  else
    asio::post(executor, std::move(flush));
}

void Connection::deliver_ready() {
  if (threaded_) {
    // One post per notify call carries every handler back to the loop thread.
    if (PendingCommand* chain = ready_.take_all())
      asio::post(executor_, [chain] {
        for (PendingCommand* command = chain; command;) {
          PendingCommand* next = command->next_ready;
          command->deliver();  // may free command
          command = next;
        }
      });
    return;
  }
  while (PendingCommand* command = ready_.pop()) command->deliver();
}

void Connection::notice_state_change() {
  bool dead = nbd_aio_is_dead(handle_) || nbd_aio_is_closed(handle_);
  if (connecting_) {
    if (dead || nbd_aio_is_ready(handle_)) connect_wakeup_.cancel();
    if (dead) release_descriptor();
    return;
  }
  if (ready_.server_shutting_down && !dead && !lost_) {
    ready_.server_shutting_down = false;
    // Before the handlers queued in this notify call run (they are delivered, or
    // posted, after this): the one that got ESHUTDOWN must find this connection
    // unusable if it drains, and so retry elsewhere. Whether this is news (not a
    // connection drained already) the pool decides, on the loop thread.
    if (threaded_)
      asio::post(executor_, [this] {
        if (on_server_shutdown) on_server_shutdown();
      });
    else if (on_server_shutdown)
      on_server_shutdown();
  }
  if (dead && !lost_)
    report_lost(error_message_.empty() ? "the server closed the connection" : error_message_);
}

void Connection::report_lost(const std::string& reason) {
  lost_ = true;
  release_descriptor();
  if (threaded_)
    asio::post(executor_, [this, reason] {
      if (on_lost) on_lost(reason);
    });
  else if (on_lost)
    on_lost(reason);
}

void Connection::drain() {
  if (!usable() || draining_.exchange(true)) return;
  auto start = [this] {
    begin_draining();
    arm();  // disconnects at once when nothing is in flight
  };
  if (threaded_)
    asio::post(descriptor_.get_executor(), start);
  else
    start();
}

void Connection::begin_draining() {
  if (!handle_ || lost_) return;
  if (error_message_.empty()) error_message_ = "the server is shutting down";
  drain_deadline_ = std::make_unique<asio::steady_timer>(descriptor_.get_executor(), drain_limit);
  drain_deadline_->async_wait([this](std::error_code error) {
    if (error || !handle_ || lost_) return;  // cancelled by close_here(), or closed already
    // Ends the connection the way a network failure would: libnbd fails the commands
    // still in flight (each retried, or EIO) and the loss is reported as usual.
    error_message_ = "the server said it was shutting down but kept the connection open for " +
                     std::to_string(drain_limit.count()) + " s";
    if (int fd = nbd_aio_get_fd(handle_); fd >= 0) ::shutdown(fd, SHUT_RDWR);
    service();
  });
}

namespace {

int start_connect_on(nbd_handle* handle, const Target& target) {
  switch (target.kind) {
    case Target::Kind::uri:
      return nbd_aio_connect_uri(handle, target.uri.c_str());
    case Target::Kind::unix_socket:
      return nbd_aio_connect_unix(handle, target.unix_path.c_str());
    case Target::Kind::tcp:
      return nbd_aio_connect_tcp(handle, target.host.c_str(), target.port.c_str());
    case Target::Kind::socket_fd:
      return nbd_aio_connect_socket(handle, target.fd);
    case Target::Kind::command:
      break;
  }
  return -1;
}

// Whether connecting may mean resolving a host name (TCP, or a URI naming a host).
bool names_a_host(const Target& target) {
  if (target.kind == Target::Kind::tcp) return true;
  if (target.kind != Target::Kind::uri) return false;
  return target.uri.rfind("nbd://", 0) == 0 || target.uri.rfind("nbds://", 0) == 0;
}

}  // namespace

int Connection::start_connect(const Target& target) {
  if (target.kind == Target::Kind::command) {
    error_message_ = "a [ CMD ] target is started by the pool and connected as a unix socket";
    connect_error_ = std::error_code(EINVAL, std::generic_category());
    return -1;
  }
  int result = start_connect_on(handle_, target);
  if (result == -1) connect_error_ = last_connect_error(true);
  return result;
}

// Shared by the loop and a resolver thread, which may outlive its Connection: the
// thread touches only this, its own copy of the target, and the handle it was given.
struct Connection::NameResolution {
  explicit NameResolution(const asio::any_io_executor& executor)
      : finished(executor, asio::steady_timer::time_point::max()) {}
  pthread_t thread{};
  std::mutex mutex;
  bool abandoned = false;        // guarded by mutex: the thread then closes the handle
  bool returned = false;         // guarded by mutex: the handle is the Connection's again
  asio::steady_timer finished;   // cancelled on the loop once the thread is done
  int result = -1;               // written before finished is cancelled
  std::string error;
  std::error_code connect_error;  // the call's failure as last_connect_error() has it
};

namespace {

// The resolver threads close() abandoned, until joined when found finished (the next
// start, or exit). Exit must not overlap a thread still inside libnbd: libnbd's library
// destructor frees the per-thread error key it uses. A thread that answered is joined
// by its own connect, never here (a pthread_t may be reused once joined).
std::mutex resolver_threads_mutex;
std::vector<pthread_t> resolver_threads;

void reap_finished_resolvers() {  // with resolver_threads_mutex held
  std::erase_if(resolver_threads, [](pthread_t thread) { return pthread_tryjoin_np(thread, nullptr) == 0; });
}

struct ResolverJob {
  std::shared_ptr<Connection::NameResolution> resolution;
  nbd_handle* handle;
  Target target;
};

}  // namespace

bool Connection::name_resolutions_running() {
  std::lock_guard lock(resolver_threads_mutex);
  reap_finished_resolvers();
  return !resolver_threads.empty();
}

void* Connection::resolve_and_connect(void* raw_job) {
  std::unique_ptr<ResolverJob> job(static_cast<ResolverJob*>(raw_job));
  pthread_setname_np(pthread_self(), "nbdbridge-dns");
  NameResolution& resolution = *job->resolution;
  int result = start_connect_on(job->handle, job->target);
  // Also a handle that died inside the call (every address refused): the loop
  // thread's libnbd error would be another call's.
  std::string error = result == -1 || nbd_aio_is_dead(job->handle) ? last_libnbd_error() : std::string();
  std::error_code connect_error = result == -1 ? last_connect_error(true) : std::error_code();
  {
    std::lock_guard lock(resolution.mutex);
    if (!resolution.abandoned) {
      resolution.returned = true;
      resolution.result = result;
      resolution.error = std::move(error);
      resolution.connect_error = connect_error;
      // Posted under the lock: once abandoned, nothing reaches the loop any more.
      asio::post(resolution.finished.get_executor(), [resolution = job->resolution] { resolution->finished.cancel(); });
      return nullptr;
    }
  }
  nbd_close(job->handle);
  return nullptr;
}

asio::awaitable<int> Connection::start_connect_off_loop(const Target& target) {
  auto resolution = std::make_shared<NameResolution>(co_await asio::this_coro::executor);
  auto job = std::make_unique<ResolverJob>(ResolverJob{resolution, handle_, target});
  {
    std::lock_guard lock(resolver_threads_mutex);
    reap_finished_resolvers();
    if (int error = pthread_create(&resolution->thread, nullptr, &resolve_and_connect, job.get())) {
      error_message_ = std::string("cannot start a thread to resolve the name: ") + std::strerror(error);
      connect_error_ = std::error_code(error, std::generic_category());
      co_return -1;
    }
    job.release();  // the thread's now
  }
  name_resolution_ = resolution;
  std::error_code ignored;
  co_await resolution->finished.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
  {
    std::lock_guard lock(resolution->mutex);
    if (resolution->abandoned) co_return -1;  // handle_ is already null: "closed while connecting"
  }
  // It has answered and is ending: join it now, so that no thread of ours is left
  // running when libfuse forks fusermount3.
  pthread_join(resolution->thread, nullptr);
  name_resolution_.reset();
  if (!resolution->error.empty()) error_message_ = resolution->error;
  connect_error_ = resolution->connect_error;
  co_return resolution->result;
}

void Connection::abandon_name_resolution() {
  if (!name_resolution_) return;
  auto resolution = std::exchange(name_resolution_, nullptr);
  std::lock_guard lock(resolution->mutex);
  // Returned, its result not yet seen (or never to be: a loop that stopped before it
  // ran): the handle is ours to close as usual.
  if (resolution->returned) return;
  resolution->abandoned = true;
  handle_ = nullptr;  // the thread's to close
  {
    std::lock_guard registry(resolver_threads_mutex);
    resolver_threads.push_back(resolution->thread);
  }
  asio::post(resolution->finished.get_executor(), [resolution] { resolution->finished.cancel(); });
}

asio::awaitable<std::error_code> Connection::async_connect(const Target& target, ConnectOptions options) {
  const auto connect_deadline = std::chrono::steady_clock::now() + options.timeout;
  on_progress_ = options.on_progress;
  // A Connection whose connect failed is tried again (ConnectionPool::reconnect, and
  // async_connect's wait for the server).
  error_message_.clear();
  connect_error_.clear();
  handle_ = nbd_create();
  if (!handle_) {
    error_message_ = last_libnbd_error();
    co_return std::error_code(ENOMEM, std::generic_category());
  }
  // Paths in URIs (tls-psk-file=, socket=) are the user's own choice on the command line.
  nbd_set_uri_allow_local_file(handle_, true);
  nbd_set_full_info(handle_, true);
  // libnbd zeroes every read buffer first unless told not to: a memset of each
  // 1 MiB read (4.5% of the bridge's CPU in 1 MiB sequential reads). Safe here:
  // a failed read's buffer is never replied with, and a successful one was
  // filled in full (a simple reply carries all the data; libnbd fails a
  // structured read whose chunks do not cover the request).
  nbd_set_pread_initialize(handle_, false);
  if (target.kind != Target::Kind::uri) nbd_set_export_name(handle_, target.export_name.c_str());
  if (!options.structured_replies)
    nbd_set_request_structured_replies(handle_, false);
  else if (options.want_block_status)
    nbd_add_meta_context(handle_, LIBNBD_CONTEXT_BASE_ALLOCATION);

  connecting_ = true;
  connect_cancelled_ = false;
  int started = names_a_host(target) ? co_await start_connect_off_loop(target) : start_connect(target);
  if (!handle_) {  // close() while the name was resolved
    connecting_ = false;
    error_message_ = "closed while connecting";
    co_return std::error_code(ECANCELED, std::generic_category());
  }
  if (started == -1 || connect_cancelled_) {
    if (error_message_.empty())
      error_message_ = connect_cancelled_ ? "connect cancelled" : last_libnbd_error();
    connecting_ = false;
    co_return abandon_handle(connect_cancelled_ ? ECANCELED : connect_error_ ? connect_error_.value() : EPROTO);
  }
  arm();
  if (!nbd_aio_is_ready(handle_) && !nbd_aio_is_dead(handle_)) {
    // The name's resolution counted too.
    connect_wakeup_.expires_at(connect_deadline);
    std::error_code ignored;
    co_await connect_wakeup_.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
  }
  connecting_ = false;
  if (!handle_) {  // close() while we waited (the mount is stopping): the handle is gone
    error_message_ = "closed while connecting";
    co_return std::error_code(ECANCELED, std::generic_category());
  }
  if (!nbd_aio_is_ready(handle_)) {
    const bool failed = connect_error_ || nbd_aio_is_dead(handle_);
    if (connect_cancelled_ && !failed) error_message_ = "connect cancelled";
    if (error_message_.empty()) {
      error_message_ = nbd_aio_is_dead(handle_) ? last_libnbd_error()
                                                : "no answer from the server within " +
                                                      seconds_text(options.timeout) + " s";
    }
    co_return abandon_handle(failed            ? (connect_error_ ? connect_error_.value() : EPROTO)
                             : connect_cancelled_ ? ECANCELED
                                                  : ETIMEDOUT);
  }
  read_export_info();
  if (!tune_socket(options)) co_return abandon_handle(EINVAL);
  established_ = true;
  tls_ = nbd_get_tls_negotiated(handle_) == 1;
  batched_ = options.batch_socket && !tls_ && socket_batching::attach(nbd_aio_get_fd(handle_));
  if (options.readonly) info_.read_only = true;
  if (options.own_thread && options.hold_thread) {
    release_descriptor();  // nothing armed until start_held_thread(), or a command
    thread_held_ = true;
  } else if (options.own_thread) {
    start_thread();
  }
  else arm();
  co_return std::error_code{};
}

void Connection::start_held_thread() {
  if (!thread_held_) return;
  thread_held_ = false;
  // Draining (or drained): its timer belongs to the loop, so the loop keeps it.
  if (drain_deadline_) return;
  // A command issued meanwhile ran on the loop (its arm() bound the socket there):
  // moving it now could strand it, so the loop keeps the connection.
  if (bound_fd_ >= 0) return;
  start_thread();
}

std::error_code Connection::abandon_handle(int error) {
  release_descriptor();
  nbd_close(handle_);
  handle_ = nullptr;
  return std::error_code(error, std::generic_category());
}

// From here on the socket belongs to the thread: libnbd's handle is used only there.
void Connection::start_thread() {
  release_descriptor();
  auto context = std::make_unique<asio::io_context>(1);
  std::thread thread;
  try {
    thread = std::thread([&running = *context] {
      pthread_setname_np(pthread_self(), "nbdbridge-conn");
      auto work = asio::make_work_guard(running);
      running.run();
    });
  } catch (const std::system_error& refusal) {
    // No thread to be had (a pids or RLIMIT_NPROC limit): the loop drives this
    // connection, as with --connection-threads off. Nothing was moved yet: a command
    // posted to a context no thread runs would never be answered.
    thread_refused_ = refusal.code().message();
    arm();
    return;
  }
  // The thread runs only what is posted to it, and nothing is before this point.
  thread_context_ = std::move(context);
  descriptor_ = asio::posix::stream_descriptor(thread_context_->get_executor());
  command_memory_.share_between_threads();
  threaded_ = true;
  thread_ = std::move(thread);
  asio::post(thread_context_->get_executor(), [this] { arm(); });
}

// 1 MiB requests through default-sized socket buffers (about 200 KiB here) cost
// many partial sends and wake-ups each. False, with error_message_, only when an
// explicitly named congestion control cannot be set.
bool Connection::tune_socket(const ConnectOptions& options) {
  int fd = nbd_aio_get_fd(handle_);
  if (fd < 0) return true;
  // Measured (1 MiB O_DIRECT writes at depth 8): ~1.59 GiB/s with the default
  // buffers, ~1.96 GiB/s with 1 MiB; reads +3%. Over loopback TCP 1 MiB against
  // the kernel's autotuning: within noise, so one rule for both.
  int size = 1 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  if (!is_tcp(fd)) return true;
  // libnbd sets TCP_NODELAY itself, but not on a socket passed with --fd. Nagle's
  // delay measured against it over loopback: within noise (socket batching already
  // sends a batch in one segment), but a lone small request must never wait.
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (options.tcp_keepalive.count() > 0) {
    // Probes from half the budget on, three of them in the other half; TCP_USER_TIMEOUT
    // bounds unacknowledged data (a sent request) by the same budget, and with
    // keepalive on it also decides when the unanswered probes end the connection.
    int budget = int(std::min<std::int64_t>(options.tcp_keepalive.count(), 86400));
    int idle = std::max(1, budget / 2), interval = std::max(1, budget / 6), probes = 3;
    unsigned user_timeout_ms = unsigned(budget) * 1000u;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof user_timeout_ms);
  }
  // Over loopback a pacing congestion control (bbr, the default on some systems)
  // only spaces our sends out with timers: tools/bench --tcp, 5 rounds, 1 MiB writes
  // at depth 8 at 2285 MiB/s with reno against 1805 with bbr (335 against 470 us of
  // CPU per MiB). Reno is always permitted to unprivileged processes.
  std::string_view choice(options.tcp_congestion.data());
  std::string_view congestion = choice == "auto"     ? (peer_is_loopback_tcp(fd) ? "reno" : "")
                                : choice == "system" ? ""
                                                     : choice;
  if (congestion.empty()) return true;
  if (setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, congestion.data(), socklen_t(congestion.size())) == 0 ||
      choice == "auto")
    return true;
  error_message_ = "cannot use TCP congestion control \"" + std::string(congestion) + "\": " + std::strerror(errno) +
                   " (see /proc/sys/net/ipv4/tcp_allowed_congestion_control)";
  return false;
}

void Connection::read_export_info() {
  int64_t size = nbd_get_size(handle_);
  info_.size = size > 0 ? std::uint64_t(size) : 0;
  info_.read_only = nbd_is_read_only(handle_) == 1;
  info_.can_flush = nbd_can_flush(handle_) == 1;
  info_.can_fua = nbd_can_fua(handle_) == 1;
  info_.can_multi_conn = nbd_can_multi_conn(handle_) == 1;
  info_.can_zero = nbd_can_zero(handle_) == 1;
  info_.can_trim = nbd_can_trim(handle_) == 1;
  info_.can_block_status = nbd_can_meta_context(handle_, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  int64_t minimum = nbd_get_block_size(handle_, LIBNBD_SIZE_MINIMUM);
  int64_t preferred = nbd_get_block_size(handle_, LIBNBD_SIZE_PREFERRED);
  int64_t maximum = nbd_get_block_size(handle_, LIBNBD_SIZE_MAXIMUM);
  if (minimum > 0) info_.minimum_block = std::uint64_t(minimum);
  if (preferred > 0) info_.preferred_block = std::uint64_t(preferred);
  info_.maximum_request = maximum > 0 ? std::min<std::uint64_t>(maximum, libnbd_request_limit)
                                      : std::uint64_t(32u << 20);
}

std::size_t Connection::chunk_limit(CommandKind kind) const {
  switch (kind) {
    case CommandKind::read:
    case CommandKind::write:
      return std::size_t(info_.maximum_request);
    case CommandKind::zero_fill:
      return std::min<std::size_t>(std::size_t(info_.maximum_request), zero_buffer_size);
    default:
      // No payload, but keep within 32-bit NBD lengths and, conservatively, the advertised maximum.
      return std::size_t(std::min<std::uint64_t>(info_.maximum_request * 32, std::uint64_t(1) << 30));
  }
}

int64_t Connection::submit_chunk(PendingCommand* command, const CommandRequest& request, std::size_t done,
                                 std::size_t chunk) {
  nbd_completion_callback callback{&on_chunk_done, command, &on_chunk_freed};
  std::uint64_t offset = request.offset + done;
  switch (request.kind) {
    case CommandKind::read:
      return nbd_aio_pread(handle_, request.buffer + done, chunk, offset, callback, 0);
    case CommandKind::write:
      return nbd_aio_pwrite(handle_, request.buffer + done, chunk, offset, callback, request.flags);
    case CommandKind::zero_fill:
      return nbd_aio_pwrite(handle_, zero_buffer(), chunk, offset, callback, request.flags);
    case CommandKind::zero:
      return nbd_aio_zero(handle_, chunk, offset, callback, request.flags);
    case CommandKind::trim:
      return nbd_aio_trim(handle_, chunk, offset, callback, request.flags);
    case CommandKind::flush:
      return nbd_aio_flush(handle_, callback, 0);
    case CommandKind::block_status: {
      nbd_extent_callback extents{&on_extents, request.extents, nullptr};
      return nbd_aio_block_status(handle_, chunk, offset, extents, callback, 0);
    }
  }
  return -1;
}

void Connection::issue(PendingCommand* command, const CommandRequest& request) {
  command->submitting = true;
  command->ready_list = &ready_;
  // A submission may find the socket broken and fail every command in flight
  // at once. On a connection thread those handlers (this command's too) are held
  // back until arm() below has marked the connection lost, or the loop could see
  // them fail on a connection that still looks usable and take the failure for
  // the server's answer. On the loop thread the posted handlers run after arm().
  const bool hold_back = threaded_;
  if (hold_back) ready_.collecting = true;
  if (!usable()) {
    command->first_error = ENOTCONN;
  } else if (request.kind == CommandKind::block_status && !info_.can_block_status) {
    // A server that came back from a reconnect without base:allocation (an older or
    // differently configured one): everything is data, as on a mount that never had
    // block status. libnbd would refuse the command, and lseek would fail.
    request.extents->push_back({request.offset, request.length, 0});
  } else {
    // Flush and block status are one command; the rest go out in chunks, back to
    // back, each a separate NBD command with its own reply.
    bool single = request.kind == CommandKind::flush || request.kind == CommandKind::block_status;
    std::size_t length = request.kind == CommandKind::flush ? 1 : request.length;
    std::size_t limit = single ? length : chunk_limit(request.kind);
    if (request.kind == CommandKind::block_status) length = std::min<std::size_t>(length, chunk_limit(request.kind));
    if (batched_ && (request.piped || request.by_reference)) {
      const int fd = nbd_aio_get_fd(handle_);
      command->registered_socket = fd;
      // Piped only as one NBD command: the replies of several may come in any
      // order. The chunks of a write are sent one after another: any number.
      if (request.piped && length <= limit && socket_batching::expect_payload(fd, request.piped))
        command->piped = request.piped;
      if (request.by_reference && socket_batching::expect_send(fd, request.by_reference))
        command->by_reference = request.by_reference;
    }
    for_each_chunk(length, limit, [&](std::size_t done, std::size_t chunk) {
      ++command->callbacks_outstanding;
      ++command->frees_outstanding;
      if (submit_chunk(command, request, done, chunk) != -1) return true;
      --command->callbacks_outstanding;
      // A handle that died under us (noticed by libnbd first, e.g. by a connection
      // thread) refuses with a state error: that is a lost connection, which the
      // caller retries elsewhere, not an I/O error.
      if (nbd_aio_is_dead(handle_) || nbd_aio_is_closed(handle_)) command->first_error = ENOTCONN;
      else command->first_error = nbd_get_errno() ? nbd_get_errno() : EIO;
      return false;
    });
  }
  command->submitting = false;
  if (command->callbacks_outstanding == 0 && !command->finished) {
    command->finished = true;
    stop_piping(command);
    command->finish(std::error_code(command->first_error, std::generic_category()));
  } else if (!command->finished) {
    ++in_flight_;
    command->in_flight_counter = &in_flight_;
  }
  if (command->frees_outstanding == 0) command->destroy();
  if (hold_back) ready_.collecting = false;
  // Notices a loss first; sending may also have stopped at a full socket, so
  // this waits for writability if so.
  if (handle_ && !connecting_) arm();
  if (hold_back) deliver_ready();
}

std::byte* Connection::zero_buffer() {
  // Shared and never written: every zero-filled write points into it.
  static std::byte* zeros = static_cast<std::byte*>(std::calloc(1, zero_buffer_size));
  return zeros;
}

void Connection::close() {
  if (thread_.joinable()) {
    asio::post(descriptor_.get_executor(), [this] {
      close_here();
      thread_context_->stop();
    });
    thread_.join();
    // The descriptor belongs to the thread's io_context: give it up while that
    // still exists (members are destroyed in the other order).
    descriptor_ = asio::posix::stream_descriptor(executor_);
    thread_context_.reset();
    threaded_ = false;
    return;
  }
  close_here();
}

void Connection::close_here() {
  connect_wakeup_.cancel();
  drain_deadline_.reset();
  abandon_name_resolution();
  if (handle_) {
    release_descriptor();
    // Queue NBD_CMD_DISC without waiting: nbd_shutdown would block on a dead server.
    if (nbd_aio_is_ready(handle_) || nbd_aio_is_processing(handle_)) nbd_aio_disconnect(handle_, 0);
    // With batching, NBD_CMD_DISC and the requests held before it go out in
    // libnbd's shutdown() right after it (socket_batching.cpp).
    nbd_close(handle_);  // frees in-flight commands: they finish with ESHUTDOWN
    handle_ = nullptr;
  }
}

}  // namespace nbd_client
