// Read-ahead for small sequential buffered reads under --cache=none: which open files
// read sequentially, which windows of the export to fetch ahead of them, and whether
// a READ can be answered from one. Bookkeeping only (FileSystem does the I/O); loop
// thread only. A fetch's buffer belongs to its fetch until fetched() takes it.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>

#include "bridge/geometry.hpp"

namespace bridge {

struct ReadAheadLimits {
  // READs longer than this are not read ahead: they go to the server as they come
  // (spliced, say), which is already as fast as a window would be.
  std::size_t largest_read = 128 * 1024;
  std::size_t window = 1024 * 1024;
  // Sequential READs of one open file before its windows start: `file`, `blkid`
  // and the like read a few blocks and stop.
  unsigned sequential_before_fetching = 2;
  // A window is used only this long after its fetch was sent: data read ahead is at
  // most this old, where the page cache would keep it until the next open.
  std::chrono::milliseconds freshness{100};
  // A reader whose READs come at most this far apart (computing a checksum of each:
  // md5sum ~60 us per 32 KiB here, sha256sum ~130 us) is worth polling for after an
  // answer: waking the loop costs more. A slower one (gzip, ~1 ms) is not.
  std::chrono::microseconds pollable_gap{250};
};

// Buffer: movable, with data(); a pool lease in the bridge, a vector in tests.
template <class Buffer>
class ReadAhead {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::size_t stream_count = 4;  // open files read ahead at once
  static constexpr std::size_t windows_per_stream = 2;

  struct Fetch {
    std::size_t stream = 0;
    std::size_t slot = 0;
    std::uint64_t id = 0;  // fetched() ignores a fetch whose window was given up since
    std::uint64_t offset = 0;
    std::size_t length = 0;
  };

  explicit ReadAhead(ReadAheadLimits limits = {}) : limits_(limits) {}

  // Windows start on the server's minimum block (a power of two), so that no fetch
  // needs a read-modify-write's bounce buffer.
  void set_export(std::uint64_t size, std::uint64_t minimum_block) {
    export_size_ = size;
    alignment_ = std::max<std::uint64_t>(4096, minimum_block);
  }
  const ReadAheadLimits& limits() const { return limits_; }
  bool wants(std::size_t length) const { return length <= limits_.largest_read; }

  // This mount writes, zeroes or trims [offset, offset+length) (call as it starts and
  // as it ends, before its reply): a window fetched before, or while it runs, may hold
  // the old data there, and only there (a read-modify-write of a larger server block
  // puts back what it read). The window keeps what lies before the range, or after it
  // if the range covers the window's start (a reader writing back what it has just read,
  // `dd conv=notrunc` in place); one wholly written is lost, and not fetched again until
  // its reader has passed it.
  void written(std::uint64_t offset, std::uint64_t length) {
    const std::uint64_t end = offset + length;
    for (Stream& stream : streams_)
      for (Window& window : stream.windows) {
        const std::uint64_t window_end = window.offset + window.length;
        if (!(window.fetching || window.ready) || end <= window.valid_from || window_end <= offset) continue;
        if (offset > window.valid_from) window.length = std::size_t(offset - window.offset);
        else if (end < window_end) window.valid_from = end;
        else give_up(stream, window);
      }
  }

  // The data of [offset, offset+length) if a fresh window holds all of it, else null.
  const std::byte* find(std::uint64_t handle, std::uint64_t offset, std::size_t length, Clock::time_point now) const {
    for (const Stream& stream : streams_) {
      if (!stream.used || stream.handle != handle) continue;
      for (const Window& window : stream.windows)
        if (window.ready && fresh(window, now) && offset >= window.valid_from &&
            offset + length <= window.offset + window.length)
          return window.buffer.data() + (offset - window.offset);
    }
    return nullptr;
  }

