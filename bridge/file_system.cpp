// FUSE ops for the exported file and its directory, and the request coroutines.
// Loop thread only; see file_system.hpp for the reply-once rule.
#include "bridge/file_system.hpp"

#include "bridge/diagnostics.hpp"
#include "bridge/errno_map.hpp"
#include "bridge/geometry.hpp"
#include "bridge/pending_signals.hpp"
#include "nbd_client/socket_batching.hpp"

#include <asio/experimental/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/post.hpp>
#include <asio/redirect_error.hpp>
#include <asio/use_awaitable.hpp>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <optional>
#include <tuple>
#include <fcntl.h>
#include <libnbd.h>
#include <linux/falloc.h>
#include <malloc.h>
#include <sys/statvfs.h>
#include <unistd.h>

namespace bridge {

namespace {

// Whether the thread that sent the request has a signal pending that ends its wait
// (pending_signals.hpp). What cannot be read counts as yes: the process may be gone,
// or in another pid namespace (pid 0), and then EINTR is as before.
bool requester_has_ending_signal(fuse_req_t request) {
  const fuse_ctx* context = fuse_req_ctx(request);
  if (!context || context->pid <= 0) return true;
  char path[48];
  std::snprintf(path, sizeof path, "/proc/%d/status", int(context->pid));
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return true;
  char text[4096];
  ssize_t got = read(fd, text, sizeof text);
  close(fd);
  if (got <= 0) return true;
  return signal_ends_wait(std::string_view(text, std::size_t(got))).value_or(true);
}

// st_blksize, the I/O size programs take as preferred (cmp, stdio buffers; cp and dd
// choose their own): each request is a round trip to the server, and without the page
// cache's readahead (--cache=none) a 4 KiB one made `cmp` of a disk 5x slower than
// nbdfuse. As NFS gives its transfer size, so do we; a server's larger preferred block wins.
constexpr std::uint64_t preferred_io_size = 128 * 1024;

constexpr fuse_ino_t root_inode = FUSE_ROOT_ID;
constexpr fuse_ino_t file_inode_in_directory = 2;
// Directory mode only: live statistics as JSON, a snapshot taken at each open.
constexpr fuse_ino_t stats_inode = 3;
constexpr const char* stats_file_name = ".stats";
// Attributes never change while mounted (the export cannot be resized), so the
// kernel may cache them for long.
constexpr double attribute_timeout_seconds = 3600.0;
// The file's st_blocks follows the server's allocation, so its attributes are
// cached only briefly.
constexpr double file_attribute_timeout_seconds = 1.0;
// How long a read or lseek may go unanswered after a signal before it gets EINTR.
constexpr std::chrono::seconds interrupt_grace{1};
// fuse_file_info::fh: .stats handles count up from 2; the export's carry export_handle,
// and writable_handle when opened for writing (libfuse passes FLUSH no open flags),
// truncating_handle when opened with O_TRUNC, above a serial number.
constexpr std::uint64_t export_handle = std::uint64_t(1) << 63;
constexpr std::uint64_t writable_handle = std::uint64_t(1) << 62;
constexpr std::uint64_t truncating_handle = std::uint64_t(1) << 61;
constexpr bool is_export_handle(const fuse_file_info* file) { return file->fh & export_handle; }
constexpr std::uint32_t FOPEN_PARALLEL_DIRECT_WRITES = 1u << 6;  // linux/fuse.h; no field in libfuse 3.14
constexpr std::size_t largest_request = 1u << 20;  // FUSE max_write/max_read on this kernel

// Block-status replies spent on one count of allocated bytes; past it, the rest
// of a huge export counts as allocated.
constexpr unsigned allocation_scan_limit = 256;
// Other clients of the export write too: a stat counts again once the last count is
// this old, though this mount wrote nothing (at most one count per period, and only
// while someone asks).
constexpr std::chrono::seconds allocation_recount_period{5};

}  // namespace

FileSystem::FileSystem(asio::any_io_executor executor, nbd_client::ConnectionPool& pool,
                       fuse_front::Session& session, FileSystemOptions options)
    : executor_(executor),
      session_(session),
      options_(std::move(options)),
      statistics_(std::make_unique<Statistics>(1)),
      io_(executor, pool, buffers_),
      owner_uid_(getuid()),
      owner_gid_(getgid()),
      drained_(executor),
      expiry_sweep_(executor),
      live_deadline_(executor),
      interrupt_timer_(executor),
      idle_release_timer_(executor) {
  clock_gettime(CLOCK_REALTIME, &mounted_at_);
  session_.on_interrupt([this](std::uint64_t unique) { interrupt(unique); });
}

void FileSystem::set_export(const nbd_client::ExportInfo& info) {
  export_ = info;
  io_.configure(info);
  io_.observe(statistics_.get(), faults_.get());
  allocated_bytes_ = info.size;
  read_ahead_.set_export(info.size, info.minimum_block);
}

void FileSystem::inject_faults(std::unique_ptr<FaultInjector> faults) {
  faults_ = std::move(faults);
  io_.observe(statistics_.get(), faults_.get());
}

// ---- request tracking -------------------------------------------------------

FileSystem::Tracked::Tracked(FileSystem& owner, fuse_req_t request, Operation kind, const char* operation,
                             std::uint64_t offset, std::size_t length, std::uint64_t unique)
    : owner_(owner),
      request_(request),
      kind_(kind),
      operation_(operation),
      id_(owner.next_request_id_++),
      offset_(offset),
      length_(length),
      started_(std::chrono::steady_clock::now()),
      unique_(unique) {
  next_ = owner_.in_flight_head_;
  if (next_) next_->previous_ = this;
  owner_.in_flight_head_ = this;
  ++owner_.in_flight_count_;
  if (!owner_.idle_release_armed_) owner_.arm_idle_release();
  if constexpr (statistics_compiled_in) owner_.statistics_->request_started(kind_);
  if (owner_.options_.verbose) {
    trace("#%" PRIu64 " %s offset=%" PRIu64 " length=%zu", id_, operation_, offset_,
                 length_);
  }
}

FileSystem::Tracked::~Tracked() {
  if (!replied_) reply_error(EIO);  // never leave the application waiting
  if constexpr (statistics_compiled_in)
    if (answered_early_) owner_.statistics_->answered_early(/*finished=*/true);
  if (previous_) previous_->next_ = next_;
  else owner_.in_flight_head_ = next_;
  if (next_) next_->previous_ = previous_;
  if (--owner_.in_flight_count_ == 0 && owner_.draining_) owner_.drained_.cancel();
}

RequestLimits FileSystem::Tracked::limits() const {
  // --request-timeout answers it with EIO then: no write or zero of it may be sent after.
  const auto timeout = owner_.options_.request_timeout;
  return {.answered = &replied_,
          .send_until = timeout.count() > 0 ? started_ + timeout : std::chrono::steady_clock::time_point::max()};
}

bool FileSystem::Tracked::begin_reply() {
  if (replied_) return false;  // already answered by drain()
  replied_ = true;
  owner_.session_.note_activity();  // the application may send the next request at once
  return true;
}

void FileSystem::Tracked::record(int error, std::size_t length) const {
  if constexpr (!statistics_compiled_in) return;
  auto span = std::chrono::steady_clock::now() - started_;
  owner_.statistics_->request_finished(
      kind_, length, error != 0 && error != ENXIO && error != EINTR,  // answers, not failures
      std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(span).count()));
}

