// The last libnbd error of this thread, as one line for messages.
// libnbd keeps it per thread; read it right after the failing call.
#pragma once

#include <libnbd.h>

#include <string>

namespace nbd_client {

inline std::string last_libnbd_error() {
  const char* message = nbd_get_error();
  return message ? message : "unknown libnbd error";
}

}  // namespace nbd_client
