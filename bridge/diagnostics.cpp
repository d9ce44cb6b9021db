// See diagnostics.hpp. Stateless but for the count of dropped lines.
#include "bridge/diagnostics.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <poll.h>
#include <unistd.h>

namespace bridge {

namespace {

std::atomic<std::uint64_t> dropped{0};

// Whether stderr can take a short line without blocking: a pipe or terminal with room
// (a pipe with a free page takes a line of up to a page without waiting), or a file.
bool stderr_ready(std::chrono::milliseconds patience) {
  const auto deadline = std::chrono::steady_clock::now() + patience;
  for (;;) {
    pollfd output{STDERR_FILENO, POLLOUT, 0};
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    int ready = poll(&output, 1, int(std::max<long long>(left.count(), 0)));
    if (ready > 0) return (output.revents & POLLOUT) != 0;
    if (ready == 0 || errno != EINTR) return false;
  }
}

constexpr char prefix[] = "nbdbridge: ";
constexpr std::size_t prefix_length = sizeof prefix - 1;

// stderr not ready: the line is not even formatted.
bool dropped_line() {
  dropped.fetch_add(1, std::memory_order_relaxed);
  return false;
}

// "nbdbridge: " + text + "\n" from `text_length` bytes of text already at
// line + prefix_length (cut to the buffer, still one line), in one write().
bool write_line(char* line, std::size_t capacity, std::size_t text_length) {
  std::size_t length = std::min(prefix_length + text_length, capacity - 1);
  std::memcpy(line, prefix, prefix_length);
  line[length++] = '\n';
  ssize_t written;
  do written = write(STDERR_FILENO, line, length);
  while (written < 0 && errno == EINTR);
  return written == ssize_t(length);
}

}  // namespace

bool diagnostic(std::string_view text, std::chrono::milliseconds patience) {
  if (!stderr_ready(patience)) return dropped_line();
  char line[4096];
  std::size_t copied = std::min(text.size(), sizeof line - prefix_length - 1);
  std::memcpy(line + prefix_length, text.data(), copied);
  return write_line(line, sizeof line, copied);
}

void trace(const char* format, ...) {
  if (!stderr_ready(trace_patience)) {
    dropped_line();
    return;
  }
  char line[1024];
  va_list arguments;
  va_start(arguments, format);
  int length = std::vsnprintf(line + prefix_length, sizeof line - prefix_length, format, arguments);
  va_end(arguments);
  if (length >= 0) write_line(line, sizeof line, std::size_t(length));
}

std::uint64_t dropped_diagnostics() { return dropped.load(std::memory_order_relaxed); }

}  // namespace bridge
