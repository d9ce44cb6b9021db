// Splitting one request into NBD commands no larger than the server's maximum.
// Pure and header-only, so the unit tests can check every boundary.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace nbd_client {

// Calls visit(done, chunk_length) for consecutive chunks covering [0, length);
// stops early and returns false if visit returns false.
template <typename Visit>
bool for_each_chunk(std::size_t length, std::size_t chunk_limit, Visit&& visit) {
  if (chunk_limit == 0) chunk_limit = length ? length : 1;
  for (std::size_t done = 0; done < length;) {
    std::size_t chunk = std::min(length - done, chunk_limit);
    if (!visit(done, chunk)) return false;
    done += chunk;
  }
  return true;
}

}  // namespace nbd_client