void FileSystem::Tracked::trace_reply(int error, std::size_t length) const {
  record(error, length);
  if (!owner_.options_.verbose) return;
  auto micros = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started_);
  if (error)
    trace("#%" PRIu64 " %s failed: %s (%lld us)", id_, operation_, std::strerror(error),
                 static_cast<long long>(micros.count()));
  else
    trace("#%" PRIu64 " %s done: %zu bytes (%lld us)", id_, operation_, length,
                 static_cast<long long>(micros.count()));
}

void FileSystem::Tracked::reply_error(int error) {
  if (!begin_reply()) return;
  trace_reply(error, 0);
  fuse_reply_err(request_, error);
}

bool FileSystem::Tracked::answer_early(int error) {
  if (replied_) return false;
  reply_error(error);
  answered_early_ = true;
  if (kind_ == Operation::write || kind_ == Operation::trim_zero)
    held_after_answer_.emplace(owner_.io_.hold_after_answer(offset_, length_));
  if constexpr (statistics_compiled_in) owner_.statistics_->answered_early(/*finished=*/false);
  return true;
}

void FileSystem::Tracked::reply_data(const std::byte* data, std::size_t length) {
  if (!begin_reply()) return;
  trace_reply(0, length);
  fuse_reply_buf(request_, reinterpret_cast<const char*>(data), length);
}

asio::awaitable<void> FileSystem::Tracked::reply_piped(fuse_front::ReplyPipe& pipe, std::size_t length) {
  if (!begin_reply()) co_return;
  trace_reply(0, length);
  fuse_front::Session& session = owner_.session_;
  if (owner_.reply_from_thread(length))
    co_await session.reply_worker().async_reply_piped(request_, pipe, session.device(), length, asio::use_awaitable);
  else
    pipe.send(request_, session.device(), length);
}

// After a READ issued with a pipe: true if the pipe is to carry the reply. If not
// all of the payload went there (out of order, a full pipe, a failure), what did
// comes back to the buffer, before a retry can write there, and the pipe is given
// back (pipe becomes null); false then means even that failed, so the payload
// must be read again.
bool FileSystem::keep_pipe(fuse_front::ReplyPipe*& pipe, const nbd_client::socket_batching::PipedPayload& piped,
                           std::error_code error) {
  if (!error && !piped.diverted && piped.piped == piped.length) {
    if constexpr (statistics_compiled_in) statistics_->spliced_read(true);
    return true;
  }
  bool restored = pipe->take_back(piped.buffer, piped.piped);
  // A fallback only when the pipe cost a copy: none went there (a reply that is
  // all hole, chunks out of order from the start) is an ordinary read, and a
  // failed read fails either way.
  bool copied_back = !error && piped.piped > 0;
  session_.reply_pipes().give_back(std::exchange(pipe, nullptr), !copied_back);
  if constexpr (statistics_compiled_in)
    if (copied_back) statistics_->spliced_read(false);
  return restored;
}

// The copy into the application's pages then overlaps the loop's work on the
// other requests in flight. Alone, the hand-over would only add latency (1 MiB
// buffered reads at depth 1: 1.3-1.7 against 1.8 GiB/s inline).
bool FileSystem::reply_from_thread(std::size_t length) const {
  return options_.reply_thread_minimum && length >= options_.reply_thread_minimum && in_flight_count_ > 1;
}

void FileSystem::Tracked::reply_written(std::size_t length) {
  if (!begin_reply()) return;
  trace_reply(0, length);
  fuse_reply_write(request_, length);
}

asio::awaitable<void> FileSystem::expire_old_requests() {
  const auto timeout = options_.request_timeout;
  const auto period = std::max<std::chrono::milliseconds>(timeout / 4, std::chrono::milliseconds(20));
  while (!draining_) {
    expiry_sweep_.expires_after(period);
    std::error_code cancelled;
    co_await expiry_sweep_.async_wait(asio::redirect_error(asio::use_awaitable, cancelled));
    if (cancelled) break;
    const auto now = std::chrono::steady_clock::now();
    // A command sent cannot be recalled: its coroutine still owns the buffers and
    // finishes quietly when the server answers. One waiting for a reconnect gives up.
    bool answered = false;
    for (Tracked* request = in_flight_head_; request; request = request->next_)
      if (now - request->started_ >= timeout) answered |= request->answer_early(EIO);
    if (answered) io_.release_answered();
  }
}

