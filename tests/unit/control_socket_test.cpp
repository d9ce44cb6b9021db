// The control socket end to end: a server on an io_context thread, the blocking client here.
#include "bridge/control_socket.hpp"

#include <doctest/doctest.h>

#include <asio/io_context.hpp>
#include <asio/post.hpp>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

using namespace std::chrono_literals;

namespace {

// A private directory per test, removed with everything in it.
struct TemporaryDirectory {
  std::string path;
  TemporaryDirectory() {
    char pattern[] = "/tmp/nbdbridge-control-test-XXXXXX";
    REQUIRE(mkdtemp(pattern) != nullptr);
    path = pattern;
  }
  ~TemporaryDirectory() { std::system(("rm -rf '" + path + "'").c_str()); }
};

// Runs a ControlServer on its own loop thread, as the bridge does; stops it there too.
struct ServerOnThread {
  asio::io_context loop;
  bridge::ControlServer server;
  std::thread thread;
  std::atomic<int> calls{0};

  ServerOnThread(const std::string& path, std::chrono::milliseconds client_timeout = 5s)
      : server(loop.get_executor(), path,
               [this](std::string_view command) -> std::string {
                 ++calls;
                 if (command == "stats") return "{\"version\":1}\n";
                 if (command == "throw") throw std::runtime_error("handler failed");
                 return "unknown command: " + std::string(command) + "\n";
               },
               client_timeout) {}

  std::error_code start() {
    auto error = server.start();
    if (!error) thread = std::thread([this] { loop.run(); });
    return error;
  }

  // The loop must run dry once the server stops: nothing may linger on it.
  void stop() {
    if (!thread.joinable()) return;
    asio::post(loop, [this] { server.stop(); });
    thread.join();
  }

