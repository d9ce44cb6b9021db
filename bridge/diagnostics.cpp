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

}  // namespace

bool diagnostic(std::string_view text, std::chrono::milliseconds patience) {
  char line[4096];
  int length = std::snprintf(line, sizeof line, "nbdbridge: %.*s\n", int(text.size()), text.data());
  if (length < 0) return false;
  if (std::size_t(length) >= sizeof line) {  // cut, but still one line
    length = int(sizeof line) - 1;
    line[length - 1] = '\n';
  }
  if (!stderr_ready(patience)) {
    dropped.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  ssize_t written;
  do written = write(STDERR_FILENO, line, std::size_t(length));
  while (written < 0 && errno == EINTR);
  return written == length;
}

void trace(const char* format, ...) {
  char text[1024];
  va_list arguments;
  va_start(arguments, format);
  int length = std::vsnprintf(text, sizeof text, format, arguments);
  va_end(arguments);
  if (length < 0) return;
  diagnostic(std::string_view(text, std::min<std::size_t>(std::size_t(length), sizeof text - 1)), trace_patience);
}

std::uint64_t dropped_diagnostics() { return dropped.load(std::memory_order_relaxed); }

}  // namespace bridge