// A signal for a thread waiting in read() or lseek(). A request the server has not
// answered within interrupt_grace of it is answered with EINTR, so a stalled server
// never leaves a process unkillable (kill -9, Ctrl-C). Not at once: the kernel sends
// FUSE_INTERRUPT for any signal a process catches (SIGCHLD, timers, profilers), and a
// read of a regular file failing with EINTR would surprise most programs. Nor when the
// signal does not end the wait (a stop, ptrace, the freezer: the call goes on after
// them), which the thread's pending signals tell. The command runs on and its answer
// is dropped (as after --request-timeout). Writes, flushes and fallocate wait on: the
// server may still carry one out, after the application has sent another in its place.
//
// The request's Tracked exists by the time its interrupt is read: hand_over() resumes a
// parked request server inline and co_spawn dispatches, so each runs up to its first
// wait within the handler. An interrupt that finds none is for a request answered
// already, or one that is not interruptible.
void FileSystem::interrupt(std::uint64_t unique) {
  for (Tracked* request = in_flight_head_; request; request = request->next_)
    if (request->unique_ == unique) {
      if (!request->replied_ && request->interrupted_at_ == std::chrono::steady_clock::time_point{}) {
        request->interrupted_at_ = std::chrono::steady_clock::now();
        if (options_.verbose)
          trace("#%" PRIu64 " %s interrupted by a signal", request->id_,
                       request->operation_);
        answer_interrupts_later();
      }
      return;
    }
}

void FileSystem::answer_interrupts_later() {
  if (interrupt_timer_armed_ || draining_) return;
  using clock = std::chrono::steady_clock;
  clock::time_point earliest = clock::time_point::max();
  for (Tracked* request = in_flight_head_; request; request = request->next_)
    if (request->interrupted_at_ != clock::time_point{} && !request->replied_)
      earliest = std::min(earliest, request->interrupted_at_ + interrupt_grace);
  if (earliest == clock::time_point::max()) return;
  interrupt_timer_armed_ = true;
  interrupt_timer_.expires_at(earliest);
  interrupt_timer_.async_wait([this](std::error_code cancelled) {
    interrupt_timer_armed_ = false;
    if (cancelled || draining_) return;
    const auto now = clock::now();
    bool answered = false;
    for (Tracked* request = in_flight_head_; request; request = request->next_) {
      if (request->interrupted_at_ == clock::time_point{} || now - request->interrupted_at_ < interrupt_grace ||
          request->replied_)
        continue;
      if (requester_has_ending_signal(request->request_))
        answered |= request->answer_early(EINTR);
      else
        request->interrupted_at_ = now;  // stopped (Ctrl-Z), traced or frozen: it goes on; look again later
    }
    if (answered) io_.release_answered();
    answer_interrupts_later();  // those interrupted since
  });
}

void FileSystem::arm_idle_release() {
  idle_release_armed_ = true;  // also when off or stopping: requests then do not call again
  if (draining_ || options_.idle_release.count() <= 0) return;
  request_id_at_idle_check_ = next_request_id_;
  idle_release_timer_.expires_after(options_.idle_release);
  idle_release_timer_.async_wait([this](std::error_code cancelled) {
    if (cancelled || draining_) return;  // stopping: stays armed, so nothing arms it again
    if (next_request_id_ != request_id_at_idle_check_ || in_flight_count_ > 0) {
      arm_idle_release();  // not idle for the whole period: look again a period later
      return;
    }
    release_idle_memory();
    idle_release_armed_ = false;
  });
}

// A burst of 1 MiB requests leaves tens of MiB resident in free buffers (kept so
// that the next burst does not fault its memory in again); a mount idle for a while
// gives them back, and the heap's free memory too.
void FileSystem::release_idle_memory() {
  read_ahead_.clear();
  buffers_.release_idle();
  session_.release_idle_buffers();
  malloc_trim(0);
  if (options_.verbose) trace("idle: buffer memory given back");
}

asio::awaitable<void> FileSystem::drain(std::chrono::milliseconds bound) {
  draining_ = true;
  io_.release_answered();  // read-ahead fetches waiting for a reconnect end now (draining_ is their answer)
  read_ahead_.clear();
  expiry_sweep_.cancel();
  interrupt_timer_.cancel();
  idle_release_timer_.cancel();
  go_live();  // (drops on_live now)
  drained_.expires_after(bound);
  // The background allocation count is waited for too: closing the connection
  // under its block-status command would leave the server writing to a closed socket.
  // So are read-ahead fetches, but for a second at most: nobody waits for their data.
  const auto fetches_waited_until =
      std::chrono::steady_clock::now() + std::min<std::chrono::milliseconds>(bound, std::chrono::seconds(1));
  while (in_flight_count_ > 0 || allocation_counting_ ||
         (fetches_running_ > 0 && std::chrono::steady_clock::now() < fetches_waited_until)) {
    if (in_flight_count_ == 0 && !allocation_counting_ && drained_.expiry() > fetches_waited_until)
      drained_.expires_at(fetches_waited_until);
    std::error_code woken;
    co_await drained_.async_wait(asio::redirect_error(asio::use_awaitable, woken));
    if (!woken) break;  // deadline passed
  }
  // Writes still running are answered now, before the flush at stop is sent: one the
  // server acknowledged after it would be covered by nothing, yet told success.
  for (Tracked* request = in_flight_head_; request; request = request->next_)
    if (request->kind_ == Operation::write || request->kind_ == Operation::trim_zero) request->answer_early(EIO);
  co_await flush_at_stop();
  for (Tracked* request = in_flight_head_; request; request = request->next_) request->answer_early(EIO);
  io_.release_answered();  // those waiting for a reconnect end now
  stop_request_servers();
}

// A process that still holds the file open (the bridge was signalled, or unmounted
// lazily) sends no close's flush: one now, after the writes, in drain's bound (and at
// least a second, though reads used it up). Not when the server is out of reach: a stop during
// an outage must not wait for a reconnect. Any writes left uncovered are said.
// Writes still in flight do not hold it back: drain() has answered them EIO, and the
// flush covers every write acknowledged before it is sent.
asio::awaitable<void> FileSystem::flush_at_stop() {
  if (!io_.has_unflushed_writes()) co_return;
  std::string not_done;
  if (!io_.can_flush_now()) {
    not_done = "the server is not connected";
  } else {
    // At least a second, though reads the server holds used up the bound.
    if (drained_.expiry() < std::chrono::steady_clock::now() + std::chrono::seconds(1))
      drained_.expires_after(std::chrono::seconds(1));
    auto flushed = std::make_shared<std::optional<std::error_code>>();  // set when done, even after we left
    asio::co_spawn(executor_, [this, flushed]() -> asio::awaitable<void> {
      const auto started = std::chrono::steady_clock::now();
      if constexpr (statistics_compiled_in) statistics_->request_started(Operation::flush);
      // The bridge's own command: no injected delay may hold the stop (nor its exit).
      *flushed = co_await io_.flush(/*always=*/false, RequestLimits{.faults_drawn = true});
      if constexpr (statistics_compiled_in)  // counted as an fsync would be
        statistics_->request_finished(Operation::flush, 0, bool(**flushed),
                                      std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                        std::chrono::steady_clock::now() - started).count()));
      drained_.cancel();
    }, asio::detached);
    while (!*flushed) {
      std::error_code woken;
      co_await drained_.async_wait(asio::redirect_error(asio::use_awaitable, woken));
      if (!woken) break;
    }
    if (!*flushed) not_done = "it did not finish in time";
    else if (**flushed) not_done = "it failed: " + (*flushed)->message();
  }
  stop_left_writes_unflushed_ = !not_done.empty();
  if (!not_done.empty())
    diagnostic("writes no fsync covered may not be durable: the flush at unmount was not done (" + not_done + ")",
               final_patience);
}

