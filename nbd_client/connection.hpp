// One libnbd handle, its socket driven by an Asio executor, and awaitable NBD commands.
// Thread rule: the public members run on the loop's executor; the socket and every
// nbd_* call run on the loop too, or, with ConnectOptions::own_thread, on the
// connection's own thread once connected (commands are posted there, handlers posted
// back). libnbd completion callbacks run inside nbd_aio_notify_* with the handle
// locked, so they only queue the result; nothing calls nbd_* from inside one.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/associated_executor.hpp>
#include <asio/post.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>
#include <asio/io_context.hpp>
#include <asio/bind_allocator.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <array>
#include <atomic>
#include <functional>
#include <memory_resource>
#include <mutex>
#include <string_view>
#include <thread>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "nbd_client/target.hpp"

struct nbd_handle;

namespace nbd_client {

namespace socket_batching {
struct PipedPayload;
struct SentByReference;
}

// Completion token for coroutines: `auto [error] = co_await connection.async_pread(..., use_result);`
// gives the std::error_code instead of throwing it.
inline constexpr auto use_result = asio::experimental::as_tuple(asio::use_awaitable);

// What the server told us at the handshake.
struct ExportInfo {
  std::uint64_t size = 0;
  bool read_only = false;
  bool can_flush = false;
  bool can_fua = false;
  bool can_multi_conn = false;
  bool can_zero = false;
  bool can_trim = false;
  bool can_block_status = false;  // base:allocation was negotiated
  std::uint64_t minimum_block = 1;
  std::uint64_t preferred_block = 4096;
  std::uint64_t maximum_request = 32u << 20;  // NBD's conservative default
};

struct ConnectOptions {
  bool readonly = false;
  bool want_block_status = true;
  // false: the server answers reads with simple replies, which libnbd reads in two
  // recv() calls instead of four; no block status is possible then.
  bool structured_replies = true;
  std::chrono::milliseconds timeout = std::chrono::seconds(30);
  // Drive the socket from a thread of its own once connected (--connection-threads).
  bool own_thread = false;
  // With own_thread: once connected, leave the connection idle (no thread, not
  // armed) until start_held_thread(). A process that forks after connecting
  // (libfuse runs fusermount3 to mount) must have no other thread then: the child
  // inherits only the forking thread, and a lock another thread held stays locked
  // (seen: the child hanging in ASan's allocator before it could exec).
  bool hold_thread = false;
  // Fewer recv()/send() calls per command (--socket-batching); not with TLS.
  bool batch_socket = true;
  // TCP only (--tcp-keepalive): a server that acknowledges nothing for this long,
  // neither sent data nor keepalive probes, is taken as lost (the socket reports
  // ETIMEDOUT), so the usual reconnect and replay follow. Without it a request sent
  // to a host that died or a path that broke waits ~15 minutes (tcp_retries2), and
  // an idle connection's loss is never noticed until the next request. 0: the
  // system's behaviour.
  std::chrono::seconds tcp_keepalive = std::chrono::seconds(60);
  // TCP congestion control (--tcp-congestion): "auto" sets reno on connections to
  // this machine's loopback and leaves others alone, "system" leaves all alone, any
  // other name is set on every TCP connection (a failure fails the connection).
  // Not a std::string: GCC 12 copies a coroutine's by-value parameter from a
  // temporary bitwise, and a short string's pointer into itself then dangles
  // (seen: a crash destroying PoolOptions passed as `{}`).
  std::array<char, 16> tcp_congestion{"auto"};  // 15 characters at most (TCP_CA_NAME_MAX)
  void set_tcp_congestion(std::string_view name) {
    tcp_congestion.fill('\0');
    name.copy(tcp_congestion.data(), tcp_congestion.size() - 1);
  }
  // Runs on the loop thread after each read or write on the socket (not for a
  // connection on its own thread): the loop's busy-polling goes on while a
  // large reply arrives in pieces.
  std::function<void()> on_progress;
};

// A connect that failed because nothing was there to take it: no unix socket at the
// path (ENOENT), or nothing listening (ECONNREFUSED). A server not started yet, or
// gone; not one that is there and refuses.
inline bool server_absent(std::error_code error) {
  return error == std::errc::no_such_file_or_directory || error == std::errc::connection_refused;
}
// Between attempts while waiting for an absent server (--wait-for-server): often enough
// that a mount follows the server's start closely, seldom enough to cost nothing (an
// attempt on an absent server is one failed connect()).
inline constexpr std::chrono::milliseconds server_wait_interval{50};

class PendingCommand;

// Memory for commands in flight, reused: in the steady state no command
// allocates. A connection-owned free list rather than Asio's recycling
// allocator, whose few shared slots the commands kept taking from Asio's own
// operations (a miss, i.e. a malloc, for ~0.3 of all requests at depth 64).
// Unlocked on the loop thread alone; locked once shared with a connection
// thread. Every block comes back before the connection is destroyed, since
// nbd_close releases every command.
class CommandMemory : public std::pmr::memory_resource {
 public:
  static constexpr std::size_t block_size = 128;
  CommandMemory() = default;
  CommandMemory(const CommandMemory&) = delete;
  CommandMemory& operator=(const CommandMemory&) = delete;
  ~CommandMemory() override;
  void* take(std::size_t size);
  void give(void* block, std::size_t size);
  std::size_t kept() const { return free_blocks_.size(); }
  // Nothing taken is still out: no command, and no post made with allocator().
  bool all_given_back() {
    std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
    if (shared_) lock.lock();
    return outstanding_ == 0;
  }
  // With a connection thread, commands are taken on the loop thread and may be
  // given back on either.
  void share_between_threads() { shared_ = true; }

