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

  void set_export_size(std::uint64_t size) { export_size_ = size; }
  const ReadAheadLimits& limits() const { return limits_; }
  bool wants(std::size_t length) const { return length <= limits_.largest_read; }

  // This mount wrote, zeroed or trimmed (call at the start and at the end of each):
  // no window fetched before can be trusted, nor one fetched while the write ran.
  void written() { ++generation_; }

  // The data of [offset, offset+length) if a fresh window holds all of it, else null.
  const std::byte* find(std::uint64_t handle, std::uint64_t offset, std::size_t length, Clock::time_point now) const {
    for (const Stream& stream : streams_) {
      if (!stream.used || stream.handle != handle) continue;
      for (const Window& window : stream.windows)
        if (window.ready && usable(window, now) && offset >= window.offset &&
            offset + length <= window.offset + window.length)
          return window.buffer.data() + (offset - window.offset);
    }
    return nullptr;
  }

  // Every READ of a file that wants() it, answered from a window or not: follows the
  // file's position, and says which window to fetch next, if any (at most one).
  std::optional<Fetch> observe(std::uint64_t handle, std::uint64_t offset, std::size_t length,
                               Clock::time_point now) {
    Stream& stream = stream_of(handle, now);
    stream.last_used = now;
    stream.sequential = offset == stream.next_offset ? stream.sequential + 1 : 0;
    stream.next_offset = offset + length;
    if (stream.sequential < limits_.sequential_before_fetching || stream.next_offset >= export_size_)
      return std::nullopt;
    const std::uint64_t position = stream.next_offset;
    const std::size_t stream_index = std::size_t(&stream - streams_.data());
    Window* holding = nullptr;  // the window the reader is in
    for (Window& window : stream.windows)
      if (covers(window, position, now)) holding = &window;
    if (!holding) return start(stream_index, free_slot(stream, position, now), align_down(position), now);
    // Half-way through it, the next one is fetched: it is ready before the reader gets
    // there, unless the reader outruns the server (it then reads there itself a while).
    const std::uint64_t end = holding->offset + holding->length;
    if (end >= export_size_ || position - holding->offset < holding->length / 2) return std::nullopt;
    for (const Window& window : stream.windows)
      if (covers(window, end, now)) return std::nullopt;
    return start(stream_index, free_slot(stream, position, now), end, now);
  }

  // A fetch's end: its data, if it succeeded, serves READs from now on (until stale).
  // A failed one leaves the READs to go to the server, which answers them itself.
  void fetched(const Fetch& fetch, Buffer buffer, bool succeeded) {
    Window& window = streams_[fetch.stream].windows[fetch.slot];
    if (window.id != fetch.id || !window.fetching) return;  // given up meanwhile: buffer dropped
    window.fetching = false;
    window.ready = succeeded;
    if (succeeded) window.buffer = std::move(buffer);
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
  struct Window {
    std::uint64_t offset = 0;
    std::size_t length = 0;
    std::uint64_t id = 0;
    std::uint64_t generation = 0;
    Clock::time_point sent{};
    bool fetching = false;
    bool ready = false;
    Buffer buffer{};
  };
  struct Stream {
    bool used = false;
    std::uint64_t handle = 0;
    std::uint64_t next_offset = 0;
    unsigned sequential = 0;
    Clock::time_point last_used{};
    std::array<Window, windows_per_stream> windows{};
  };

  bool usable(const Window& window, Clock::time_point now) const {
    return (window.fetching || window.ready) && window.generation == generation_ &&
           now - window.sent <= limits_.freshness;
  }
  bool covers(const Window& window, std::uint64_t position, Clock::time_point now) const {
    return usable(window, now) && position >= window.offset && position < window.offset + window.length;
  }
  static std::uint64_t align_down(std::uint64_t offset) { return offset & ~std::uint64_t(4095); }

  // A slot not in use, or one the reader has passed; the older one if both are
  // (a window still fetching is simply given up: its fetch keeps its own buffer).
  std::size_t free_slot(const Stream& stream, std::uint64_t position, Clock::time_point now) const {
    std::size_t chosen = 0;
    for (std::size_t slot = 0; slot < windows_per_stream; ++slot) {
      const Window& window = stream.windows[slot];
      if (!usable(window, now) || window.offset + window.length <= position) return slot;
      if (window.sent < stream.windows[chosen].sent) chosen = slot;
    }
    return chosen;
  }

  std::optional<Fetch> start(std::size_t stream_index, std::size_t slot, std::uint64_t offset, Clock::time_point now) {
    Window& window = streams_[stream_index].windows[slot];
    window = Window{};
    window.offset = offset;
    window.length = std::size_t(std::min<std::uint64_t>(limits_.window, export_size_ - offset));
    window.id = ++last_id_;
    window.generation = generation_;
    window.sent = now;
    window.fetching = true;
    return Fetch{stream_index, slot, window.id, window.offset, window.length};
  }

  // The file's stream; a new one takes the least recently used.
  Stream& stream_of(std::uint64_t handle, Clock::time_point now) {
    Stream* oldest = &streams_[0];
    for (Stream& stream : streams_) {
      if (stream.used && stream.handle == handle) return stream;
      if (!stream.used || (oldest->used && stream.last_used < oldest->last_used)) oldest = &stream;
    }
    reset(*oldest);
    oldest->used = true;
    oldest->handle = handle;
    oldest->last_used = now;
    oldest->next_offset = ~std::uint64_t(0);  // the first READ is not "sequential"
    return *oldest;
  }

  static void reset(Stream& stream) {
    stream.used = false;
    stream.sequential = 0;
    for (Window& window : stream.windows) window = Window{};  // a fetch running finds its id gone
  }

  ReadAheadLimits limits_;
  std::uint64_t export_size_ = 0;
  std::uint64_t generation_ = 0;
  std::uint64_t last_id_ = 0;
  std::array<Stream, stream_count> streams_{};
};

}  // namespace bridge
