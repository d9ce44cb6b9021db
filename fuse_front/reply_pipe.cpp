// Reply pipes for spliced READ replies; see reply_pipe.hpp.
#include "fuse_front/reply_pipe.hpp"

#include <linux/fuse.h>

#include <cerrno>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

namespace fuse_front {

namespace {

// Enough for 1 MiB reads at the depths that move much data (8-16), with room.
constexpr std::size_t kept_pipes = 32;
// Room to spare for a 1 MiB reply; granted only with CAP_SYS_RESOURCE.
constexpr int wanted_pipe_size = 2 << 20;

bool read_exactly(int fd, std::byte* buffer, std::size_t count) {
  while (count) {
    ssize_t got = ::read(fd, buffer, count);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;  // the bytes were there: anything else is a broken pipe
    buffer += got;
    count -= std::size_t(got);
  }
  return true;
}

}  // namespace

ReplyPipe::~ReplyPipe() {
  ::close(read_end_);
  ::close(write_end_);
}

void ReplyPipe::send(fuse_req_t request, int device, std::size_t length) {
  std::size_t total = sizeof(fuse_out_header) + length;
  ssize_t sent = ::splice(read_end_, nullptr, device, nullptr, total, 0);
  if (sent == ssize_t(total)) {
    holding_ = false;
    fuse_reply_none(request);  // answered: libfuse only frees the request
    return;
  }
  // The kernel refused it (an interrupted or aborted request): whatever is left
  // is drained when the pipe is given back.
  fuse_reply_err(request, EIO);
}

bool ReplyPipe::take_back(std::byte* buffer, std::size_t count) {
  fuse_out_header header;
  if (!read_exactly(read_end_, reinterpret_cast<std::byte*>(&header), sizeof header) ||
      !read_exactly(read_end_, buffer, count)) {
    broken_ = true;
    return false;
  }
  holding_ = false;
  return true;
}

bool ReplyPipe::drain() {
  std::byte scrap[16 * 1024];
  for (;;) {
    int waiting = 0;
    if (ioctl(read_end_, FIONREAD, &waiting) != 0) return false;
    if (waiting == 0) break;
    ssize_t got = ::read(read_end_, scrap, std::min<std::size_t>(sizeof scrap, std::size_t(waiting)));
    if (got <= 0 && errno != EINTR) return false;
  }
  holding_ = false;
  return true;
}

// A pipe's capacity counts pages whatever they hold. The socket's pages arrive
// 32 KiB at a time, so a 1 MiB pipe (the unprivileged limit, pipe-max-size)
// holds a 1 MiB payload and its header; more is asked for where allowed. A user
// past pipe-user-pages-soft gets small pipes, which then carry small replies only.
std::unique_ptr<ReplyPipe> ReplyPipes::make_pipe() {
  int ends[2];
  if (pipe2(ends, O_NONBLOCK | O_CLOEXEC) != 0) return nullptr;
  if (fcntl(ends[1], F_SETPIPE_SZ, wanted_pipe_size) < 0) fcntl(ends[1], F_SETPIPE_SZ, 1 << 20);
  int size = fcntl(ends[1], F_GETPIPE_SZ);
  return std::make_unique<ReplyPipe>(ends[0], ends[1], size > 0 ? std::size_t(size) : 0);
}

ReplyPipe* ReplyPipes::start_reply(std::uint64_t unique, std::size_t length) {
  if (paused_for_ > 0) {
    --paused_for_;
    return nullptr;
  }
  std::unique_ptr<ReplyPipe> pipe;
  if (!free_.empty()) {
    pipe = std::move(free_.back());
    free_.pop_back();
  } else if (in_use_ < kept_pipes) {
    pipe = make_pipe();
  }
  if (!pipe) return nullptr;
  fuse_out_header header{};
  header.len = std::uint32_t(sizeof header + length);
  header.error = 0;
  header.unique = unique;
  if (length > pipe->capacity_ ||
      ::write(pipe->write_end_, &header, sizeof header) != ssize_t(sizeof header)) {
    if (pipe->drain()) free_.push_back(std::move(pipe));
    return nullptr;
  }
  pipe->holding_ = true;
  ++in_use_;
  return pipe.release();
}

void ReplyPipes::note_outcome(bool whole) {
  fallbacks_ += !whole;
  if (fallbacks_ >= fallbacks_to_pause) paused_for_ = paused_replies;
  if (++outcomes_ == outcome_window || paused_for_) outcomes_ = fallbacks_ = 0;
}

void ReplyPipes::give_back(ReplyPipe* pipe, bool whole) {
  std::unique_ptr<ReplyPipe> owned(pipe);
  --in_use_;
  note_outcome(whole);
  if (owned->holding_ && !owned->drain()) owned->broken_ = true;
  if (!owned->broken_ && free_.size() < kept_pipes) free_.push_back(std::move(owned));
}

}  // namespace fuse_front