  // The same blocks for operations Asio allocates for the connection's own
  // posts (its flush): Asio's recycling cache, shared with every coroutine
  // frame, missed often enough to cost 0.04 mallocs per request. Only an
  // io_context executor honours it (any_io_executor drops a handler's allocator).
  std::pmr::polymorphic_allocator<std::byte> allocator() { return {this}; }

 private:
  void* do_allocate(std::size_t size, std::size_t alignment) override;
  void do_deallocate(void* block, std::size_t size, std::size_t alignment) override;
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

  std::vector<void*> free_blocks_;  // grows to the peak number in flight, then stays
  std::size_t outstanding_ = 0;     // taken and not yet given back
  std::mutex mutex_;
  bool shared_ = false;
};

// Commands whose last reply arrived during one nbd_aio_notify_* call. libnbd runs
// completion callbacks with the handle locked, so they only queue here; the
// connection resumes the waiting handlers right after the call returns, which
// needs neither a post nor an allocation per command.
struct ReadyList {
  // True inside nbd_aio_notify_*, and inside a submission on a connection thread;
  // only on the thread that drives the socket.
  bool collecting = false;
  PendingCommand* head = nullptr;
  PendingCommand* tail = nullptr;
  // A reply was NBD_ESHUTDOWN: the server may be going away (Connection::on_server_shutdown).
  bool server_shutting_down = false;
  void push(PendingCommand* command);
  PendingCommand* pop();
  PendingCommand* take_all();  // the whole queue as a chain through next_ready
};

// A command in flight, possibly split into several NBD commands (chunks). It is
// finished once, when the last chunk's callback has run, and freed once libnbd has
// released every chunk (the .free callback) and its handler has been handed on,
// so no order of the three can touch freed memory.
class PendingCommand {
 public:
  virtual ~PendingCommand() = default;
  // Queues the handler on ready_list while it collects, else posts it.
  virtual void finish(std::error_code result) = 0;
  virtual void deliver() = 0;  // calls a queued handler (loop thread, handle unlocked)
  virtual void destroy() = 0;  // libnbd has released the command

