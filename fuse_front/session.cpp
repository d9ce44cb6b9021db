// libfuse session driven by Asio. See session.hpp for the buffer-ownership rule.
#include "fuse_front/session.hpp"

#include <asio/io_context.hpp>
#include <asio/post.hpp>

#include <linux/fuse.h>
#include <sys/uio.h>

#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#include <string_view>
#include <utility>

namespace fuse_front {

namespace {

// libfuse reads up to its bufsize: 256 pages of payload plus one page of header.
constexpr std::size_t receive_buffer_size = (256 + 1) * 4096;
constexpr std::size_t kept_buffers = 256;
// Bounded so one busy /dev/fuse cannot starve the NBD side of the loop.
constexpr int requests_per_wakeup = 64;

// INIT flag bit 36 (Linux 6.6, protocol 7.39; this system's linux/fuse.h is
// older): shared mmap of a FOPEN_DIRECT_IO file. It travels in flags2, which the
// kernel reads only when the reply's flags carry FUSE_INIT_EXT.
constexpr std::uint32_t init_flags2_direct_io_allow_mmap = 1u << (36 - 32);

// A receive buffer's first bytes (header and small payloads) lie on ordinary
// pages, the rest on a 2 MiB region advised for transparent huge pages. A large
// WRITE's payload is then copied in by /dev/fuse and out by send() through one
// page-table entry, and /dev/fuse pins one folio instead of 256 (gup_fast and
// unpin were 12% of the loop's samples in 1 MiB writes); a 4 KiB WRITE touches
// only the ordinary pages, so depth-64 small requests cost no huge pages.
constexpr std::size_t huge_page = std::size_t(2) << 20;
constexpr std::size_t small_head = 16 * 1024;
constexpr std::size_t receive_slot_size = small_head + huge_page;
// Free buffers kept with their huge page resident: enough for 1 MiB writes at
// depth 8-16 to reuse warm ones; beyond that the page goes back to the kernel.
constexpr std::size_t kept_resident_buffers = 16;
static_assert(receive_buffer_size <= receive_slot_size);

std::byte* map_receive_slot() {
  // Over-map by a huge page so that an aligned one fits, then trim both ends.
  const std::size_t mapped = receive_slot_size + huge_page;
  void* memory = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) throw std::bad_alloc();
  auto base = reinterpret_cast<std::uintptr_t>(memory);
  std::uintptr_t aligned = (base + small_head + huge_page - 1) & ~(huge_page - 1);
  std::uintptr_t start = aligned - small_head;
  if (start > base) munmap(memory, start - base);
  std::uintptr_t end = start + receive_slot_size;
  if (end < base + mapped) munmap(reinterpret_cast<void*>(end), base + mapped - end);
  // Advice only: without THP the slot is ordinary memory.
  madvise(reinterpret_cast<void*>(aligned), huge_page, MADV_HUGEPAGE);
  return reinterpret_cast<std::byte*>(start);
}

void unmap_receive_slot(std::byte* buffer) { munmap(buffer, receive_slot_size); }

void release_payload_region(std::byte* buffer) { madvise(buffer + small_head, huge_page, MADV_DONTNEED); }

Session* patching_session = nullptr;

}  // namespace

RequestBuffer::RequestBuffer(RequestBuffer&& other) noexcept
    : session_(std::exchange(other.session_, nullptr)),
      data_(std::exchange(other.data_, nullptr)),
      payload_resident_(std::exchange(other.payload_resident_, false)),
      retire_(std::exchange(other.retire_, false)) {}

