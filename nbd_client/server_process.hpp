// A server subprocess started with systemd socket activation (`[ CMD ARGS... ]`).
// Owns the child pid and its private socket directory; stop() is idempotent and
// bounded, and runs from the destructor too, so the server never outlives us.
#pragma once

#include <chrono>
#include <string>
#include <sys/types.h>
#include <system_error>
#include <vector>

namespace nbd_client {

class ServerProcess {
 public:
  ServerProcess() = default;
  ~ServerProcess();
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  // Binds a listening unix socket in a private directory and starts argv with
  // LISTEN_PID/LISTEN_FDS=1 and the socket as fd 3. Returns the socket path to
  // connect to, or an error with a one-line reason.
  // The server's stderr is kept in a private file (quoted if it fails to start)
  // unless pass_stderr, when it shares ours.
  std::error_code start(const std::vector<std::string>& argv, bool pass_stderr, std::string& socket_path,
                        std::string& error_message);

  // If the child has exited (waiting up to `grace` for it: a server closes its socket
  // as it exits, a moment before it can be reaped), describes how and what it said
  // last (for "failed to start" messages).
  bool exited(std::string& how, std::chrono::milliseconds grace = std::chrono::milliseconds(0));

  // SIGTERM, then SIGKILL after a bounded wait; reaps the child, removes the socket.
  void stop();

  bool running() const { return pid_ > 0; }

 private:
  std::string last_words();

  pid_t pid_ = -1;
  int captured_stderr_ = -1;
  std::string directory_;
  std::string socket_path_;
};

}  // namespace nbd_client
