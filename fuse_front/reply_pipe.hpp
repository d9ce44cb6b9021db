// Pipes that carry a READ reply to /dev/fuse with splice(): the reply's header is
// written first, then the NBD socket's pages are moved in behind it, and one
// splice() hands both to the kernel, which copies the payload straight into the
// reader's pages. The pool is the loop thread's; a pipe taken from it belongs to
// one request (and, while it sends, the reply thread) until it is given back.
#pragma once

#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 34
#endif

#include <fuse_lowlevel.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace fuse_front {

class ReplyPipe {
 public:
  ReplyPipe(int read_end, int write_end, std::size_t capacity)
      : read_end_(read_end), write_end_(write_end), capacity_(capacity) {}
  ~ReplyPipe();
  ReplyPipe(const ReplyPipe&) = delete;
  ReplyPipe& operator=(const ReplyPipe&) = delete;

  // Where the payload goes: the NBD side splices into this.
  int write_end() const { return write_end_; }
  int read_end() const { return read_end_; }  // what send() splices from

  // Sends the reply held (header and `length` payload bytes) to the request it
  // was started for. On failure the request is answered with EIO instead, so
  // the reader never waits for a reply that will not come.
  void send(fuse_req_t request, int device, std::size_t length);
  // Moves the first `count` payload bytes back into buffer, emptying the pipe:
  // the reply goes the ordinary way. false: the pipe failed (it is discarded when
  // given back) and the payload must be read again.
  bool take_back(std::byte* buffer, std::size_t count);

 private:
  friend class ReplyPipes;
  bool drain();

  int read_end_;
  int write_end_;
  std::size_t capacity_;  // bytes, as F_GETPIPE_SZ counts them (pages, really)
  // Holds bytes that are not yet sent or taken back: drained before reuse.
  bool holding_ = false;
  bool broken_ = false;
};

class ReplyPipes {
 public:
  // A pipe holding the header of a successful READ reply to `unique` with
  // `length` payload bytes, or nullptr (none can be made, too many in use, or
  // piping is paused).
  ReplyPipe* start_reply(std::uint64_t unique, std::size_t length);
  // Empties the pipe if it still holds a reply (a request answered otherwise).
  // `whole`: the reply went by pipe; false: it fell back to a copy (out of
  // order, a full pipe), which costs more than not piping at all.
  void give_back(ReplyPipe* pipe, bool whole = true);
  std::size_t in_use() const { return in_use_; }

  // When fallbacks become common (a server that answers in chunks out of order
  // or with holes, socket pages too fragmented for a pipe), piping pauses for a
  // while and then tries again: at most outcome_window fallbacks in vain per pause.
  static constexpr unsigned outcome_window = 64;
  static constexpr unsigned fallbacks_to_pause = 8;
  static constexpr unsigned paused_replies = 4096;
  bool paused() const { return paused_for_ > 0; }

 private:
  std::unique_ptr<ReplyPipe> make_pipe();
  void note_outcome(bool whole);

  std::vector<std::unique_ptr<ReplyPipe>> free_;
  std::size_t in_use_ = 0;
  unsigned outcomes_ = 0;    // in the current window
  unsigned fallbacks_ = 0;   // of those
  unsigned paused_for_ = 0;  // start_reply calls still to refuse
};

}  // namespace fuse_front
