// The control socket's server (coroutines on the loop thread, sharing one State that the last of
// them frees) and its blocking POSIX client. Errors cross both APIs as std::error_code.
#include "bridge/control_socket.hpp"

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/read_until.hpp>
#include <asio/redirect_error.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <list>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

namespace bridge {

namespace {

using Local = asio::local::stream_protocol;

constexpr std::size_t longest_command = 256;
constexpr std::size_t longest_reply = 64 << 20;  // far above any stats JSON; stops a runaway peer

std::error_code last_error() { return {errno, std::system_category()}; }

std::uint64_t fnv1a_64(std::string_view text) {
  std::uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char byte : text) {
    hash ^= byte;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

std::string parent_directory(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Only the owner may reach the socket: the directory is ours, not a symlink, and 0700. A
// directory someone else made in /tmp is refused rather than trusted.
std::error_code prepare_private_directory(const std::string& directory) {
  if (mkdir(directory.c_str(), 0700) == 0) return {};
  if (errno != EEXIST) return last_error();
  struct stat status {};
  if (lstat(directory.c_str(), &status) != 0) return last_error();
  if (!S_ISDIR(status.st_mode)) return std::make_error_code(std::errc::not_a_directory);
  if (status.st_uid != geteuid()) return std::make_error_code(std::errc::permission_denied);
  if ((status.st_mode & 077) != 0 && chmod(directory.c_str(), 0700) != 0) return last_error();
  return {};
}

bool fill_address(const std::string& path, sockaddr_un& address) {
  address = {};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof address.sun_path) return false;
  path.copy(address.sun_path, path.size());
  return true;
}

class FileDescriptor {
 public:
  explicit FileDescriptor(int descriptor) : descriptor_(descriptor) {}
  ~FileDescriptor() {
    if (descriptor_ >= 0) close(descriptor_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return descriptor_; }

 private:
  int descriptor_;
};

// A socket file left by a process that died: connecting is refused. A live server accepts.
std::error_code clear_stale_socket(const std::string& path) {
  struct stat status {};
  if (lstat(path.c_str(), &status) != 0) return errno == ENOENT ? std::error_code() : last_error();
  if (!S_ISSOCK(status.st_mode)) return std::make_error_code(std::errc::file_exists);
  sockaddr_un address;
  if (!fill_address(path, address)) return std::make_error_code(std::errc::filename_too_long);
  FileDescriptor probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (probe.get() < 0) return last_error();
  if (connect(probe.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0 || errno == EAGAIN)
    return std::make_error_code(std::errc::address_in_use);
  if (errno != ECONNREFUSED) return last_error();
  if (unlink(path.c_str()) != 0 && errno != ENOENT) return last_error();
  return {};
}

using Deadline = std::chrono::steady_clock::time_point;

int milliseconds_left(Deadline deadline) {
  auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
  return left > 0 ? int(std::min<long long>(left, 1 << 30)) : 0;
}

// Waits for events on a non-blocking descriptor until the deadline; ETIMEDOUT after it.
std::error_code wait_for(int descriptor, short events, Deadline deadline) {
  for (;;) {
    int left = milliseconds_left(deadline);
    if (left == 0) return std::make_error_code(std::errc::timed_out);
    pollfd waiting{descriptor, events, 0};
    int ready = poll(&waiting, 1, left);
    if (ready > 0) return {};
    if (ready < 0 && errno != EINTR) return last_error();
  }
}

}  // namespace

// Not under XDG_RUNTIME_DIR: the bridge and `nbdbridge stats` may run in different
// sessions (ssh, su, sudo: the variable differs or is unset), and logind removes
// /run/user/UID, socket and all, when the session that made the mount ends.
std::string control_socket_path(const std::string& absolute_mount_path) {
  const std::string base = geteuid() == 0 ? "/run" : "/tmp";
  char name[40];
  std::snprintf(name, sizeof name, "%016llx.sock", static_cast<unsigned long long>(fnv1a_64(absolute_mount_path)));
  return base + "/nbdbridge-" + std::to_string(geteuid()) + "/" + name;
}

int lock_mountpoint(const std::string& absolute_mount_path, std::chrono::milliseconds patience) {
  std::string path = control_socket_path(absolute_mount_path);
  path.replace(path.size() - std::string_view(".sock").size(), std::string::npos, ".lock");
  if (auto error = prepare_private_directory(parent_directory(path))) {
    errno = error.value();
    return -1;
  }
  int descriptor = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (descriptor < 0) return -1;
  const Deadline deadline = std::chrono::steady_clock::now() + patience;
  while (flock(descriptor, LOCK_EX | LOCK_NB) != 0) {
    int error = errno;
    if ((error == EWOULDBLOCK || error == EINTR) && std::chrono::steady_clock::now() < deadline) {
      usleep(10000);
      continue;
    }
    close(descriptor);
    errno = error;
    return -1;
  }
  return descriptor;
}

struct ControlServer::State {
  struct Client {
    explicit Client(Local::socket connected, const asio::any_io_executor& executor)
        : socket(std::move(connected)), deadline(executor) {}
    Local::socket socket;
    asio::steady_timer deadline;
  };

  State(asio::any_io_executor executor, Handler handle, std::chrono::milliseconds client_timeout)
      : executor(executor), acceptor(executor), pause(executor), handle(std::move(handle)),
        client_timeout(client_timeout) {}

  asio::any_io_executor executor;
  Local::acceptor acceptor;
  asio::steady_timer pause;  // between accept retries after e.g. EMFILE
  Handler handle;
  std::chrono::milliseconds client_timeout;
  bool stopped = false;
  // Kept so stop() can close them; each removes itself when done. Few and short-lived.
  std::list<std::shared_ptr<Client>> clients;
  // What we bound, so stop() never unlinks a socket another process has since put there.
  dev_t bound_device = 0;
  ino_t bound_inode = 0;
  bool bound = false;

  // Drops the client when the deadline passes. The timer's handler holds the client, so it
  // stays valid however the race with the coroutine's own completion goes.
  void arm_deadline(const std::shared_ptr<Client>& client) {
    client->deadline.expires_after(client_timeout);
    client->deadline.async_wait([client](std::error_code error) {
      if (error) return;
      std::error_code ignored;
      client->socket.close(ignored);
    });
  }

  static asio::awaitable<void> accept_loop(std::shared_ptr<State> state) {
    while (!state->stopped) {
      Local::socket connected(state->executor);
      std::error_code error;
      co_await state->acceptor.async_accept(connected, asio::redirect_error(asio::use_awaitable, error));
      if (state->stopped || error == asio::error::operation_aborted) co_return;
      if (error) {
        // Out of descriptors or memory: accepting again at once would spin the loop.
        state->pause.expires_after(std::chrono::milliseconds(100));
        co_await state->pause.async_wait(asio::redirect_error(asio::use_awaitable, error));
        continue;
      }
      auto client = std::make_shared<Client>(std::move(connected), state->executor);
      state->clients.push_back(client);
      asio::co_spawn(state->executor, serve(state, client), asio::detached);
    }
  }

  static asio::awaitable<void> serve(std::shared_ptr<State> state, std::shared_ptr<Client> client) {
    co_await exchange(*state, client);
    std::error_code ignored;
    client->deadline.cancel();
    client->socket.shutdown(Local::socket::shutdown_both, ignored);
    client->socket.close(ignored);
    state->clients.remove(client);
  }

  static asio::awaitable<void> exchange(State& state, const std::shared_ptr<Client>& client) {
    state.arm_deadline(client);
    std::string line;
    std::error_code error;
    // One byte more than the longest command, for its newline.
    std::size_t length = co_await asio::async_read_until(client->socket, asio::dynamic_buffer(line, longest_command + 1),
                                                         '\n', asio::redirect_error(asio::use_awaitable, error));
    if (state.stopped) co_return;

    std::string reply;
    if (!error) {
      line.resize(length - 1);
    } else if (error == asio::error::not_found) {
      reply = "error: command longer than 256 bytes\n";
    } else if (!(error == asio::error::eof && !line.empty())) {
      co_return;  // dropped by the deadline, or gone before saying anything
    }
    if (reply.empty()) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
      try {
        reply = state.handle(line);
      } catch (const std::exception& failure) {
        // The loop must outlive a failing handler; the client learns why.
        reply = std::string("error: ") + failure.what() + "\n";
      }
      if (state.stopped) co_return;  // the handler itself may have stopped us
    }

    client->deadline.cancel();
    state.arm_deadline(client);
    co_await asio::async_write(client->socket, asio::buffer(reply), asio::redirect_error(asio::use_awaitable, error));
  }
};

ControlServer::ControlServer(asio::any_io_executor executor, std::string path, Handler handle,
                             std::chrono::milliseconds client_timeout)
    : path_(std::move(path)), state_(std::make_shared<State>(executor, std::move(handle), client_timeout)) {}

ControlServer::~ControlServer() { stop(); }

std::error_code ControlServer::start() {
  if (state_->stopped || state_->acceptor.is_open()) return std::make_error_code(std::errc::operation_not_permitted);
  sockaddr_un address;
  if (!fill_address(path_, address)) return std::make_error_code(std::errc::filename_too_long);
  if (auto error = prepare_private_directory(parent_directory(path_))) return error;
  if (auto error = clear_stale_socket(path_)) return error;

  std::error_code error;
  state_->acceptor.open(Local(), error);
  if (!error) state_->acceptor.bind(Local::endpoint(path_), error);
  if (error) {
    std::error_code ignored;
    state_->acceptor.close(ignored);
    return error;
  }
  state_->bound = true;
  struct stat status {};
  if (stat(path_.c_str(), &status) == 0) {
    state_->bound_device = status.st_dev;
    state_->bound_inode = status.st_ino;
  }
  chmod(path_.c_str(), 0600);  // the 0700 directory already guards it; this is belt and braces
  state_->acceptor.listen(Local::acceptor::max_listen_connections, error);
  if (error) {
    stop();
    return error;
  }
  asio::co_spawn(state_->executor, State::accept_loop(state_), asio::detached);
  return {};
}

void ControlServer::stop() {
  if (!state_ || state_->stopped) return;
  state_->stopped = true;
  std::error_code ignored;
  state_->acceptor.close(ignored);
  state_->pause.cancel();
  for (auto& client : state_->clients) {
    client->deadline.cancel();
    client->socket.close(ignored);
  }
  state_->clients.clear();
  if (state_->bound) {
    struct stat status {};
    if (lstat(path_.c_str(), &status) == 0 && status.st_dev == state_->bound_device &&
        status.st_ino == state_->bound_inode)
      unlink(path_.c_str());
    state_->bound = false;
  }
}

std::error_code query_control(const std::string& path, const std::string& command, std::string& reply,
                              std::chrono::milliseconds timeout) {
  reply.clear();
  Deadline deadline = std::chrono::steady_clock::now() + timeout;
  sockaddr_un address;
  if (!fill_address(path, address)) return std::make_error_code(std::errc::filename_too_long);
  FileDescriptor connection(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (connection.get() < 0) return last_error();

  // A unix connect either completes at once or, with the backlog full, fails with EAGAIN and
  // must be tried again; it is never "in progress" as TCP's would be.
  while (connect(connection.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
    if (errno == EINTR) continue;
    if (errno != EAGAIN) return last_error();
    if (milliseconds_left(deadline) == 0) return std::make_error_code(std::errc::timed_out);
    poll(nullptr, 0, std::min(10, milliseconds_left(deadline)));
  }

  std::string request = command + "\n";
  std::size_t sent = 0;
  while (sent < request.size()) {
    ssize_t written = send(connection.get(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (written > 0) {
      sent += std::size_t(written);
    } else if (written < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (auto error = wait_for(connection.get(), POLLOUT, deadline)) return error;
    } else {
      return last_error();
    }
  }

  char chunk[65536];
  for (;;) {
    ssize_t received = recv(connection.get(), chunk, sizeof chunk, 0);
    if (received == 0) return {};
    if (received > 0) {
      if (reply.size() + std::size_t(received) > longest_reply) return std::make_error_code(std::errc::message_size);
      reply.append(chunk, std::size_t(received));
    } else if (errno == EAGAIN || errno == EINTR) {
      if (auto error = wait_for(connection.get(), POLLIN, deadline)) return error;
    } else {
      return last_error();
    }
  }
}

}  // namespace bridge