  int callbacks_outstanding = 0;
  int frees_outstanding = 0;
  std::atomic<std::size_t>* in_flight_counter = nullptr;  // the connection's load, for spreading
  ReadyList* ready_list = nullptr;
  PendingCommand* next_ready = nullptr;
  int first_error = 0;
  // A READ whose payload goes to a pipe (socket_batching::PipedPayload): expected
  // on registered_socket until the command finishes.
  socket_batching::PipedPayload* piped = nullptr;
  // A WRITE whose payload the socket takes by reference, registered there until
  // the command finishes.
  socket_batching::SentByReference* by_reference = nullptr;
  int registered_socket = -1;  // where piped or by_reference is registered
  bool submitting = false;
  bool finished = false;
};

// libnbd's completion and .free callbacks for one chunk of a PendingCommand
// (user_data). Exposed so the unit tests can drive every order libnbd may use.
int on_chunk_done(void* user_data, int* error);
void on_chunk_freed(void* user_data);

// One run of base:allocation block status: [offset, offset+length) with its flags.
struct Extent {
  std::uint64_t offset;
  std::uint64_t length;
  std::uint32_t flags;  // LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO
};

enum class CommandKind { read, write, flush, zero, trim, zero_fill, block_status };

// Everything one command needs; the buffer and extents must outlive its completion.
struct CommandRequest {
  CommandKind kind;
  std::byte* buffer = nullptr;
  std::size_t length = 0;
  std::uint64_t offset = 0;
  std::uint32_t flags = 0;
  std::vector<Extent>* extents = nullptr;  // block_status: filled in order, clipped to the request
  socket_batching::PipedPayload* piped = nullptr;  // read: payload to a pipe where possible
  socket_batching::SentByReference* by_reference = nullptr;  // write: payload sent by reference where possible
};

class Connection {
 public:
  explicit Connection(asio::any_io_executor executor);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Connects and negotiates within options.timeout. On failure returns an error and
  // leaves a one-line reason in error_message(). The error is ENOENT or ECONNREFUSED
  // only when nothing was there to take the connection (server_absent()); ECANCELED
  // when cancel_connect() or close() ended it, ETIMEDOUT when the server did not
  // finish the handshake in time, EPROTO when libnbd, TLS or the server refused it
  // (a bad URI, a name that does not resolve, no such export), another (EINVAL,
  // ENOMEM) for what failed here.
  asio::awaitable<std::error_code> async_connect(const Target& target, ConnectOptions options);

  const ExportInfo& info() const { return info_; }
  const std::string& error_message() const { return error_message_; }
  bool usable() const;
  // Negotiated once (and maybe lost since): commands may have been issued on it.
  bool was_established() const { return established_; }
  // Closed, and no command of it or post made with its memory is left: nothing the
  // loop will still run refers to it (loop thread, after close()).
  bool can_be_freed() { return !handle_ && !thread_.joinable() && command_memory_.all_given_back(); }
  // Why the system refused the thread of its own it was to have ("": it did not);
  // the loop drives it then.
  const std::string& thread_refused() const { return thread_refused_; }
  // Lost (the server closed it, or it broke); stays true. Acquire: a connection
  // thread wrote error_message_ before, and the loop may read it after.
  bool was_lost() const { return lost_.load(std::memory_order_acquire); }

  // Called once, on the executor, when an established connection is lost.
  std::function<void(const std::string& reason)> on_lost;
  // Called on the executor when a reply says the server is shutting down
  // (NBD_ESHUTDOWN), before the handlers of that reply run: if it calls drain(), the
  // command that got it (not carried out) fails as if the connection broke under it,
  // and is retried; if not, it fails with ESHUTDOWN.
  std::function<void()> on_server_shutdown;

  // For a server that is going away: takes no more commands and, once those in flight
  // are answered, asks the server to close (NBD_CMD_DISC); on_lost follows when it
  // has, or after drain_limit at the latest (commands still in flight then go with the
  // handle and are retried). nbdkit, stopped, waits for every client to leave, and
  // says so only to clients with a command in flight: so every connection drains.
  // Past drain_limit the socket is shut down: its commands fail, as in any loss.
  void drain();
  static constexpr std::chrono::seconds drain_limit{10};
  // Drained or draining, not yet lost.
  bool draining() const { return handle_ && draining_ && !lost_; }
  // drain() was called, whatever came after (lost, closed).
  bool drain_requested() const { return draining_.load(); }