  ~ServerOnThread() { stop(); }
};

std::string query(const std::string& path, const std::string& command, std::error_code& error) {
  std::string reply;
  error = bridge::query_control(path, command, reply, 2s);
  return reply;
}

// A blocking client socket connected to path whose reads give up after 5 s (EAGAIN), so
// that a server that never answers fails the test instead of hanging it.
int connect_client(const std::string& path) {
  int descriptor = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(descriptor >= 0);
  timeval timeout{5, 0};
  REQUIRE(setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) == 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  path.copy(address.sun_path, path.size());
  REQUIRE(connect(descriptor, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  return descriptor;
}

}  // namespace

TEST_CASE("the socket path is per user, per mount, stable, creates nothing, and ignores the session") {
  std::string saved = std::getenv("XDG_RUNTIME_DIR") ? std::getenv("XDG_RUNTIME_DIR") : "";
  const std::string base = std::string(geteuid() == 0 ? "/run" : "/tmp") + "/nbdbridge-" + std::to_string(geteuid());
  setenv("XDG_RUNTIME_DIR", "/run/user/1234/", 1);
  std::string first = bridge::control_socket_path("/mnt/disk");
  CHECK(first == bridge::control_socket_path("/mnt/disk"));
  CHECK(first != bridge::control_socket_path("/mnt/disk2"));
  CHECK(first.rfind(base + "/", 0) == 0);
  CHECK(first.size() == base.size() + 1 + 16 + 5);
  CHECK(first.substr(first.size() - 5) == ".sock");
  // FNV-1a 64 of the empty string is its offset basis.
  CHECK(bridge::control_socket_path("").find("/cbf29ce484222325.sock") != std::string::npos);

  // ssh, su and sudo set it differently or not at all: the path stays.
  unsetenv("XDG_RUNTIME_DIR");
  CHECK(bridge::control_socket_path("/mnt/disk") == first);

  if (saved.empty())
    unsetenv("XDG_RUNTIME_DIR");
  else
    setenv("XDG_RUNTIME_DIR", saved.c_str(), 1);
}

TEST_CASE("a query gets the handler's reply, and stop removes the socket") {
  TemporaryDirectory directory;
  std::string path = directory.path + "/run/control.sock";
  ServerOnThread server(path);
  REQUIRE_FALSE(server.start());

  struct stat status {};
  REQUIRE(stat((directory.path + "/run").c_str(), &status) == 0);
  CHECK((status.st_mode & 0777) == 0700);

  std::error_code error;
  CHECK(query(path, "stats", error) == "{\"version\":1}\n");
  CHECK_FALSE(error);
  CHECK(query(path, "reset", error) == "unknown command: reset\n");
  CHECK_FALSE(error);
  CHECK(query(path, "throw", error) == "error: handler failed\n");
  CHECK(query(path, std::string(300, 'x'), error) == "error: command longer than 256 bytes\n");
  CHECK(server.calls == 3);

  // Several at once, each answered.
  std::vector<std::future<std::string>> replies;
  for (int client = 0; client < 8; ++client)
    replies.push_back(std::async(std::launch::async, [&] {
      std::error_code ignored;
      return query(path, "stats", ignored);
    }));
  for (auto& reply : replies) CHECK(reply.get() == "{\"version\":1}\n");

  server.stop();
  CHECK(access(path.c_str(), F_OK) != 0);
  int calls_at_stop = server.calls;
  query(path, "stats", error);
  CHECK(error == std::errc::no_such_file_or_directory);
  CHECK(server.calls == calls_at_stop);
}

TEST_CASE("a missing or stale socket fails at once") {
  TemporaryDirectory directory;
  std::string reply;
  auto began = std::chrono::steady_clock::now();
  auto error = bridge::query_control(directory.path + "/absent.sock", "stats", reply, 5s);
  CHECK(error == std::errc::no_such_file_or_directory);

  // A socket file whose owner is gone: bound, never listened, closed.
  std::string stale = directory.path + "/stale.sock";
  int descriptor = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  stale.copy(address.sun_path, stale.size());
  REQUIRE(bind(descriptor, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  close(descriptor);
  error = bridge::query_control(stale, "stats", reply, 5s);
  CHECK(error == std::errc::connection_refused);
  CHECK(std::chrono::steady_clock::now() - began < 1s);

  // A server starting there replaces the stale file.
  ServerOnThread server(stale);
  REQUIRE_FALSE(server.start());
  CHECK(query(stale, "stats", error) == "{\"version\":1}\n");

  // A second server on a live path is refused, and leaves the first one's socket alone.
  asio::io_context other_loop;
  bridge::ControlServer second(other_loop.get_executor(), stale, [](std::string_view) { return std::string(); });
  CHECK(second.start() == std::errc::address_in_use);
  second.stop();
  CHECK(query(stale, "stats", error) == "{\"version\":1}\n");
}

TEST_CASE("a client that says nothing is dropped after the timeout") {
  TemporaryDirectory directory;
  std::string path = directory.path + "/quiet.sock";
  ServerOnThread server(path, 200ms);
  REQUIRE_FALSE(server.start());

  int silent = connect_client(path);
  auto began = std::chrono::steady_clock::now();
  char byte;
  CHECK(recv(silent, &byte, 1, 0) == 0);  // the server closed it
  auto waited = std::chrono::steady_clock::now() - began;
  CHECK(waited >= 150ms);
  CHECK(waited < 2s);
  close(silent);

  // Meanwhile and afterwards, others are served.
  std::error_code error;
  CHECK(query(path, "stats", error) == "{\"version\":1}\n");
  CHECK(server.calls == 1);
}

TEST_CASE("stop drops clients still talking, without calling the handler") {
  TemporaryDirectory directory;
  std::string path = directory.path + "/busy.sock";
  ServerOnThread server(path);
  REQUIRE_FALSE(server.start());

  int lingering = connect_client(path);
  REQUIRE(send(lingering, "sta", 3, 0) == 3);
  // Let the server accept it and start reading: it accepts in order, on one thread, so once
  // a client connected after it is answered (within query's 2 s), that one is being read.
  std::error_code error;
  REQUIRE(query(path, "stats", error) == "{\"version\":1}\n");

  auto began = std::chrono::steady_clock::now();
  server.stop();  // joins the loop thread: returns only once no timer or read is pending
  CHECK(std::chrono::steady_clock::now() - began < 1s);
  send(lingering, "ts\n", 3, MSG_NOSIGNAL);
  char byte;
  ssize_t received = recv(lingering, &byte, 1, 0);
  int receive_error = errno;
  CHECK(received <= 0);  // closed by the server: the end of the stream or a reset,
  if (received < 0) CHECK(receive_error != EAGAIN);  // not SO_RCVTIMEO running out
  close(lingering);
  CHECK(server.calls == 1);  // the query's only
}

TEST_CASE("a client that disconnects after its line still gets served to the end") {
  TemporaryDirectory directory;
  std::string path = directory.path + "/eof.sock";
  ServerOnThread server(path);
  REQUIRE_FALSE(server.start());

  // No newline, but the write side shut: the bytes so far are the command.
  int client = connect_client(path);
  REQUIRE(send(client, "stats", 5, 0) == 5);
  shutdown(client, SHUT_WR);
  std::string reply;
  char chunk[256];
  for (ssize_t received; (received = recv(client, chunk, sizeof chunk, 0)) > 0;) reply.append(chunk, std::size_t(received));
  close(client);
  CHECK(reply == "{\"version\":1}\n");
}
