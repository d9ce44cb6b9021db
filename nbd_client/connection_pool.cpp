// Multi-conn pool; see connection_pool.hpp.
#include "nbd_client/connection_pool.hpp"

namespace nbd_client {

asio::awaitable<std::error_code> ConnectionPool::async_connect(const Target& requested, PoolOptions options) {
  Target target = requested;
  if (target.kind == Target::Kind::command) {
    std::string socket_path;
    if (auto error = server_.start(target.command, options.pass_server_stderr, socket_path, error_message_))
      co_return error;
    target.kind = Target::Kind::unix_socket;
    target.unix_path = socket_path;
  }
  connections_.push_back(std::make_unique<Connection>(executor_));
  std::error_code error = co_await connections_.front()->async_connect(target, options.connect);
  if (error) {
    std::string how;
    if (requested.kind == Target::Kind::command && server_.exited(how))
      error_message_ = "the server command failed to start (" + how + ")";
    else
      error_message_ = connections_.front()->error_message();
    server_.stop();
    co_return error;
  }
  const ExportInfo& first = connections_.front()->info();
  unsigned wanted = std::max(1u, options.connections);
  if (wanted > 1 && !first.can_multi_conn) {
    note_ = "the server does not advertise multi-conn: using one connection";
    wanted = 1;
  } else if (wanted > 1 && target.kind == Target::Kind::socket_fd) {
    note_ = "--fd gives one socket: using one connection";
    wanted = 1;
  }
  for (unsigned index = 1; index < wanted; ++index) {
    auto extra = std::make_unique<Connection>(executor_);
    if (co_await extra->async_connect(target, options.connect)) {
      note_ = "connection " + std::to_string(index + 1) + " failed (" + extra->error_message() + "): using " +
              std::to_string(index);
      break;
    }
    // All connections must describe the same export.
    if (extra->info().size != first.size || extra->info().read_only != first.read_only) {
      note_ = "connection " + std::to_string(index + 1) + " saw a different export: using " + std::to_string(index);
      extra->close();
      break;
    }
    connections_.push_back(std::move(extra));
  }
  for (std::size_t index = 0; index < connections_.size(); ++index) {
    connections_[index]->on_lost = [this, index](const std::string& reason) {
      if (on_lost) on_lost(index, reason);
    };
  }
  co_return std::error_code{};
}

Connection& ConnectionPool::pick() {
  Connection* best = nullptr;
  for (auto& connection : connections_) {
    if (!connection->usable()) continue;
    if (!best || connection->in_flight() < best->in_flight()) best = connection.get();
  }
  return best ? *best : *connections_.front();
}

void ConnectionPool::cancel_connect() {
  for (auto& connection : connections_) connection->cancel_connect();
}

void ConnectionPool::close() {
  for (auto& connection : connections_) connection->close();
  server_.stop();
}

}  // namespace nbd_client