  // Buffers must stay valid until completion. Requests longer than the server's
  // maximum are split into chunks issued together; the first error wins.
  template <typename Token>
  auto async_pread(std::byte* buffer, std::size_t length, std::uint64_t offset, Token&& token) {
    return async_command({CommandKind::read, buffer, length, offset}, std::forward<Token>(token));
  }
  // The same, with the payload moved to piped->pipe instead of the buffer when the
  // socket allows (batched, one NBD command); piped->piped and ->diverted tell
  // afterwards how much of it is there. *piped must outlive the completion; a
  // null piped is async_pread.
  template <typename Token>
  auto async_pread_piped(std::byte* buffer, std::size_t length, std::uint64_t offset,
                         socket_batching::PipedPayload* piped, Token&& token) {
    CommandRequest request{CommandKind::read, buffer, length, offset};
    request.piped = piped;
    return async_command(request, std::forward<Token>(token));
  }
  template <typename Token>
  auto async_pwrite(const std::byte* buffer, std::size_t length, std::uint64_t offset, std::uint32_t flags,
                    Token&& token) {
    return async_command({CommandKind::write, const_cast<std::byte*>(buffer), length, offset, flags},
                         std::forward<Token>(token));
  }
  // The same, with the payload's pages handed to the socket instead of copied
  // when the socket allows (batched); by_reference->referenced tells afterwards
  // whether any were, and socket_batching::SentByReference says what that means
  // for the buffer. *by_reference must outlive the completion.
  template <typename Token>
  auto async_pwrite_by_reference(const std::byte* buffer, std::size_t length, std::uint64_t offset,
                                 std::uint32_t flags, socket_batching::SentByReference* by_reference, Token&& token) {
    CommandRequest request{CommandKind::write, const_cast<std::byte*>(buffer), length, offset, flags};
    request.by_reference = by_reference;
    return async_command(request, std::forward<Token>(token));
  }
  template <typename Token>
  auto async_flush(Token&& token) {
    return async_command({CommandKind::flush}, std::forward<Token>(token));
  }
  // NBD_CMD_WRITE_ZEROES; flags may carry LIBNBD_CMD_FLAG_NO_HOLE / FUA.
  template <typename Token>
  auto async_zero(std::size_t length, std::uint64_t offset, std::uint32_t flags, Token&& token) {
    return async_command({CommandKind::zero, nullptr, length, offset, flags}, std::forward<Token>(token));
  }
  template <typename Token>
  auto async_trim(std::size_t length, std::uint64_t offset, Token&& token) {
    return async_command({CommandKind::trim, nullptr, length, offset}, std::forward<Token>(token));
  }
  // Zeros by writing zero-filled buffers: for servers without WRITE_ZEROES.
  template <typename Token>
  auto async_write_zero_fill(std::size_t length, std::uint64_t offset, std::uint32_t flags, Token&& token) {
    return async_command({CommandKind::zero_fill, nullptr, length, offset, flags}, std::forward<Token>(token));
  }
  // base:allocation extents from offset on; the server may describe less than length.
  template <typename Token>
  auto async_block_status(std::size_t length, std::uint64_t offset, std::vector<Extent>& extents, Token&& token) {
    return async_command({CommandKind::block_status, nullptr, length, offset, 0, &extents},
                         std::forward<Token>(token));
  }

  // Whether async_pread_piped can move payloads to a pipe, and
  // async_pwrite_by_reference send them by reference (a batched socket).
  bool pipes_payloads() const { return batched_; }

  // Commands issued and not yet completed: the load used to spread requests.
  std::size_t in_flight() const { return in_flight_.load(std::memory_order_relaxed); }
  // Position in its pool, for per-connection statistics.
  std::size_t index() const { return index_; }
  void set_index(std::size_t index) { index_ = index; }

  // Whether a name resolution that close() abandoned still runs (joins those that
  // have ended): exit() must not then run libnbd's destructor, which frees the
  // per-thread error key such a thread uses. Only abandoned threads are registered.
  static bool name_resolutions_running();

  // Makes a connect in progress give up now (e.g. on a signal).
  void cancel_connect() {
    connect_cancelled_ = true;
    connect_wakeup_.cancel();
    abandon_name_resolution();  // a slow name server must not hold up a stop
  }

  // Starts the thread a connection made with hold_thread waits for. A command
  // issued before then ran on the loop, which then keeps the connection.
  void start_held_thread();

  // Queues NBD_CMD_DISC and closes the handle (the pool stops a [ CMD ] server). Commands
  // still in flight complete with ESHUTDOWN.
  void close();

 private:
  void start_thread();
  void close_here();
  void begin_draining();  // on the thread that drives the socket
  void report_lost(const std::string& reason);
  // Submits the request's NBD command(s); the command finishes exactly once.
  void issue(PendingCommand* command, const CommandRequest& request);

  template <typename Handler>
  class HandlerCommand final : public PendingCommand {
   public:
    HandlerCommand(Handler handler, CommandMemory& memory) : handler_(std::move(handler)), memory_(memory) {}
    void finish(std::error_code result) override {
      result_ = result;
      if (ready_list && ready_list->collecting) {
        ready_list->push(this);
        return;
      }
      // Outside a notify call (a submission that failed at once, or nbd_close):
      // the handler may not run inside its own initiation or a destructor, so post.
      auto executor = asio::get_associated_executor(handler_);  // before the handler moves
      asio::post(executor, [handler = std::move(handler_), result]() mutable { handler(result); });
      if (last_part_done()) free_self();
    }
    void deliver() override {
      Handler handler = std::move(handler_);
      std::error_code result = result_;
      if (last_part_done()) free_self();
      handler(result);
    }
    void destroy() override {
      if (last_part_done()) free_self();
    }

