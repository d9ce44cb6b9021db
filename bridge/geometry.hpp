// The export's shape as the application sees it: where reads end and which
// writes fit, and rounding to the server's blocks. Pure functions; no I/O.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>

namespace bridge {

// Rounding to a power-of-two-or-not block size, as the server advertises it.
constexpr std::uint64_t align_down(std::uint64_t value, std::uint64_t block) { return value / block * block; }
constexpr std::uint64_t align_up(std::uint64_t value, std::uint64_t block) {
  return (value + block - 1) / block * block;
}

// Reads are short at EOF and empty past it, as for a regular file.
constexpr std::size_t clamp_read(std::uint64_t export_size, std::uint64_t offset, std::size_t length) {
  if (offset >= export_size) return 0;
  std::uint64_t available = export_size - offset;
  return available < length ? std::size_t(available) : length;
}

struct WritePlan {
  std::size_t length = 0;  // bytes to send; may be short of the request
  int error = 0;           // errno when nothing can be written
};

// The export cannot grow: a write starting at or past EOF fails with ENOSPC, as
// on a full disk; one crossing EOF writes what fits and reports the short count,
// so the application learns of the end at its next write instead of silently.
constexpr WritePlan plan_write(std::uint64_t export_size, std::uint64_t offset, std::size_t length) {
  if (length == 0) return {0, 0};
  if (offset >= export_size) return {0, ENOSPC};
  return {clamp_read(export_size, offset, length), 0};
}

// The file's size: the export's, down to a whole number of the server's minimum
// blocks. The bytes past the last whole block cannot be read or written with aligned
// requests, and a server that sets a minimum refuses unaligned ones (the NBD spec
// asks servers for a size that is a multiple; qemu's client rounds down too).
constexpr std::uint64_t reachable_size(std::uint64_t export_size, std::uint64_t minimum_block) {
  return minimum_block > 1 ? export_size - export_size % minimum_block : export_size;
}

}  // namespace bridge
