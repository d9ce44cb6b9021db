// `--list`: the server's exports and their sizes, through libnbd's option mode.
// Synchronous (it runs instead of the bridge, before any loop); the caller bounds
// it in time.
#pragma once

#include "nbd_client/target.hpp"

#include <cstdint>
#include <string>
#include <system_error>
#include <vector>

namespace nbd_client {

struct ExportListing {
  std::string name;
  std::string description;
  std::int64_t size = -1;  // -1: the server would not say
};

// Returns an empty string on success, else a one-line reason; connect_error is then
// why the connect failed as Connection::async_connect has it (server_absent(): nothing
// there to take it), or empty if it was not the connect that failed.
std::string list_exports(const Target& target, std::vector<ExportListing>& exports, std::error_code& connect_error);

}  // namespace nbd_client