// ---- request coroutines -----------------------------------------------------

void FileSystem::hand_over(Job job) {
  if (idle_request_servers_.empty()) {
    request_servers_.push_back(std::make_unique<RequestServer>());
    RequestServer& server = *request_servers_.back();
    server.job = std::move(job);
    asio::co_spawn(executor_, request_server(server), asio::detached);
    return;
  }
  RequestServer& server = *idle_request_servers_.back();
  idle_request_servers_.pop_back();
  server.job = std::move(job);
  Resumption resume = std::move(*server.parked);
  server.parked.reset();
  // Called directly, not through asio::dispatch: on the loop thread both resume
  // the server at once, up to its first wait, but dispatch through the
  // type-erased executor wraps the handler in a heap-allocated function.
  resume();
}

void FileSystem::stop_request_servers() {
  for (RequestServer* server : std::exchange(idle_request_servers_, {})) {
    server->stop = true;
    Resumption resume = std::move(*server->parked);
    server->parked.reset();
    resume();
  }
}

bool FileSystem::answer_from_read_ahead(Tracked& tracked, const Job& job) {
  const auto now = std::chrono::steady_clock::now();
  const std::byte* ahead = read_ahead_.find(job.handle, job.offset, job.length, now);
  if (ahead) {
    tracked.reply_data(ahead, job.length);  // copied into the kernel before observe() may drop its window
    if constexpr (statistics_compiled_in) statistics_->read_ahead_served(job.length);
  }
  // Fetches are bounded (each holds up to 1 MiB until its reply, however late), and
  // none waits for a reconnect: the READs themselves do.
  auto may_fetch = [this] { return fetches_running_ < fetches_at_most && io_.can_read_now(); };
  if (auto fetch = read_ahead_.observe(job.handle, job.offset, job.length, now, may_fetch))
    asio::co_spawn(executor_, fetch_ahead(*fetch), asio::detached);
  // Such a reader comes back as soon as it has used the data: a loop asleep by then
  // costs it a wake-up per READ (md5sum of 512 MiB, 32 KiB READs ~60 us apart:
  // 2.7-2.8 s with the default 50 us of polling, 1.5-1.6 s polling for it).
  if (ahead) session_.expect_request_within(read_ahead_.next_read_within(job.handle));
  return ahead != nullptr;
}

// The bridge's own READ: no injected faults (the READs it answers draw their own), not
// sent once too late to be fresh on arrival, and given up by a stop; a stop waits for
// it (within its bound), so that no reply is left to the server's closed socket.
asio::awaitable<void> FileSystem::fetch_ahead(ReadAhead<BufferPool::Lease>::Fetch fetch) {
  // Owned here until fetched() takes it: the command writes into it until it ends,
  // whatever became of the window meanwhile.
  BufferPool::Lease buffer = buffers_.acquire(fetch.length);
  const RequestLimits limits{.answered = &draining_,
                             .send_until = std::chrono::steady_clock::now() + read_ahead_.limits().freshness,
                             .faults_drawn = true};
  ++fetches_running_;
  const std::error_code error = co_await io_.read(buffer.data(), fetch.length, fetch.offset, limits);
  if (--fetches_running_ == 0 && draining_) drained_.cancel();
  if constexpr (statistics_compiled_in) statistics_->read_ahead_fetched(fetch.length, bool(error));
  if (options_.verbose)
    trace("read-ahead of %zu bytes at %" PRIu64 " %s", fetch.length, fetch.offset,
          error ? error.message().c_str() : "done");
  read_ahead_.fetched(fetch, std::move(buffer), !error, std::chrono::steady_clock::now());
}

// With injected faults, a READ or WRITE draws them before it chooses its path, so
// that it takes the path it would take without them. Returns the injected error;
// a request answered during the delay (a stop, a timeout) is not sent: EIO.
asio::awaitable<std::error_code> FileSystem::draw_faults(RequestLimits& limits) {
  limits.faults_drawn = true;
  if (auto error = co_await io_.inject_faults(limits, limits.injected_delay)) co_return error;
  if (limits.given_up(std::chrono::steady_clock::now())) co_return std::error_code(EIO, std::generic_category());
  co_return std::error_code{};
}