  // Every READ of a file that wants() it, answered from a window or not: follows the
  // file's position, and says which window to fetch next, if any (at most one; none
  // unless may_fetch(): the caller's cap on fetches, or no connection to send one on;
  // asked only when a fetch is due, not at every READ).
  template <class MayFetch>
  std::optional<Fetch> observe(std::uint64_t handle, std::uint64_t offset, std::size_t length, Clock::time_point now,
                               MayFetch&& may_fetch) {
    Stream* tracked = stream_of(handle, now);
    if (!tracked) return std::nullopt;  // as many files are read ahead already
    Stream& stream = *tracked;
    const bool sequential = offset == stream.next_offset;
    // The reader's own time between READs, smoothed (one slow lap changes little): from
    // the previous READ's answer, so that a distant server's round trips do not count.
    const auto gap =
        std::chrono::duration_cast<std::chrono::nanoseconds>(now - std::max(stream.last_used, stream.last_answered));
    if (!sequential) {
      stream.gap = unknown_gap;
      stream.no_fetch_before = 0;  // a reader starting elsewhere (again) starts afresh
      stream.too_slow = false;
    } else {
      stream.gap = stream.sequential == 0 ? gap : (3 * stream.gap + gap) / 4;
    }
    stream.sequential = sequential ? stream.sequential + 1 : 0;
    stream.last_used = now;
    stream.next_offset = offset + length;
    for (Window& window : stream.windows)
      if (window.ready && !fresh(window, now)) window = Window{};  // its memory goes now
    const std::uint64_t position = stream.next_offset;
    if (stream.sequential < limits_.sequential_before_fetching || position >= export_size_ ||
        position < stream.no_fetch_before || stream.too_slow)
      return std::nullopt;
    const std::size_t window_length = window_for(stream.gap, length);
    if (window_length == 0) return std::nullopt;
    const std::size_t stream_index = std::size_t(&stream - streams_.data());
    Window* holding = nullptr;  // the window the reader is in
    for (Window& window : stream.windows)
      if (covers(window, position, now)) holding = &window;
    if (!holding) {
      if (!may_fetch()) return std::nullopt;
      return start(stream_index, free_slot(stream, position, now), align_down(position, alignment_), window_length,
                   now);
    }
    // Half-way through it, the next one is fetched: it is ready before the reader gets
    // there, unless the reader outruns the server (it then reads there itself a while).
    const std::uint64_t end = holding->offset + holding->length;
    if (end >= export_size_ || position - holding->offset < holding->length / 2) return std::nullopt;
    for (const Window& window : stream.windows)
      if (covers(window, end, now)) return std::nullopt;
    if (!may_fetch()) return std::nullopt;
    return start(stream_index, free_slot(stream, position, now), end, window_length, now);
  }

  // What a reader of `length`-byte READs `gap` apart reads in half the freshness, up to
  // a window: the next window is sent half-way through this one, so it is used up while
  // fresh; a slow reader gets a small one rather than the same 1 MiB fetched over and
  // over. None for a reader that would not come back a few times meanwhile.
  std::size_t window_for(std::chrono::nanoseconds gap, std::size_t length) const {
    const double reads_while_fresh =
        std::chrono::duration<double>(limits_.freshness) / 2 /
        std::max(std::chrono::duration<double>(gap), std::chrono::duration<double>(1e-6));
    if (reads_while_fresh < 4) return 0;
    const double bytes = std::min(reads_while_fresh * double(length), double(limits_.window));
    const std::uint64_t aligned = std::max<std::uint64_t>(alignment_, std::uint64_t(bytes) / alignment_ * alignment_);
    return std::size_t(std::min<std::uint64_t>(aligned, limits_.window));
  }

  // How soon the file's next READ may be expected, if it is a sequential reader quick
  // enough to poll for (ReadAheadLimits::pollable_gap); else zero. After observe().
  std::chrono::microseconds next_read_within(std::uint64_t handle) const {
    for (const Stream& stream : streams_)
      if (stream.used && stream.handle == handle && stream.sequential >= limits_.sequential_before_fetching &&
          stream.gap <= limits_.pollable_gap)
        return 2 * std::chrono::duration_cast<std::chrono::microseconds>(stream.gap);
    return {};
  }

  // A READ observe()d was answered by the server (one answered from a window is
  // answered as it arrives).
  void answered(std::uint64_t handle, Clock::time_point now) {
    for (Stream& stream : streams_)
      if (stream.used && stream.handle == handle) stream.last_answered = now;
  }

  // A fetch's end: its data, if it succeeded, serves READs from now on (until stale).
  // A failed one is not fetched again until the reader has passed it: the READs go
  // to the server, which answers each for itself.
  // One that came too late to be fresh tells that the server is too slow for this
  // reader to be read ahead: not again until it starts elsewhere.
  void fetched(const Fetch& fetch, Buffer buffer, bool succeeded, Clock::time_point now) {
    Stream& stream = streams_[fetch.stream];
    Window& window = stream.windows[fetch.slot];
    if (window.id != fetch.id || !window.fetching) return;  // given up meanwhile: buffer dropped
    if (!fresh(window, now)) stream.too_slow = true;
    if (!succeeded || stream.too_slow) return give_up(stream, window);
    window.fetching = false;
    window.ready = true;
    window.buffer = std::move(buffer);
  }

