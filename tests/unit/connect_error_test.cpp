// A failed connect's error code, and the pool's wait for a server that is not there
// yet (--wait-for-server), against real sockets in a private directory: no server
// ever answers here, so every connect fails in the socket's connect().
#include "nbd_client/connection_pool.hpp"
#include "nbd_client/libnbd_error.hpp"

#include <doctest/doctest.h>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>

#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

using namespace std::chrono_literals;

namespace {

struct TemporaryDirectory {
  std::string path;
  TemporaryDirectory() {
    char pattern[] = "/tmp/nbdbridge-connect-test-XXXXXX";
    REQUIRE(mkdtemp(pattern) != nullptr);
    path = pattern;
  }
  ~TemporaryDirectory() { std::system(("rm -rf '" + path + "'").c_str()); }
};

// A unix socket file nobody listens on (bound, then closed): connect() is refused.
void make_dead_socket(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  path.copy(address.sun_path, sizeof address.sun_path - 1);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  close(fd);
}

nbd_client::Target unix_target(const std::string& path) {
  nbd_client::Target target;
  target.kind = nbd_client::Target::Kind::unix_socket;
  target.unix_path = path;
  return target;
}

// The pool's async_connect, run on a loop of its own to its end.
struct PoolConnect {
  asio::io_context loop{1};
  nbd_client::ConnectionPool pool{loop.get_executor()};
  std::optional<std::error_code> result;
  std::chrono::steady_clock::duration took{};

  void run(const nbd_client::Target& target, nbd_client::PoolOptions options) {
    const auto started = std::chrono::steady_clock::now();
    asio::co_spawn(loop, pool.async_connect(target, options), [this](std::exception_ptr, std::error_code error) {
      result = error;
    });
    loop.run_for(30s);  // a bound, not a wait: the connect ends well before it
    took = std::chrono::steady_clock::now() - started;
    pool.close();
    REQUIRE(result.has_value());
  }
};

}  // namespace

TEST_CASE("a connect's failure in the socket's connect() is told from one the server or libnbd said") {
  TemporaryDirectory directory;
  const std::string missing = directory.path + "/missing.sock";
  const std::string dead = directory.path + "/dead.sock";
  make_dead_socket(dead);
  nbd_handle* handle = nbd_create();
  REQUIRE(handle);
  CHECK(nbd_aio_connect_unix(handle, missing.c_str()) == -1);
  CHECK(nbd_client::last_connect_error(true) == std::errc::no_such_file_or_directory);
  // The same errno from the handshake means "no such export": not an absent server.
  CHECK(nbd_client::last_connect_error(false) == std::errc::protocol_error);
  nbd_close(handle);
  handle = nbd_create();
  CHECK(nbd_aio_connect_unix(handle, dead.c_str()) == -1);
  CHECK(nbd_client::last_connect_error(true) == std::errc::connection_refused);
  CHECK(nbd_client::last_connect_error(false) == std::errc::connection_refused);
  nbd_close(handle);
  handle = nbd_create();
  CHECK(nbd_aio_connect_uri(handle, "nbd+unix:///?sock=x") == -1);  // EINVAL: a bad URI
  CHECK(nbd_client::last_connect_error(true) == std::errc::protocol_error);
  nbd_close(handle);

  CHECK(nbd_client::server_absent(std::make_error_code(std::errc::no_such_file_or_directory)));
  CHECK(nbd_client::server_absent(std::make_error_code(std::errc::connection_refused)));
  CHECK_FALSE(nbd_client::server_absent(std::make_error_code(std::errc::protocol_error)));
  CHECK_FALSE(nbd_client::server_absent(std::make_error_code(std::errc::timed_out)));
  CHECK_FALSE(nbd_client::server_absent(std::make_error_code(std::errc::operation_canceled)));
  CHECK_FALSE(nbd_client::server_absent({}));
}

TEST_CASE("without wait_for_server an absent server fails the connect at once") {
  TemporaryDirectory directory;
  PoolConnect connect;
  bool waited = false;
  connect.pool.on_waiting_for_server = [&waited](const std::string&) { waited = true; };
  connect.run(unix_target(directory.path + "/missing.sock"), {});
  CHECK(*connect.result == std::errc::no_such_file_or_directory);
  CHECK(connect.pool.error_message().find("No such file or directory") != std::string::npos);
  CHECK_FALSE(waited);
  CHECK(connect.took < 2s);
}

TEST_CASE("wait_for_server keeps trying an absent server, then fails as without it") {
  TemporaryDirectory directory;
  const std::string dead = directory.path + "/dead.sock";
  make_dead_socket(dead);
  PoolConnect connect;
  std::string reason;
  int said = 0;
  connect.pool.on_waiting_for_server = [&](const std::string& why) {
    reason = why;
    ++said;
  };
  nbd_client::PoolOptions options;
  options.wait_for_server = 300ms;
  connect.run(unix_target(dead), options);
  CHECK(*connect.result == std::errc::connection_refused);
  CHECK(said == 1);  // once, as the wait began
  CHECK(reason.find("Connection refused") != std::string::npos);
  CHECK(connect.took >= 300ms);
  CHECK(connect.took < 2s);
}

TEST_CASE("cancel_connect ends the wait for the server at once") {
  TemporaryDirectory directory;
  PoolConnect connect;
  connect.pool.on_waiting_for_server = [&connect](const std::string&) {
    // As the bridge's signal handler does, from the loop, while the pool waits.
    asio::post(connect.loop, [&connect] { connect.pool.cancel_connect(); });
  };
  nbd_client::PoolOptions options;
  options.wait_for_server = 60s;
  connect.run(unix_target(directory.path + "/missing.sock"), options);
  CHECK(*connect.result == std::errc::operation_canceled);
  CHECK(connect.took < 2s);
}

TEST_CASE("an --fd target is never waited for") {
  // A socket that is not connected fails the handshake: not an absent server.
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  nbd_client::Target target;
  target.kind = nbd_client::Target::Kind::socket_fd;
  target.fd = fd;
  PoolConnect connect;
  bool waited = false;
  connect.pool.on_waiting_for_server = [&waited](const std::string&) { waited = true; };
  nbd_client::PoolOptions options;
  options.wait_for_server = 60s;
  options.connect.timeout = 5s;
  connect.run(target, options);
  CHECK(*connect.result);
  CHECK_FALSE(waited);
  CHECK(connect.took < 5s);
}