// GCC 12 with the sanitizers pairs this coroutine frame's allocation (Asio's
// recycling allocator, falling back to ::operator new) with the frame type's own
// operator delete, and warns of a mismatch: both go through the same allocator
// (AddressSanitizer's alloc-dealloc check passes). A false positive of the
// optimiser's view of coroutine frames.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
asio::awaitable<void> FileSystem::request_server(RequestServer& self) {
  using clock = std::chrono::steady_clock;
  while (!self.stop) {
    Job job = std::move(self.job);
    if (job.kind == Operation::read) {
      Tracked tracked(*this, job.request, Operation::read, "READ", job.offset, job.length, job.unique);
      RequestLimits limits = tracked.limits();
      // (Tested here, not in draw_faults: a coroutine's frame would be allocated per request.)
      std::error_code injected;  // an injected error (or EIO: answered during the delay) fails it unsent
      if (io_.injects_faults()) injected = co_await draw_faults(limits);
      if (!(job.read_ahead && !injected && answer_from_read_ahead(tracked, job))) {
        // The buffer outlives the command: it is released only after the reply.
        BufferPool::Lease buffer = buffers_.acquire(job.length);
        std::error_code error = injected;
        nbd_client::Connection* connection =
            injected ? nullptr : io_.direct_connection(job.offset, job.length, false, BlockIo::read_purpose(job.length));
        // A large payload goes from the socket to a pipe that already holds the
        // reply's header, and from there to the reader: no copy through our memory.
        fuse_front::ReplyPipe* pipe = nullptr;
        if (connection && options_.spliced_read_minimum && job.length >= options_.spliced_read_minimum &&
            connection->pipes_payloads())
          pipe = session_.reply_pipes().start_reply(job.unique, job.length);
        nbd_client::socket_batching::PipedPayload piped{buffer.data(), job.length, pipe ? pipe->write_end() : -1};
        if (connection) {
          auto sent = clock::now() - limits.injected_delay;  // the NBD span includes an injected delay
          std::tie(error) = co_await connection->async_pread_piped(buffer.data(), job.length, job.offset,
                                                                   pipe ? &piped : nullptr, nbd_client::use_result);
          if (!io_.finished(Operation::read, *connection, sent, error)) connection = nullptr;  // broke: go the long way
          limits.injected_delay = {};  // spent on this command: a second one is the server's alone
        }
        if (pipe && !keep_pipe(pipe, piped, error)) connection = nullptr;  // the pipe failed: read it again
        if (!connection && !injected) error = co_await io_.read(buffer.data(), job.length, job.offset, limits);
        if (pipe) {
          co_await tracked.reply_piped(*pipe, job.length);
          session_.reply_pipes().give_back(pipe);  // drains a reply that was not sent (timed out)
        } else if (error) {
          tracked.reply_error(to_application_errno(error));
        } else if (reply_from_thread(job.length)) {
          if (tracked.begin_reply()) {
            tracked.trace_reply(0, job.length);
            co_await session_.reply_worker().async_reply_buf(job.request, buffer.data(), job.length,
                                                             asio::use_awaitable);
          }
        } else {
          tracked.reply_data(buffer.data(), job.length);
        }
        if (job.read_ahead) read_ahead_.answered(job.handle, clock::now());
      }
    } else {
      Tracked tracked(*this, job.request, Operation::write, job.durable ? "WRITE+SYNC" : "WRITE", job.offset,
                      job.length);
      // Windows over its range, fetched before it or while it runs, may hold the old data.
      read_ahead_.written(job.offset, job.length);
      // job.payload keeps job.data (inside the FUSE receive buffer) alive until the server has it.
      RequestLimits limits = tracked.limits();
      // (Tested here, not in draw_faults: a coroutine's frame would be allocated per request.)
      std::error_code injected;  // an injected error (or EIO: answered during the delay) fails it unsent
      if (io_.injects_faults()) injected = co_await draw_faults(limits);
      std::error_code error = injected;
      auto direct = [&] {
        return io_.direct_connection(job.offset, job.length, job.durable, BlockIo::write_purpose(job.length));
      };
      nbd_client::Connection* connection = injected ? nullptr : direct();
      std::optional<RangeLock::Guard> blocks_held;
      bool given_up = false;
      if (connection && io_.writes_hold_blocks()) {
        blocks_held.emplace(co_await io_.hold_blocks(job.offset, job.length, limits));
        // The wait may have outlived that connection, or the request: answered or past its
        // expiry, it is not sent, nor queued for the blocks again.
        given_up = limits.given_up(std::chrono::steady_clock::now());
        connection = given_up ? nullptr : direct();
      }
      if (connection) {
        auto sent = clock::now() - limits.injected_delay;  // the NBD span includes an injected delay
        // The receive buffer's pages go to the socket as they are: job.payload
        // is not reused before the server has answered (this command's end).
        nbd_client::socket_batching::SentByReference by_reference{job.data, job.length};
        bool send_by_reference = options_.spliced_write_minimum && job.length >= options_.spliced_write_minimum &&
                                 job.payload && connection->pipes_payloads();
        std::tie(error) = co_await connection->async_pwrite_by_reference(
            job.data, job.length, job.offset, job.durable ? LIBNBD_CMD_FLAG_FUA : 0,
            send_by_reference ? &by_reference : nullptr, nbd_client::use_result);
        if (by_reference.referenced) {
          // Without the server's answer its socket may still hold the pages,
          // and be read: never write them again (a retry sends them unchanged).
          if (error) job.payload.retire_when_released();
          if constexpr (statistics_compiled_in) statistics_->spliced_write(bool(error));
        }
        if (!io_.finished(Operation::write, *connection, sent, error, job.durable)) connection = nullptr;
        limits.injected_delay = {};  // spent on this command: a second one is the server's alone
      }
      blocks_held.reset();  // write() takes it again: the lock is not reentrant
      if (given_up) error = std::error_code(EIO, std::generic_category());
      else if (!connection && !injected)
        error = co_await io_.write(job.data, job.length, job.offset, job.durable, limits);
      if (!injected && !given_up) note_allocation_changed(job.length);  // (one never sent allocates nothing)
      read_ahead_.written(job.offset, job.length);
      if (error) tracked.reply_error(to_application_errno(error));
      else tracked.reply_written(job.length);
    }
    job = Job{};  // give the receive buffer back before parking
    if (draining_) break;
    co_await asio::async_initiate<const asio::use_awaitable_t<>&, void()>(
        [this, &self](Resumption resume) {
          self.parked.emplace(std::move(resume));
          idle_request_servers_.push_back(&self);
        },
        asio::use_awaitable);
  }
}
#pragma GCC diagnostic pop

// fsync: close()'s flush is not where an application looks for lost writes; fsync is.
// As Linux reports a writeback error, each open file is told once of writes whose fate
// a lost connection left unknown since it was last told (or opened): one caller's
// fsync (a reader's `sync FILE`, say) does not take the error from the writer's.
asio::awaitable<void> FileSystem::serve_flush(fuse_req_t request, bool fsync, std::uint64_t handle) {
  Tracked tracked(*this, request, Operation::flush, fsync ? "FSYNC" : "FLUSH", 0, 0);
  std::error_code error = co_await io_.flush(/*always=*/fsync, tracked.limits());
  if (fsync) {
    // A failed flush tells its own caller (and counts for the others: BlockIo::flush()).
    const std::uint64_t events = io_.unknown_writes_events();
    if (auto told = unknown_writes_told_.find(handle); told != unknown_writes_told_.end() && told->second < events) {
      told->second = events;
      unknown_writes_reported_ = events;
      if (!error) error = std::error_code(EIO, std::generic_category());
    }
  }
  tracked.reply_error(to_application_errno(error));
}

