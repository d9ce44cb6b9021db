// Which signals a thread blocked in a FUSE request has pending, read from its
// /proc/TID/status text. Pure parsing, no I/O; any thread.
#pragma once

#include <charconv>
#include <cstdint>
#include <optional>
#include <string_view>

namespace bridge {

// Whether a pending signal ends the thread's wait: one it neither blocks nor ignores
// that it catches (the call fails with EINTR and the handler runs) or whose default
// action ends the process (SIGKILL, Ctrl-C, Ctrl-\, SIGTERM: the kernel does not always
// turn those into SIGKILL, e.g. when a stop signal is pending already). A stop signal
// (Ctrl-Z, SIGSTOP), a ptrace stop and the cgroup freezer also make the kernel send
// FUSE_INTERRUPT, but the call goes on after them: they do not, nor do signals whose
// default is to be ignored (SIGCHLD, SIGWINCH, ...). nullopt: a field is missing or
// unreadable.
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
  auto blocked = mask_of("SigBlk"), ignored = mask_of("SigIgn"), caught = mask_of("SigCgt");
  if (!thread_pending || !shared_pending || !blocked || !ignored || !caught) return std::nullopt;
  auto bit = [](int signal_number) { return std::uint64_t(1) << (signal_number - 1); };  // signal N is bit N-1
  // Linux's signals whose default action is to stop the process or to do nothing.
  constexpr int not_ending_by_default[] = {17 /*SIGCHLD*/, 18 /*SIGCONT*/, 19 /*SIGSTOP*/, 20 /*SIGTSTP*/,
                                           21 /*SIGTTIN*/, 22 /*SIGTTOU*/, 23 /*SIGURG*/,  28 /*SIGWINCH*/};
  std::uint64_t ending_by_default = ~std::uint64_t(0);
  for (int signal_number : not_ending_by_default) ending_by_default &= ~bit(signal_number);
  const std::uint64_t pending = *thread_pending | *shared_pending;
  if (pending & bit(9)) return true;  // SIGKILL: neither blocked, ignored nor caught
  const std::uint64_t deliverable = pending & ~*blocked & ~*ignored;
  return (deliverable & (*caught | ending_by_default)) != 0;
}

}  // namespace bridge
