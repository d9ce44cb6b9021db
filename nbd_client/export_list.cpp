// Export listing with NBD_OPT_LIST and NBD_OPT_INFO; see export_list.hpp.
#include "nbd_client/export_list.hpp"

#include "nbd_client/libnbd_error.hpp"
#include "nbd_client/server_process.hpp"

#include <libnbd.h>

#include <cerrno>
#include <memory>

namespace nbd_client {

namespace {

struct HandleCloser {
  void operator()(nbd_handle* handle) const { nbd_close(handle); }
};

int collect_name(void* user_data, const char* name, const char* description) {
  static_cast<std::vector<ExportListing>*>(user_data)->push_back({name, description ? description : "", -1});
  return 0;
}

int start_connect(nbd_handle* h, const Target& target, const std::string& command_socket) {
  switch (target.kind) {
    case Target::Kind::uri: return nbd_aio_connect_uri(h, target.uri.c_str());
    case Target::Kind::unix_socket: return nbd_aio_connect_unix(h, target.unix_path.c_str());
    case Target::Kind::tcp: return nbd_aio_connect_tcp(h, target.host.c_str(), target.port.c_str());
    case Target::Kind::socket_fd: return nbd_aio_connect_socket(h, target.fd);
    case Target::Kind::command: return nbd_aio_connect_unix(h, command_socket.c_str());
  }
  return -1;
}

// nbd_connect_*() in its two steps, so that a failed connect() of the socket can be
// told from a failed handshake (last_connect_error()): the call that starts the
// connect, then the handshake run up to option mode, as libnbd's own synchronous
// connect runs it. Returns a one-line problem, or "".
std::string connect_in_steps(nbd_handle* h, const Target& target, const std::string& command_socket,
                             std::error_code& connect_error) {
  if (start_connect(h, target, command_socket) == -1) {
    connect_error = last_connect_error(true);
    return last_libnbd_error();
  }
  // In option mode a refused handshake (TLS the server will not do) may end it with
  // nbd_poll() succeeding: the reason is then an error libnbd has set meanwhile, told
  // from an older one of this thread's (an earlier attempt's) by its text.
  const char* earlier = nbd_get_error();
  const std::string earlier_error = earlier ? earlier : "";
  while (nbd_aio_is_connecting(h))
    if (nbd_poll(h, -1) == -1) {
      connect_error = last_connect_error(false);
      return last_libnbd_error();
    }
  if (nbd_aio_is_negotiating(h)) return {};
  connect_error = std::error_code(EPROTO, std::generic_category());
  const char* error = nbd_get_error();
  return error && error != earlier_error ? error : "the server ended the handshake";
}

}  // namespace

std::string list_exports(const Target& target, std::vector<ExportListing>& exports, std::error_code& connect_error) {
  connect_error.clear();
  std::unique_ptr<nbd_handle, HandleCloser> handle(nbd_create());
  if (!handle) return last_libnbd_error();
  nbd_handle* h = handle.get();
  nbd_set_uri_allow_local_file(h, true);
  nbd_set_opt_mode(h, true);
  nbd_set_full_info(h, true);
  ServerProcess server;
  std::string command_socket;
  if (target.kind == Target::Kind::command) {
    std::string problem;
    if (server.start(target.command, false, command_socket, problem)) return problem;
  }
  if (std::string problem = connect_in_steps(h, target, command_socket, connect_error); !problem.empty()) {
    // A server command that died says why better than the socket it never served.
    std::string how;
    if (target.kind == Target::Kind::command && server.exited(how, std::chrono::seconds(1)))
      return "the server command failed to start (" + how + ")";
    return problem;
  }
  nbd_list_callback list{&collect_name, &exports, nullptr};
  if (nbd_opt_list(h, list) == -1) return last_libnbd_error();
  for (auto& listing : exports) {
    // NBD_OPT_INFO per export; a server may refuse it for some, which is not fatal.
    if (nbd_set_export_name(h, listing.name.c_str()) == 0 && nbd_opt_info(h) == 0) listing.size = nbd_get_size(h);
  }
  nbd_opt_abort(h);
  return {};
}

}  // namespace nbd_client