  // The file was closed.
  void forget(std::uint64_t handle) {
    for (Stream& stream : streams_)
      if (stream.used && stream.handle == handle) reset(stream);
  }
  // Every window's memory goes (idle, or stopping); fetches still running are ignored.
  void clear() {
    for (Stream& stream : streams_) reset(stream);
  }

 private:
  static constexpr std::chrono::nanoseconds unknown_gap = std::chrono::hours(24);

  struct Window {
    std::uint64_t offset = 0;
    std::size_t length = 0;
    std::uint64_t valid_from = 0;  // a write over its start leaves only what follows it
    std::uint64_t id = 0;
    Clock::time_point sent{};
    bool fetching = false;
    bool ready = false;
    Buffer buffer{};
  };
  struct Stream {
    bool used = false;
    std::uint64_t handle = 0;
    std::uint64_t next_offset = 0;
    std::uint64_t no_fetch_before = 0;  // the end of a window lost to a write or a failure
    bool too_slow = false;               // a window came back stale
    unsigned sequential = 0;
    Clock::time_point last_used{};  // its latest READ's arrival
    Clock::time_point last_answered{};
    std::chrono::nanoseconds gap = unknown_gap;  // between its READs, smoothed
    std::array<Window, windows_per_stream> windows{};
  };

  bool fresh(const Window& window, Clock::time_point now) const { return now - window.sent <= limits_.freshness; }
  // A window still fetching covers its range however long it takes: a slow server is
  // not sent a second one for the same range (fetched() finds whether it came fresh).
  bool covers(const Window& window, std::uint64_t position, Clock::time_point now) const {
    return (window.fetching || (window.ready && fresh(window, now))) && position >= window.valid_from &&
           position < window.offset + window.length;
  }

  // A window fetched in vain: its memory goes (a fetch still running keeps its own
  // buffer and finds its id gone), and its range is not fetched again.
  static void give_up(Stream& stream, Window& window) {
    stream.no_fetch_before = std::max(stream.no_fetch_before, window.offset + window.length);
    window = Window{};
  }

  // A slot not in use, or one the reader has passed; the older one if both are in use
  // (a window still fetching is then simply given up).
  std::size_t free_slot(const Stream& stream, std::uint64_t position, Clock::time_point now) const {
    std::size_t chosen = 0;
    for (std::size_t slot = 0; slot < windows_per_stream; ++slot) {
      const Window& window = stream.windows[slot];
      if (!(window.fetching || (window.ready && fresh(window, now))) || window.offset + window.length <= position)
        return slot;
      if (window.sent < stream.windows[chosen].sent) chosen = slot;
    }
    return chosen;
  }

  std::optional<Fetch> start(std::size_t stream_index, std::size_t slot, std::uint64_t offset, std::size_t length,
                             Clock::time_point now) {
    Window& window = streams_[stream_index].windows[slot];
    window = Window{};
    window.offset = offset;
    window.valid_from = offset;
    window.length = std::size_t(std::min<std::uint64_t>(length, export_size_ - offset));
    window.id = ++last_id_;
    window.sent = now;
    window.fetching = true;
    return Fetch{stream_index, slot, window.id, window.offset, window.length};
  }

  // The file's stream; a new one takes a free one, or the least recently used if that
  // is idle (longer than a window stays fresh); else none: a fifth file read beside
  // four others is not read ahead, rather than all five taking turns at evicting.
  Stream* stream_of(std::uint64_t handle, Clock::time_point now) {
    Stream* oldest = &streams_[0];
    for (Stream& stream : streams_) {
      if (stream.used && stream.handle == handle) return &stream;
      if (!stream.used || (oldest->used && stream.last_used < oldest->last_used)) oldest = &stream;
    }
    if (oldest->used && now - oldest->last_used <= limits_.freshness) return nullptr;
    reset(*oldest);
    oldest->used = true;
    oldest->handle = handle;
    oldest->last_used = now;
    oldest->next_offset = ~std::uint64_t(0);  // the first READ is not "sequential"
    return oldest;
  }

  static void reset(Stream& stream) { stream = Stream{}; }  // a fetch running finds its id gone

  ReadAheadLimits limits_;
  std::uint64_t export_size_ = 0;
  std::uint64_t alignment_ = 4096;
  std::uint64_t last_id_ = 0;
  std::array<Stream, stream_count> streams_{};
};

}  // namespace bridge