asio::awaitable<void> FileSystem::serve_zero(fuse_req_t request, std::uint64_t offset, std::uint64_t length,
                                             bool allow_unmap) {
  Tracked tracked(*this, request, Operation::trim_zero, allow_unmap ? "PUNCH-HOLE" : "ZERO-RANGE", offset,
                  std::size_t(length));
  read_ahead_.written(offset, length);
  std::error_code error = co_await io_.zero(offset, length, allow_unmap, tracked.limits());
  read_ahead_.written(offset, length);
  note_allocation_changed(allow_unmap ? 0 : length);
  if (error) {
    tracked.reply_error(to_application_errno(error));
  } else if (tracked.begin_reply()) {
    tracked.trace_reply(0, std::size_t(length));  // the bytes zeroed count in the statistics
    fuse_reply_err(request, 0);
  }
}

asio::awaitable<void> FileSystem::serve_seek(fuse_req_t request, std::uint64_t offset, bool want_data,
                                             std::uint64_t unique) {
  Tracked tracked(*this, request, Operation::block_status, want_data ? "SEEK-DATA" : "SEEK-HOLE", offset, 0, unique);
  std::uint64_t found = 0;
  if (auto error = co_await io_.seek(offset, want_data, found, tracked.limits())) {
    // ENXIO is lseek's own answer ("no more data"), not an I/O failure.
    tracked.reply_error(error.value() == ENXIO ? ENXIO : to_application_errno(error));
    co_return;
  }
  if (tracked.begin_reply()) {
    tracked.trace_reply(0, 0);
    fuse_reply_lseek(request, off_t(found));
  }
}

asio::awaitable<void> FileSystem::count_allocation() {
  allocation_counting_ = true;
  allocation_stale_ = false;
  allocation_counted_at_ = std::chrono::steady_clock::now();
  written_before_count_began_ += std::exchange(written_since_count_began_, 0);
  allocated_bytes_ = co_await io_.allocated_bytes(allocation_scan_limit);
  written_before_count_began_ = 0;  // this count saw them
  allocation_counting_ = false;
  allocation_counted_ = true;
  go_live();
  if (draining_ && in_flight_count_ == 0) drained_.cancel();
}

// ---- FUSE handlers ----------------------------------------------------------

void FileSystem::init(fuse_conn_info* connection) {
  connection->max_write = largest_request;
  connection->max_read = session_.requested_max_read();  // libfuse wants the mount option's value
  // Room for a deep queue of asynchronous direct I/O (the kernel default is 12).
  connection->max_background = 256;
  connection->congestion_threshold = 192;
  if (connection->capable & FUSE_CAP_ATOMIC_O_TRUNC) connection->want |= FUSE_CAP_ATOMIC_O_TRUNC;
  connection->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  if (connection->capable & FUSE_CAP_ASYNC_DIO) connection->want |= FUSE_CAP_ASYNC_DIO;
  asio::co_spawn(executor_, count_allocation(), asio::detached);
  if (options_.request_timeout.count() > 0) asio::co_spawn(executor_, expire_old_requests(), asio::detached);
  live_deadline_.expires_after(live_wait_bound);
  live_deadline_.async_wait([this](std::error_code cancelled) {
    if (!cancelled) go_live();
  });
}

// Posted: the mount counts as live once libfuse has sent the INIT reply (it does
// after init() returns; the count and the deadline end later anyway).
void FileSystem::go_live() {
  live_deadline_.cancel();
  if (draining_) on_live = nullptr;  // stopping before it was live: no pidfile, no "1" to a --daemon parent
  if (on_live)
    asio::post(executor_, [this, live = std::exchange(on_live, nullptr)] {
      if (!draining_) live();
    });
}

// While st_blocks is a guess (before the first count: the whole export; after this
// mount's writes, until a count that saw them is in: an estimate) the kernel must
// not keep it; otherwise one second, as st_blocks follows other clients' writes.
// (Not stale and not counting implies no bytes written since the count: every write marks
// the allocation stale, and only the start of a count, which takes them over, clears it.)
double FileSystem::file_attribute_timeout() const {
  bool exact = allocation_counted_ && !allocation_stale_ && !allocation_counting_;
  return exact ? file_attribute_timeout_seconds : 0.0;
}

std::uint64_t FileSystem::allocation_estimate() const {
  std::uint64_t since = written_before_count_began_ + written_since_count_began_;
  return allocated_bytes_ + std::min(since, export_.size - std::min(allocated_bytes_, export_.size));
}

bool FileSystem::is_file(fuse_ino_t inode) const {
  return options_.file_name.empty() ? inode == root_inode : inode == file_inode_in_directory;
}

struct stat FileSystem::attributes_of(fuse_ino_t inode) const {
  struct stat attributes {};
  attributes.st_ino = inode;
  attributes.st_uid = owner_uid_;
  attributes.st_gid = owner_gid_;
  attributes.st_atim = attributes.st_mtim = attributes.st_ctim = mounted_at_;
  if (inode == stats_inode) {
    attributes.st_mode = S_IFREG | 0444;
    attributes.st_nlink = 1;
    attributes.st_size = 0;  // read until EOF: the snapshot's length is known only at open
    attributes.st_blksize = 4096;
  } else if (is_file(inode)) {
    attributes.st_mode = S_IFREG | (export_.read_only ? 0444 : 0644);
    attributes.st_nlink = 1;
    attributes.st_size = off_t(export_.size);
    attributes.st_blksize = blksize_t(std::max<std::uint64_t>(export_.preferred_block, preferred_io_size));
    attributes.st_blocks = blkcnt_t((allocation_estimate() + 511) / 512);
  } else {
    attributes.st_mode = S_IFDIR | (export_.read_only ? 0555 : 0755);
    attributes.st_nlink = 2;
    attributes.st_size = 0;
    attributes.st_blksize = 4096;
  }
  return attributes;
}

