// What to connect to: the parsed form of the command line's TARGET.
// Plain data; no I/O happens here.
#pragma once

#include <string>
#include <vector>

namespace nbd_client {

struct Target {
  enum class Kind { uri, unix_socket, tcp, socket_fd, command };
  Kind kind = Kind::uri;
  std::string uri;                   // Kind::uri
  std::string unix_path;             // Kind::unix_socket
  std::string host, port;            // Kind::tcp
  int fd = -1;                       // Kind::socket_fd
  std::vector<std::string> command;  // Kind::command: server argv, socket-activated
  std::string export_name;           // non-URI kinds; URIs carry their own

  // For messages: the target as the user wrote it.
  std::string describe() const;
};

}  // namespace nbd_client
