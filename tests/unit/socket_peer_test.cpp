// is_tcp and peer_is_loopback_tcp on real sockets: TCP to 127.0.0.1 and ::1 is
// loopback TCP; a unix socket, a pipe, an unconnected socket and TCP to one of
// this machine's other addresses (when it has one) are not.
#include "nbd_client/socket_peer.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <optional>

using nbd_client::is_tcp;
using nbd_client::peer_is_loopback_tcp;

namespace {

// A listener on `address` (port chosen by the kernel) and a client connected to it.
struct TcpPair {
  int listener = -1;
  int client = -1;
  bool connected = false;
  explicit TcpPair(const sockaddr_storage& address, socklen_t length) {
    listener = socket(address.ss_family, SOCK_STREAM, 0);
    if (listener < 0) return;
    if (bind(listener, reinterpret_cast<const sockaddr*>(&address), length) != 0 || listen(listener, 1) != 0) return;
    sockaddr_storage bound{};
    socklen_t bound_length = sizeof bound;
    getsockname(listener, reinterpret_cast<sockaddr*>(&bound), &bound_length);
    client = socket(address.ss_family, SOCK_STREAM, 0);
    connected = client >= 0 && connect(client, reinterpret_cast<const sockaddr*>(&bound), bound_length) == 0;
  }
  ~TcpPair() {
    if (client >= 0) close(client);
    if (listener >= 0) close(listener);
  }
};

sockaddr_storage ipv4(in_addr_t host_order) {
  sockaddr_storage storage{};
  auto& address = reinterpret_cast<sockaddr_in&>(storage);
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(host_order);
  return storage;
}

// One of this machine's IPv4 addresses outside 127.0.0.0/8, if it has one.
std::optional<in_addr_t> other_local_ipv4() {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return std::nullopt;
  std::optional<in_addr_t> found;
  for (ifaddrs* entry = list; entry && !found; entry = entry->ifa_next) {
    if (!entry->ifa_addr || entry->ifa_addr->sa_family != AF_INET) continue;
    in_addr_t host_order = ntohl(reinterpret_cast<sockaddr_in*>(entry->ifa_addr)->sin_addr.s_addr);
    if ((host_order >> 24) != 127) found = host_order;
  }
  freeifaddrs(list);
  return found;
}

}  // namespace

TEST_CASE("TCP to 127.0.0.1 is loopback TCP") {
  TcpPair pair(ipv4(INADDR_LOOPBACK), sizeof(sockaddr_in));
  REQUIRE(pair.connected);
  CHECK(is_tcp(pair.client));
  CHECK(peer_is_loopback_tcp(pair.client));
}

TEST_CASE("TCP to ::1 is loopback TCP, where IPv6 is there") {
  sockaddr_storage storage{};
  auto& address = reinterpret_cast<sockaddr_in6&>(storage);
  address.sin6_family = AF_INET6;
  address.sin6_addr = in6addr_loopback;
  TcpPair pair(storage, sizeof(sockaddr_in6));
  if (!pair.connected) return;  // no IPv6 loopback on this machine
  CHECK(peer_is_loopback_tcp(pair.client));
}

TEST_CASE("TCP to another of this machine's addresses is not loopback TCP") {
  std::optional<in_addr_t> other = other_local_ipv4();
  if (!other) return;  // only a loopback interface here
  TcpPair pair(ipv4(*other), sizeof(sockaddr_in));
  REQUIRE(pair.connected);
  CHECK(is_tcp(pair.client));
  CHECK_FALSE(peer_is_loopback_tcp(pair.client));
}

TEST_CASE("unix sockets, pipes and unconnected sockets are not loopback TCP") {
  int fds[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
  CHECK_FALSE(is_tcp(fds[0]));
  CHECK_FALSE(peer_is_loopback_tcp(fds[0]));
  close(fds[0]);
  close(fds[1]);
  REQUIRE(pipe(fds) == 0);
  CHECK_FALSE(is_tcp(fds[0]));
  CHECK_FALSE(peer_is_loopback_tcp(fds[0]));
  close(fds[0]);
  close(fds[1]);
  int unconnected = socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(unconnected >= 0);
  CHECK_FALSE(peer_is_loopback_tcp(unconnected));
  close(unconnected);
}