void FileSystem::lookup(fuse_req_t request, fuse_ino_t parent, const char* name) {
  bool directory_mode = !options_.file_name.empty() && parent == root_inode;
  bool is_stats = directory_mode && std::strcmp(name, stats_file_name) == 0;
  if (!directory_mode || (!is_stats && options_.file_name != name)) {
    fuse_reply_err(request, ENOENT);
    return;
  }
  fuse_entry_param entry{};
  entry.ino = is_stats ? stats_inode : file_inode_in_directory;
  entry.generation = 1;
  entry.attr = attributes_of(entry.ino);
  entry.attr_timeout = file_attribute_timeout();
  entry.entry_timeout = attribute_timeout_seconds;
  fuse_reply_entry(request, &entry);
}

bool FileSystem::exists(fuse_ino_t inode) const {
  return inode == root_inode || is_file(inode) || (inode == stats_inode && !options_.file_name.empty());
}

void FileSystem::getattr(fuse_req_t request, fuse_ino_t inode) {
  if (!exists(inode)) {
    fuse_reply_err(request, ENOENT);
    return;
  }
  if (is_file(inode) && !allocation_counting_ && !draining_ &&
      (allocation_stale_ || std::chrono::steady_clock::now() - allocation_counted_at_ >= allocation_recount_period))
    asio::co_spawn(executor_, count_allocation(), asio::detached);
  struct stat attributes = attributes_of(inode);
  fuse_reply_attr(request, &attributes,
                  is_file(inode) ? file_attribute_timeout() : attribute_timeout_seconds);
}

void FileSystem::setattr(fuse_req_t request, fuse_ino_t inode, const struct stat& wanted, int to_set,
                         const fuse_file_info* file) {
  if (!exists(inode)) {
    fuse_reply_err(request, ENOENT);
    return;
  }
  // The export has a fixed size, mode and ownership. Setting them to what they are,
  // and any timestamps (left stable), is accepted so that `touch` and `cp -p` work.
  struct stat attributes = attributes_of(inode);
  // A descriptor opened with O_TRUNC (ignored) takes the file for as long as it has
  // written: cp of a sparse image that ends in a hole sets the size it expects with
  // ftruncate. Within the export that changes nothing, and is not refused.
  bool truncating = file && is_export_handle(file) && (file->fh & truncating_handle) &&
                    wanted.st_size >= 0 && std::uint64_t(wanted.st_size) <= export_.size;
  if ((to_set & FUSE_SET_ATTR_SIZE) && (!is_file(inode) || std::uint64_t(wanted.st_size) != export_.size) &&
      !truncating) {
    fuse_reply_err(request, is_file(inode) ? EINVAL : inode == stats_inode ? EPERM : EISDIR);
    return;
  }
  if (((to_set & FUSE_SET_ATTR_MODE) && (wanted.st_mode & 07777) != (attributes.st_mode & 07777)) ||
      ((to_set & FUSE_SET_ATTR_UID) && wanted.st_uid != attributes.st_uid) ||
      ((to_set & FUSE_SET_ATTR_GID) && wanted.st_gid != attributes.st_gid)) {
    fuse_reply_err(request, EPERM);
    return;
  }
  fuse_reply_attr(request, &attributes, is_file(inode) ? file_attribute_timeout() : attribute_timeout_seconds);
}

void FileSystem::open(fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) {
  if (inode == stats_inode && exists(inode)) {
    if ((file->flags & O_ACCMODE) != O_RDONLY) {
      fuse_reply_err(request, EACCES);
      return;
    }
    file->fh = next_stats_handle_++;
    stats_snapshots_.emplace(file->fh, statistics_->to_json() + "\n");
    file->direct_io = 1;
    session_.reply_open(request, file, 0);
    return;
  }
  if (!is_file(inode)) {
    fuse_reply_err(request, inode == root_inode ? EISDIR : ENOENT);
    return;
  }
  // Root passes the kernel's permission check, so refuse writers here too.
  if ((file->flags & O_ACCMODE) != O_RDONLY && export_.read_only) {
    fuse_reply_err(request, EROFS);
    return;
  }
  // O_TRUNC is ignored, as for a block device: the export cannot shrink.
  const bool writable = (file->flags & O_ACCMODE) != O_RDONLY;
  file->fh = export_handle | next_export_handle_++ | (writable ? writable_handle : 0) |
             (writable && (file->flags & O_TRUNC) ? truncating_handle : 0);
  // A loss no open file was told of yet is told to this one too (as Linux does).
  unknown_writes_told_[file->fh] = std::min(unknown_writes_reported_, io_.unknown_writes_events());
  file->direct_io = options_.cache == CacheMode::none;
  file->keep_cache = 0;  // page mode: drop cached pages at each open, as other clients may write
  // Direct writes need not take the inode lock exclusively: NBD orders nothing
  // between overlapping writes in flight anyway, and the kernel lock would
  // serialise a deep queue of writes.
  session_.reply_open(request, file, file->direct_io ? FOPEN_PARALLEL_DIRECT_WRITES : 0);
}

void FileSystem::read(fuse_req_t request, std::size_t size, off_t offset, const fuse_file_info* file) {
  if (auto snapshot = is_export_handle(file) ? stats_snapshots_.end() : stats_snapshots_.find(file->fh);
      snapshot != stats_snapshots_.end()) {
    const std::string& text = snapshot->second;
    std::size_t start = std::min<std::size_t>(std::size_t(offset), text.size());
    fuse_reply_buf(request, text.data() + start, std::min(size, text.size() - start));
    return;
  }
  std::size_t length = clamp_read(export_.size, std::uint64_t(offset), size);
  if (length == 0) {
    fuse_reply_buf(request, nullptr, 0);
    return;
  }
  Job job{Operation::read, request, length, std::uint64_t(offset)};
  job.unique = session_.current_unique();
  job.handle = file->fh;
  // The kernel's readahead does this in page mode; O_DIRECT asks for none.
  job.read_ahead = options_.read_ahead && options_.cache == CacheMode::none && !(file->flags & O_DIRECT) &&
                   read_ahead_.wants(length);
  hand_over(std::move(job));
}

