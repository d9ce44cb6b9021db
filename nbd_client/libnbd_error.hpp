// The last libnbd error of this thread, as one line for messages, and as an error
// code for a connect that failed. libnbd keeps it per thread; read it right after
// the failing call.
#pragma once

#include <libnbd.h>

#include <cerrno>
#include <string>
#include <system_error>

namespace nbd_client {

inline std::string last_libnbd_error() {
  const char* message = nbd_get_error();
  return message ? message : "unknown libnbd error";
}

// A failed connect as an error code: ENOENT or ECONNREFUSED when nothing was there to
// take the connection (server_absent() in connection.hpp), EPROTO for any other
// failure. in_start_call: the failing call was the one that starts the connect
// (nbd_aio_connect_*), where libnbd makes the socket's connect(): ENOENT counts only
// there (a unix connect() is synchronous), since later, in the handshake, libnbd says
// ENOENT for an export the server does not have. ECONNREFUSED counts wherever it comes:
// a TCP connect() still in progress at the start call (a remote host's) is not waited
// for by libnbd 1.14, whose handshake then reads the refusal from its first recv(); an
// established connection that breaks says ECONNRESET or EPIPE instead. A name that does
// not resolve is EPROTO: libnbd gives no errno for it (see
// ConnectionPool::connect_first for why it is not waited through).
inline std::error_code last_connect_error(bool in_start_call) {
  const int error = nbd_get_errno();
  if (error == ECONNREFUSED || (error == ENOENT && in_start_call)) return {error, std::generic_category()};
  return {EPROTO, std::generic_category()};
}

}  // namespace nbd_client
