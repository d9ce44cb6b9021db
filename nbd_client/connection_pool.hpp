// The connections to one export: one, or N when the server allows multi-conn.
// Owns a [ CMD ] server subprocess too, so every connection reaches the same
// server. Loop thread only; requests go to the least-loaded usable connection.
#pragma once

#include "nbd_client/connection.hpp"
#include "nbd_client/server_process.hpp"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace nbd_client {

struct PoolOptions {
  ConnectOptions connect;
  unsigned connections = 4;  // wanted when the server advertises multi-conn
  bool pass_server_stderr = false;
};

class ConnectionPool {
 public:
  explicit ConnectionPool(asio::any_io_executor executor) : executor_(executor) {}

  // Connects the first connection, then the rest if the server and target allow.
  // On failure: an error and a one-line reason in error_message().
  asio::awaitable<std::error_code> async_connect(const Target& target, PoolOptions options);

  const ExportInfo& info() const { return connections_.front()->info(); }
  const std::string& error_message() const { return error_message_; }
  std::size_t size() const { return connections_.size(); }
  // A note on why fewer connections were opened than asked for (empty if none).
  const std::string& note() const { return note_; }

  // The usable connection with the fewest commands in flight (the first if none
  // is usable: its commands then fail at once with ENOTCONN).
  Connection& pick();

  // Called once per connection lost, with its index and the reason.
  std::function<void(std::size_t index, const std::string& reason)> on_lost;

  void cancel_connect();
  void close();

 private:
  asio::any_io_executor executor_;
  std::vector<std::unique_ptr<Connection>> connections_;
  ServerProcess server_;
  std::string error_message_;
  std::string note_;
};

}  // namespace nbd_client