RequestBuffer& RequestBuffer::operator=(RequestBuffer&& other) noexcept {
  if (this != &other) {
    release();
    session_ = std::exchange(other.session_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    payload_resident_ = std::exchange(other.payload_resident_, false);
    retire_ = std::exchange(other.retire_, false);
  }
  return *this;
}

RequestBuffer::~RequestBuffer() { release(); }

void RequestBuffer::release() {
  if (!data_) return;
  // Unmapping leaves pages that others still reference alive, with their bytes
  // as they are, for those others alone.
  if (retire_) unmap_receive_slot(data_);
  else session_->give_back(data_, payload_resident_);
  data_ = nullptr;
}

Session::Session(asio::any_io_executor executor, const fuse_lowlevel_ops& operations, void* user_data)
    : descriptor_(executor), operations_(operations), user_data_(user_data) {}

Session::~Session() {
  if (patching_session == this) patching_session = nullptr;
  stop_receiving();
  unmount();
  if (descriptor_.is_open()) descriptor_.release();  // libfuse owns and closes the fd
  if (session_) fuse_session_destroy(session_);
  for (std::byte* buffer : free_buffers_) unmap_receive_slot(buffer);
  for (std::byte* buffer : free_resident_buffers_) unmap_receive_slot(buffer);
}

namespace {

// libfuse and fusermount3 report mount failures on stderr in several lines; we
// catch them so the user gets one line from us that includes their reason.
class StderrCapture {
 public:
  StderrCapture() {
    std::fflush(stderr);
    capture_ = memfd_create("nbdbridge-stderr", MFD_CLOEXEC);
    saved_ = dup(STDERR_FILENO);
    if (capture_ >= 0 && saved_ >= 0) dup2(capture_, STDERR_FILENO);
  }
  ~StderrCapture() { restore(); }
  // Restores stderr and returns what was written, folded onto one line.
  std::string finish() {
    restore();
    std::string text;
    if (capture_ < 0) return text;
    char chunk[512];
    lseek(capture_, 0, SEEK_SET);
    for (ssize_t got; (got = read(capture_, chunk, sizeof chunk)) > 0;) text.append(chunk, std::size_t(got));
    close(capture_);
    capture_ = -1;
    for (char& c : text)
      if (c == '\n') c = ' ';
    while (!text.empty() && text.back() == ' ') text.pop_back();
    return text;
  }

 private:
  void restore() {
    if (saved_ >= 0) {
      std::fflush(stderr);
      dup2(saved_, STDERR_FILENO);
      close(saved_);
      saved_ = -1;
    }
  }
  int capture_ = -1;
  int saved_ = -1;
};

}  // namespace

std::error_code Session::mount(const std::string& mountpoint, const std::vector<std::string>& mount_options,
                               std::string& error_message) {
  std::string joined;
  for (const auto& option : mount_options) joined += (joined.empty() ? "" : ",") + option;
  std::vector<std::string> words{"nbdbridge", "-o", joined};
  std::vector<char*> argv;
  for (auto& word : words) argv.push_back(word.data());
  fuse_args args = FUSE_ARGS_INIT(int(argv.size()), argv.data());

  for (const auto& option : mount_options) {
    constexpr std::string_view key = "max_read=";
    if (!std::string_view(option).starts_with(key)) continue;
    unsigned value = 0;
    auto [end, error] = std::from_chars(option.data() + key.size(), option.data() + option.size(), value);
    if (error == std::errc{} && end == option.data() + option.size()) requested_max_read_ = value;
  }

  StderrCapture capture;
  session_ = fuse_session_new(&args, &operations_, sizeof operations_, user_data_);
  fuse_opt_free_args(&args);  // libfuse may have copied argv into it
  if (!session_) {
    // libfuse names the option it refused; the options we add ourselves would only confuse.
    error_message = "invalid mount option: " + capture.finish();
    return std::make_error_code(std::errc::invalid_argument);
  }
  // fusermount3 runs in our process group until it has passed the /dev/fuse fd back:
  // a Ctrl-C killing it after its mount(2) would leave a dead mount. It inherits the
  // mask; ours comes back after, and Asio then takes a signal that came meanwhile.
  sigset_t stop_signals, previous;
  sigemptyset(&stop_signals);
  for (int signal_number : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&stop_signals, signal_number);
  pthread_sigmask(SIG_BLOCK, &stop_signals, &previous);
  const int mounted = fuse_session_mount(session_, mountpoint.c_str());
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (mounted != 0) {
    error_message = "cannot mount on " + mountpoint + ": " + capture.finish();
    return std::make_error_code(std::errc::operation_not_permitted);
  }
  capture.finish();
  mounted_ = true;
  int fd = fuse_session_fd(session_);
  // Our own read/writev for /dev/fuse, only so that a reply can carry flags
  // that libfuse 3.14 has no field for (FOPEN_PARALLEL_DIRECT_WRITES).
  fuse_custom_io io{};
  io.read = [](int fd, void* buffer, std::size_t length, void*) { return ::read(fd, buffer, length); };
  // libfuse hands these hooks the filesystem's user data, not ours: the one
  // mounted session of the process is found through patching_session.
  patching_session = this;
  io.writev = [](int fd, struct iovec* parts, int count, void*) {
    if (patching_session) patching_session->patch_reply(parts, count);
    return ::writev(fd, parts, count);
  };
  if (int failed = fuse_session_custom_io(session_, &io, fd); failed != 0) {
    error_message = "cannot set up FUSE I/O: " + std::string(std::strerror(-failed));
    return {-failed, std::generic_category()};
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  descriptor_.assign(fd);
  buffer_size_ = receive_buffer_size;
  return {};
}

void Session::start(std::function<void()> on_ended) {
  on_ended_ = std::move(on_ended);
  receiving_ = true;
  wait_readable();
}

void Session::wait_readable() {
  if (!receiving_) return;
  descriptor_.async_wait(asio::posix::descriptor_base::wait_read, [this](std::error_code error) {
    if (error) return;
    receive();
  });
}

// Reads until /dev/fuse is empty: Asio's epoll registration is edge-triggered,
// so stopping early and waiting could sleep on requests already queued.
void Session::receive() {
  for (int handled = 0; receiving_; ++handled) {
    if (handled == requests_per_wakeup) {
      // Let NBD replies in, then carry on where we stopped.
      asio::post(descriptor_.get_executor(), [this] { receive(); });
      return;
    }
    bool resident = false;
    std::byte* buffer = take_buffer(resident);
    fuse_buf request{};
    request.mem = buffer;
    request.size = buffer_size_;
    int result = fuse_session_receive_buf(session_, &request);
    if (result == -EINTR) {
      give_back(buffer, resident);
      continue;
    }
    if (result == -EAGAIN) {
      give_back(buffer, resident);
      break;
    }
    if (result <= 0) {
      // 0: unmounted (ENODEV); other errors leave nothing to serve either.
      give_back(buffer, resident);
      receiving_ = false;
      mounted_ = false;  // the kernel has already let go of the mount
      if (on_ended_) std::exchange(on_ended_, nullptr)();
      return;
    }
    if (handled == 0) note_activity();
    const auto* header = reinterpret_cast<const fuse_in_header*>(buffer);
    if (header->opcode == FUSE_INTERRUPT) {
      // No reply is due; libfuse would only mark the request, which we never ask about.
      if (on_interrupt_ && std::size_t(result) >= sizeof(fuse_in_header) + sizeof(fuse_interrupt_in))
        on_interrupt_(reinterpret_cast<const fuse_interrupt_in*>(header + 1)->unique);
      give_back(buffer, resident);
      continue;
    }
    current_buffer_ = buffer;
    current_resident_ = resident || std::size_t(result) > small_head;
    current_unique_ = header->unique;
    if (header->opcode == FUSE_INIT) {
      note_init_request(buffer, std::size_t(result));
      // libfuse says on stderr why it refuses an INIT, and ends the session.
      StderrCapture capture;
      fuse_session_process_buf(session_, &request);
      std::string said = capture.finish();
      if (fuse_session_exited(session_)) {
        init_refused_ = true;
        init_failure_ = said.empty() ? "libfuse refused the kernel's INIT" : said;
      }
    } else {
      fuse_session_process_buf(session_, &request);
    }
    if (current_buffer_) give_back(std::exchange(current_buffer_, nullptr), current_resident_);
  }
  wait_readable();
}

void Session::start_spinning() {
  spinning_ = true;
  activity_seen_ = activity_;
  idle_since_known_ = false;
  post_spin();
}

// The clock is read only on laps that saw no new work: a busy loop (depth 64)
// laps often and needs none.
void Session::spin() {
  if (!receiving_) {
    spinning_ = false;
    return;
  }
  if (activity_ != activity_seen_) {
    activity_seen_ = activity_;
    idle_since_known_ = false;
  } else if (!idle_since_known_) {
    idle_since_ = std::chrono::steady_clock::now();
    idle_since_known_ = true;
  } else if (std::chrono::steady_clock::now() - idle_since_ >= std::max(busy_poll_budget_, expected_within_)) {
    spinning_ = false;  // the next activity starts it again
    expected_within_ = {};
    return;
  }
  post_spin();
}

void Session::post_spin() {
  auto spin_again = [this] { spin(); };
  // io_context's own executor: through any_io_executor the handler is wrapped once more.
  auto executor = descriptor_.get_executor();
  if (auto* context_executor = executor.target<asio::io_context::executor_type>())
    asio::post(*context_executor, spin_again);
  else
    asio::post(executor, spin_again);
}

void Session::reply_open(fuse_req_t request, const fuse_file_info* file, std::uint32_t extra_open_flags) {
  extra_open_flags_ = extra_open_flags;
  fuse_reply_open(request, file);
  extra_open_flags_ = 0;
}

// The kernel offers shared mmap of direct-I/O files in its INIT request; libfuse
// 3.14 knows nothing of it, so the INIT reply is patched (patch_reply).
void Session::note_init_request(const std::byte* buffer, std::size_t length) {
  // Only the fields up to flags2 are read: older kernels send a shorter request.
  constexpr std::size_t needed = offsetof(fuse_init_in, flags2) + sizeof(fuse_init_in::flags2);
  if (length < sizeof(fuse_in_header) + needed) return;
  fuse_init_in init{};
  std::memcpy(&init, buffer + sizeof(fuse_in_header), needed);
  bool offered = (init.flags & FUSE_INIT_EXT) && (init.flags2 & init_flags2_direct_io_allow_mmap);
  if (offered) mmap_init_unique_.store(reinterpret_cast<const fuse_in_header*>(buffer)->unique);
}

// Runs inside fuse_reply_* on the loop thread, or on the reply worker's: only the
// OPEN reply sent by reply_open() has extra_open_flags_ set, and only the INIT
// reply carries the INIT request's id.
void Session::patch_reply(struct iovec* parts, int count) {
  if (count < 2 || parts[0].iov_len != sizeof(fuse_out_header)) return;
  auto* header = static_cast<fuse_out_header*>(parts[0].iov_base);
  if (header->error != 0) return;
  std::uint32_t extra_open_flags = extra_open_flags_.load(std::memory_order_relaxed);
  if (extra_open_flags != 0 && parts[1].iov_len == sizeof(fuse_open_out))
    static_cast<fuse_open_out*>(parts[1].iov_base)->open_flags |= extra_open_flags;
  std::uint64_t mmap_init_unique = mmap_init_unique_.load(std::memory_order_relaxed);
  if (mmap_init_unique != 0 && header->unique == mmap_init_unique &&
      parts[1].iov_len >= offsetof(fuse_init_out, flags2) + sizeof(std::uint32_t)) {
    auto* init = static_cast<fuse_init_out*>(parts[1].iov_base);
    init->flags |= FUSE_INIT_EXT;
    init->flags2 |= init_flags2_direct_io_allow_mmap;
    mmap_init_unique_.store(0);
  }
}

RequestBuffer Session::claim_request_buffer() {
  return RequestBuffer(this, std::exchange(current_buffer_, nullptr), current_resident_);
}

// Warm buffers first: a large WRITE then lands on a huge page already mapped.
std::byte* Session::take_buffer(bool& payload_resident) {
  for (auto* list : {&free_resident_buffers_, &free_buffers_}) {
    if (list->empty()) continue;
    payload_resident = list == &free_resident_buffers_;
    std::byte* buffer = list->back();
    list->pop_back();
    return buffer;
  }
  payload_resident = false;
  return map_receive_slot();
}

void Session::give_back(std::byte* buffer, bool payload_resident) {
  if (payload_resident) {
    if (free_resident_buffers_.size() < kept_resident_buffers) {
      free_resident_buffers_.push_back(buffer);
      return;
    }
    release_payload_region(buffer);
  }
  if (free_buffers_.size() < kept_buffers) {
    free_buffers_.push_back(buffer);
  } else {
    unmap_receive_slot(buffer);
  }
}

void Session::release_idle_buffers() {
  constexpr std::size_t kept_when_idle = 8;
  for (std::byte* buffer : free_resident_buffers_) {
    release_payload_region(buffer);
    free_buffers_.push_back(buffer);
  }
  free_resident_buffers_.clear();
  while (free_buffers_.size() > kept_when_idle) {
    unmap_receive_slot(free_buffers_.back());
    free_buffers_.pop_back();
  }
}

void Session::stop_receiving() {
  receiving_ = false;
  if (descriptor_.is_open()) descriptor_.cancel();
}

// Also after the kernel let go (fusermount3 -u): libfuse then only closes the fd.
void Session::unmount() {
  reply_worker_.stop();  // no reply may be in writev once the fd is closed
  if (!session_ || unmounted_) return;
  // fuse_session_unmount closes the fd: take it out of the reactor first.
  if (descriptor_.is_open()) descriptor_.release();
  fuse_session_unmount(session_);
  unmounted_ = true;
  mounted_ = false;
}

}  // namespace fuse_front
