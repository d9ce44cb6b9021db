// What kind of peer a connected socket has, for defaults that depend on the transport.
// Plain functions of a file descriptor; safe from any thread.
#pragma once

namespace nbd_client {

// True for a TCP socket (IPv4 or IPv6).
bool is_tcp(int fd);

// True for a TCP socket whose peer is this machine's loopback (127.0.0.0/8, ::1,
// or ::ffff:127.x.y.z): there is no network for congestion control to share or
// to pace sends for.
bool peer_is_loopback_tcp(int fd);

}  // namespace nbd_client