void FileSystem::write(fuse_req_t request, const char* data, std::size_t size, off_t offset,
                       const fuse_file_info* file) {
  if (export_.read_only) {
    fuse_reply_err(request, EROFS);
    return;
  }
  WritePlan plan = plan_write(export_.size, std::uint64_t(offset), size);
  if (plan.error || plan.length == 0) {
    if (plan.error) fuse_reply_err(request, plan.error);
    else fuse_reply_write(request, 0);
    return;
  }
  hand_over(Job{Operation::write, request, plan.length, std::uint64_t(offset), session_.claim_request_buffer(),
                reinterpret_cast<const std::byte*>(data), (file->flags & O_DSYNC) != 0});
}

void FileSystem::flush(fuse_req_t request, const fuse_file_info* file) {
  // FLUSH comes with every close(); a reader's close has nothing to make durable.
  if (!(file->fh & writable_handle) || !export_.can_flush) {
    fuse_reply_err(request, 0);
    return;
  }
  asio::co_spawn(executor_, serve_flush(request, /*fsync=*/false, file->fh), asio::detached);
}

void FileSystem::fsync(fuse_req_t request, bool, const fuse_file_info* file) {
  if (!export_.can_flush || export_.read_only || !is_export_handle(file)) {  // .stats: nothing to flush
    fuse_reply_err(request, 0);
    return;
  }
  asio::co_spawn(executor_, serve_flush(request, /*fsync=*/true, file->fh), asio::detached);
}

void FileSystem::fallocate(fuse_req_t request, int mode, off_t offset, off_t length) {
  if (offset < 0 || length <= 0) {
    fuse_reply_err(request, EINVAL);
    return;
  }
  const std::uint64_t begin = std::uint64_t(offset);
  const std::uint64_t end = begin + std::uint64_t(length);
  const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
  const int kind = mode & ~FALLOC_FL_KEEP_SIZE;
  if (kind == 0) {
    // Preallocation: every byte inside the export already exists on the server. Past
    // the end it would grow the file: ENOSPC, as for a write there. Not EOPNOTSUPP,
    // which makes glibc's posix_fallocate emulate it by writing into every block.
    fuse_reply_err(request, keep_size || end <= export_.size ? 0 : ENOSPC);
    return;
  }
  if (kind != FALLOC_FL_PUNCH_HOLE && kind != FALLOC_FL_ZERO_RANGE) {
    fuse_reply_err(request, EOPNOTSUPP);
    return;
  }
  if (kind == FALLOC_FL_PUNCH_HOLE && !keep_size) {
    fuse_reply_err(request, EOPNOTSUPP);  // the kernel's rule: punching needs KEEP_SIZE
    return;
  }
  if (export_.read_only) {
    fuse_reply_err(request, EROFS);
    return;
  }
  if (!keep_size && end > export_.size) {
    fuse_reply_err(request, ENOSPC);  // zeroing past EOF would grow the file
    return;
  }
  if (begin >= export_.size) {
    fuse_reply_err(request, 0);
    return;
  }
  asio::co_spawn(executor_,
                 serve_zero(request, begin, std::min(end, export_.size) - begin, kind == FALLOC_FL_PUNCH_HOLE),
                 asio::detached);
}

void FileSystem::lseek(fuse_req_t request, off_t offset, int whence, const fuse_file_info* file) {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    fuse_reply_err(request, EINVAL);  // the kernel handles SEEK_SET/CUR/END itself
    return;
  }
  // .stats says st_size 0: every offset is at or past its end.
  if (offset < 0 || !is_export_handle(file)) {
    fuse_reply_err(request, ENXIO);
    return;
  }
  asio::co_spawn(executor_, serve_seek(request, std::uint64_t(offset), whence == SEEK_DATA, session_.current_unique()),
                 asio::detached);
}

void FileSystem::release(fuse_req_t request, fuse_ino_t, const fuse_file_info* file) {
  stats_snapshots_.erase(file->fh);
  unknown_writes_told_.erase(file->fh);
  read_ahead_.forget(file->fh);
  fuse_reply_err(request, 0);
}

void FileSystem::opendir(fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) {
  if (inode != root_inode || options_.file_name.empty()) {
    fuse_reply_err(request, ENOTDIR);
    return;
  }
  fuse_reply_open(request, file);
}

void FileSystem::readdir(fuse_req_t request, fuse_ino_t inode, std::size_t size, off_t offset) {
  if (inode != root_inode || options_.file_name.empty()) {
    fuse_reply_err(request, ENOTDIR);
    return;
  }
  struct Entry {
    const char* name;
    fuse_ino_t inode;
    mode_t mode;
  };
  const Entry entries[] = {{".", root_inode, S_IFDIR},
                           {"..", root_inode, S_IFDIR},
                           {options_.file_name.c_str(), file_inode_in_directory, S_IFREG}};
  // .stats is reachable by name but not listed: `ls -a` shows only the export.
  char buffer[1024];
  std::size_t used = 0;
  std::size_t limit = std::min(size, sizeof buffer);
  for (off_t index = offset; index < off_t(std::size(entries)); ++index) {
    struct stat attributes {};
    attributes.st_ino = entries[index].inode;
    attributes.st_mode = entries[index].mode;
    std::size_t needed = fuse_add_direntry(request, buffer + used, limit - used, entries[index].name, &attributes,
                                           index + 1);
    if (needed > limit - used) break;
    used += needed;
  }
  fuse_reply_buf(request, buffer, used);
}

void FileSystem::statfs(fuse_req_t request) {
  struct statvfs totals {};
  const std::uint64_t block = std::max<std::uint64_t>(export_.preferred_block, 512);
  totals.f_bsize = block;
  totals.f_frsize = block;
  totals.f_blocks = (export_.size + block - 1) / block;
  totals.f_bfree = 0;  // every byte of the export belongs to the one file
  totals.f_bavail = 0;
  totals.f_files = options_.file_name.empty() ? 1 : 2;
  totals.f_ffree = 0;
  totals.f_favail = 0;
  totals.f_namemax = 255;
  totals.f_flag = export_.read_only ? ST_RDONLY : 0;
  fuse_reply_statfs(request, &totals);
}

}  // namespace bridge
