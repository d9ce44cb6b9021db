// Export listing with NBD_OPT_LIST and NBD_OPT_INFO; see export_list.hpp.
#include "nbd_client/export_list.hpp"

#include "nbd_client/libnbd_error.hpp"
#include "nbd_client/server_process.hpp"

#include <libnbd.h>

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

}  // namespace

std::string list_exports(const Target& target, std::vector<ExportListing>& exports) {
  std::unique_ptr<nbd_handle, HandleCloser> handle(nbd_create());
  if (!handle) return last_libnbd_error();
  nbd_handle* h = handle.get();
  nbd_set_uri_allow_local_file(h, true);
  nbd_set_opt_mode(h, true);
  nbd_set_full_info(h, true);
  ServerProcess server;
  int connected = -1;
  switch (target.kind) {
    case Target::Kind::uri: connected = nbd_connect_uri(h, target.uri.c_str()); break;
    case Target::Kind::unix_socket: connected = nbd_connect_unix(h, target.unix_path.c_str()); break;
    case Target::Kind::tcp: connected = nbd_connect_tcp(h, target.host.c_str(), target.port.c_str()); break;
    case Target::Kind::socket_fd: connected = nbd_connect_socket(h, target.fd); break;
    case Target::Kind::command: {
      std::string socket_path, problem;
      if (server.start(target.command, false, socket_path, problem)) return problem;
      connected = nbd_connect_unix(h, socket_path.c_str());
      break;
    }
  }
  if (connected == -1) {
    // A server command that died says why better than the socket it never served.
    std::string how;
    if (target.kind == Target::Kind::command && server.exited(how, std::chrono::seconds(1)))
      return "the server command failed to start (" + how + ")";
    return last_libnbd_error();
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