   private:
    void free_self() {
      CommandMemory& memory = memory_;
      this->~HandlerCommand();
      memory.give(this, sizeof(HandlerCommand));
    }

    // Two parts end a command: its handler handed on, and libnbd's release. With
    // a connection thread they may happen on different threads.
    bool last_part_done() { return parts_done_.fetch_add(1, std::memory_order_acq_rel) == 1; }

    Handler handler_;
    CommandMemory& memory_;
    std::error_code result_;
    std::atomic<int> parts_done_{0};
  };

  template <typename Token>
  auto async_command(CommandRequest request, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [this](auto handler, const CommandRequest& request) {
          using Command = HandlerCommand<std::decay_t<decltype(handler)>>;
          static_assert(sizeof(Command) <= CommandMemory::block_size, "a command would allocate");
          Command* command = new (command_memory_.take(sizeof(Command))) Command(std::move(handler), command_memory_);
          if (threaded_)
            asio::post(descriptor_.get_executor(), [this, command, request] { issue(command, request); });
          else
            issue(command, request);
        },
        token, request);
  }

  int64_t submit_chunk(PendingCommand* command, const CommandRequest& request, std::size_t done, std::size_t chunk);
  std::size_t chunk_limit(CommandKind kind) const;
  static std::byte* zero_buffer();
  static constexpr std::size_t zero_buffer_size = 1u << 20;

  void arm();
  void service();
  void schedule_flush();
  void deliver_ready();
  void notice_state_change();
  void bind_descriptor(int fd);
  void release_descriptor();
  void read_export_info();
  bool tune_socket(const ConnectOptions& options);
  // A failed connect: gives the socket back, closes the handle, returns `error`.
  std::error_code abandon_handle(int error);
  int start_connect(const Target& target);
  // start_connect() on a thread of its own, for targets named by host: libnbd resolves
  // the name inside the call (getaddrinfo), and a slow resolver must not stall the
  // loop (every other connection, FUSE, timers) during a reconnect. On failure the
  // reason is in error_message_ (libnbd's errors are per thread).
  asio::awaitable<int> start_connect_off_loop(const Target& target);
  // close() during a name resolution: the thread keeps the handle and closes it when
  // the resolver returns, so a stop never waits for a slow name server.
  void abandon_name_resolution();
  static void* resolve_and_connect(void* job);  // the resolver thread's body

 public:
  struct NameResolution;  // (public only for the resolver thread's job)

 private:

  asio::any_io_executor executor_;
  CommandMemory command_memory_;  // before handle_: outlives every command
  nbd_handle* handle_ = nullptr;
  asio::posix::stream_descriptor descriptor_;
  int bound_fd_ = -1;
  bool read_armed_ = false;
  bool write_armed_ = false;
  bool connecting_ = false;
  std::atomic<bool> lost_{false};
  std::atomic<bool> draining_{false};  // drain(): no new commands
  bool disconnect_sent_ = false;
  std::unique_ptr<asio::steady_timer> drain_deadline_;  // on the socket's executor
  bool established_ = false;  // negotiated and ready once; stays true after a loss
  bool tls_ = false;
  // Reads ahead and joins sends on the socket (socket_batching.hpp): plain sockets
  // only, since TLS records are read by GnuTLS and poll() cannot see its buffer.
  bool batched_ = false;
  bool flush_scheduled_ = false;
  bool output_blocked_ = false;  // a flush found the socket full: wait for room
  asio::steady_timer connect_wakeup_;
  bool connect_cancelled_ = false;
  // Why the connect under way failed, once it has (last_connect_error()); empty till then.
  std::error_code connect_error_;
  // start_connect_off_loop()'s, while its thread holds handle_ (loop thread only).
  std::shared_ptr<NameResolution> name_resolution_;
  ExportInfo info_;
  std::atomic<std::size_t> in_flight_{0};
  // Connection thread (ConnectOptions::own_thread): once connected, the socket,
  // libnbd calls and completions run there; handlers are posted back to executor_.
  bool threaded_ = false;
  bool thread_held_ = false;  // connected with hold_thread, waiting for start_held_thread()
  std::function<void()> on_progress_;  // ConnectOptions::on_progress
  std::unique_ptr<asio::io_context> thread_context_;
  std::thread thread_;
  std::string thread_refused_;
  ReadyList ready_;
  std::size_t index_ = 0;
  std::string error_message_;
};

}  // namespace nbd_client
