// Lines for stderr (-v traces, notices, the statistics line) that never stall the
// event loop: a line is written only once stderr can take it within the caller's
// patience, else dropped and counted. Any thread; each line is one write().
#pragma once

#include <chrono>
#include <cstdint>
#include <string_view>

namespace bridge {

// A full pipe nobody reads (`2>&1 | less` left alone, a stopped terminal) must not
// hold up every request: -v traces wait not at all, notices briefly.
inline constexpr std::chrono::milliseconds trace_patience{0};
inline constexpr std::chrono::milliseconds notice_patience{100};
inline constexpr std::chrono::milliseconds final_patience{1000};

// Writes "nbdbridge: " + text + "\n" to stderr if it can take the line within
// `patience`; returns false (and counts the line) if it was dropped.
bool diagnostic(std::string_view text, std::chrono::milliseconds patience);
// printf-style -v trace line (no prefix or newline in format), with trace_patience.
void trace(const char* format, ...) __attribute__((format(printf, 1, 2)));
// Lines dropped so far.
std::uint64_t dropped_diagnostics();

}  // namespace bridge
