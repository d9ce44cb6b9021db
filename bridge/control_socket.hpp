// The control socket: a per-mount unix socket on which `nbdbridge stats MOUNTPOINT` asks the
// running bridge for its statistics. The server lives on the loop thread and never blocks it;
// stop() must run (on the loop) before destruction, and after it no handler call happens.
// query_control() is the blocking client for the CLI, used outside any event loop.
//
// Protocol: the client sends one line (a command such as "stats" or "reset", at most 256 bytes,
// newline optional if it then shuts down its writing side); the server writes the handler's
// reply verbatim and closes. A client that has not sent its line within the timeout is dropped.
#pragma once

#include <asio/any_io_executor.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>

namespace bridge {

// ${XDG_RUNTIME_DIR:-/tmp}/nbdbridge-<uid>/<FNV-1a 64 of the mount path, 16 hex digits>.sock.
// Pure: creates nothing. Give the same absolute path the server was given, or the hash differs.
std::string control_socket_path(const std::string& absolute_mount_path);

// One bridge per mountpoint: an exclusive flock, held for as long as the returned
// descriptor (close-on-exec) stays open, on a file beside the control socket. Two
// bridges started at once on one directory both passed the "already a FUSE mount"
// check and stacked two mounts. Waits up to `patience` for another holder (a bridge
// still finishing after its unmount) to let go; returns -1 with errno EWOULDBLOCK
// when it did not, -1 with another errno when no lock can be made (the caller then
// goes on without one). The caller checks the mountpoint again once it holds it.
int lock_mountpoint(const std::string& absolute_mount_path, std::chrono::milliseconds patience);

class ControlServer {
 public:
  using Handler = std::function<std::string(std::string_view command)>;

  ControlServer(asio::any_io_executor executor, std::string path, Handler handle,
                std::chrono::milliseconds client_timeout = std::chrono::seconds(5));
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Creates the socket's directory (0700, must be ours), replaces a stale socket file, listens
  // and starts accepting. EADDRINUSE when another live process already serves the path.
  std::error_code start();
  // Closes the listener and every client, unlinks the socket. Idempotent; leaves no pending
  // work on the executor, so a loop with nothing else to do returns.
  void stop();

  const std::string& path() const { return path_; }

 private:
  struct State;  // shared with the accept and client coroutines, which may outlive *this briefly
  std::string path_;
  std::shared_ptr<State> state_;
};

// Connects to path, sends command and a newline, reads the reply until the server closes.
// timeout bounds the whole exchange (ETIMEDOUT). A missing socket gives ENOENT, a stale one
// ECONNREFUSED, both at once.
std::error_code query_control(const std::string& path, const std::string& command, std::string& reply,
                              std::chrono::milliseconds timeout);

}  // namespace bridge
