// Which signals a thread blocked in a FUSE request has pending, read from its
// /proc/TID/status text. Pure parsing, no I/O; any thread.
#pragma once

#include <charconv>
#include <cstdint>
#include <optional>
#include <string_view>

namespace bridge {

// Whether a pending signal ends the thread's wait: SIGKILL (which an uncaught fatal
// signal also becomes), or a signal it catches and does not block. A stop signal
// (Ctrl-Z, SIGSTOP), a ptrace stop and the cgroup freezer also make the kernel send
// FUSE_INTERRUPT, but the call goes on after them: they do not. nullopt: a field is
// missing or unreadable.
inline std::optional<bool> signal_ends_wait(std::string_view status_text) {
  auto mask_of = [status_text](std::string_view field) -> std::optional<std::uint64_t> {
    for (std::size_t line_start = 0; line_start < status_text.size();) {
      std::size_t line_end = status_text.find('\n', line_start);
      if (line_end == std::string_view::npos) line_end = status_text.size();
      std::string_view line = status_text.substr(line_start, line_end - line_start);
      line_start = line_end + 1;
      if (!line.starts_with(field) || line.size() <= field.size() || line[field.size()] != ':') continue;
      std::string_view digits = line.substr(field.size() + 1);
      while (!digits.empty() && (digits.front() == '\t' || digits.front() == ' ')) digits.remove_prefix(1);
      std::uint64_t mask = 0;
      auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), mask, 16);
      if (error != std::errc{} || end == digits.data()) return std::nullopt;
      return mask;
    }
    return std::nullopt;
  };
  auto thread_pending = mask_of("SigPnd"), shared_pending = mask_of("ShdPnd");
  auto blocked = mask_of("SigBlk"), caught = mask_of("SigCgt");
  if (!thread_pending || !shared_pending || !blocked || !caught) return std::nullopt;
  constexpr std::uint64_t kill_bit = std::uint64_t(1) << (9 - 1);  // signal N is bit N-1
  const std::uint64_t pending = *thread_pending | *shared_pending;
  return (pending & kill_bit) != 0 || (pending & ~*blocked & *caught) != 0;
}

}  // namespace bridge
