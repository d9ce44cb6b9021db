// Multi-conn pool and reconnection; see connection_pool.hpp.
#include "nbd_client/connection_pool.hpp"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/redirect_error.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <cerrno>

namespace nbd_client {

namespace {

using clock = std::chrono::steady_clock;

long long milliseconds_since(clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - start).count();
}

}  // namespace

bool is_connection_failure(std::error_code error) {
  switch (error.value()) {
    case ENOTCONN:
    case ESHUTDOWN:
    case ECONNRESET:
    case ECONNABORTED:
    case EPIPE:
      return bool(error);
    default:
      return false;
  }
}

asio::awaitable<std::error_code> ConnectionPool::async_connect(const Target& requested, PoolOptions options) {
  options_ = options;
  target_ = requested;
  if (target_.kind == Target::Kind::command) {
    std::string socket_path;
    if (auto error = server_.start(target_.command, options.pass_server_stderr, socket_path, error_message_))
      co_return error;
    target_was_command_ = true;
    target_.kind = Target::Kind::unix_socket;
    target_.unix_path = socket_path;
  }
  connections_.push_back(std::make_unique<Connection>(executor_));
  reconnecting_.push_back(false);
  std::error_code error = co_await connections_.front()->async_connect(target_, options.connect);
  if (error) {
    std::string how;
    if (target_was_command_ && server_.exited(how))
      error_message_ = "the server command failed to start (" + how + ")";
    else
      error_message_ = connections_.front()->error_message();
    server_.stop();
    co_return error;
  }
  info_ = connections_.front()->info();
  unsigned wanted = std::max(1u, options.connections);
  if (wanted > 1 && !info_.can_multi_conn) {
    note_ = "the server does not advertise multi-conn: using one connection";
    wanted = 1;
  } else if (wanted > 1 && target_.kind == Target::Kind::socket_fd) {
    note_ = "--fd gives one socket: using one connection";
    wanted = 1;
  }
  for (unsigned index = 1; index < wanted; ++index) {
    connections_.push_back(std::make_unique<Connection>(executor_));
    reconnecting_.push_back(false);
    if (auto failed = co_await connect_slot(index)) {
      note_ = "connection " + std::to_string(index + 1) + " failed (" + connections_.back()->error_message() +
              "): using " + std::to_string(index);
      retired_.push_back(std::move(connections_.back()));
      connections_.pop_back();
      reconnecting_.pop_back();
      break;
    }
  }
  for (std::size_t index = 0; index < connections_.size(); ++index)
    connections_[index]->on_lost = [this, index](const std::string& reason) { lost(index, reason); };
  co_return std::error_code{};
}

// Connects connections_[index] (a fresh Connection) and checks that it sees the
// export every other connection saw.
asio::awaitable<std::error_code> ConnectionPool::connect_slot(std::size_t index) {
  Connection& connection = *connections_[index];
  connection.set_index(index);
  if (auto error = co_await connection.async_connect(target_, options_.connect)) co_return error;
  const ExportInfo& seen = connection.info();
  if (seen.size != info_.size || seen.read_only != info_.read_only) {
    export_changed_ = true;
    error_message_ = "the export changed (size " + std::to_string(info_.size) + " -> " + std::to_string(seen.size) +
                     (seen.read_only != info_.read_only ? ", read-only flag changed" : "") + ")";
    connection.close();
    co_return std::error_code(ESTALE, std::generic_category());
  }
  co_return std::error_code{};
}

bool ConnectionPool::any_usable() const {
  return std::any_of(connections_.begin(), connections_.end(), [](const auto& c) { return c->usable(); });
}

bool ConnectionPool::reconnectable() const {
  // A [ CMD ] server or an inherited fd cannot be reached again.
  return !target_was_command_ && target_.kind != Target::Kind::socket_fd && options_.retry_timeout.count() > 0;
}

void ConnectionPool::lost(std::size_t index, const std::string& reason) {
  if (closed_) return;
  ++disconnects_;
  if (on_connection_lost) on_connection_lost(index);
  if (!in_outage_ && !any_usable()) {
    in_outage_ = true;
    gave_up_ = false;
    outage_started_ = clock::now();
  }
  std::string which = connections_.size() > 1
                          ? "connection " + std::to_string(index + 1) + " of " + std::to_string(connections_.size())
                          : "the connection";
  if (!reconnectable()) {
    say("lost " + which + " to the server (" + reason + "); requests on it fail with EIO");
    wake_waiters();
    return;
  }
  say("lost " + which + " to the server (" + reason + "); reconnecting for up to " +
      std::to_string(options_.retry_timeout.count() / 1000) + " s");
  if (!reconnecting_[index]) asio::co_spawn(executor_, reconnect(index), asio::detached);
}

// Retries with backoff until connected, the export turns out different, or the
// retry timeout has passed with no usable connection at all.
asio::awaitable<void> ConnectionPool::reconnect(std::size_t index) {
  reconnecting_[index] = true;
  auto started = clock::now();
  auto delay = std::chrono::milliseconds(50);
  asio::steady_timer pause(executor_);
  for (;;) {
    retired_.push_back(std::move(connections_[index]));
    connections_[index] = std::make_unique<Connection>(executor_);
    std::error_code error = co_await connect_slot(index);
    if (closed_) break;
    if (!error) {
      connections_[index]->on_lost = [this, index](const std::string& reason) { lost(index, reason); };
      ++reconnects_;
      if (on_connection_restored) on_connection_restored(index, clock::now() - started);
      say("reconnected " +
          (connections_.size() > 1 ? "connection " + std::to_string(index + 1) : std::string("to the server")) +
          " after " + std::to_string(milliseconds_since(started)) + " ms");
      if (in_outage_) {
        in_outage_ = false;
        gave_up_ = false;
      }
      break;
    }
    if (export_changed_) {
      say("refusing to reconnect: " + error_message_ + "; every request now fails with EIO");
      gave_up_ = true;
      break;
    }
    if (in_outage_ && !gave_up_ && clock::now() - outage_started_ >= options_.retry_timeout) {
      gave_up_ = true;
      say("the server has not come back within " + std::to_string(options_.retry_timeout.count() / 1000) +
          " s; requests fail with EIO (each new request tries to reconnect once)");
      wake_waiters();
      break;
    }
    if (gave_up_) break;  // a one-shot attempt made on behalf of a request
    pause.expires_after(delay);
    std::error_code ignored;
    co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
    if (closed_) break;
    delay = std::min(delay * 2, std::chrono::milliseconds(1000));
  }
  reconnecting_[index] = false;
  wake_waiters();
}

asio::awaitable<Connection*> ConnectionPool::usable_connection() {
  bool tried_once = false;
  for (;;) {
    if (any_usable()) co_return &pick();
    if (closed_ || export_changed_ || !reconnectable()) co_return nullptr;
    if (gave_up_) {
      // Past the retry timeout: one attempt per request, then fail.
      if (tried_once) co_return nullptr;
      tried_once = true;
      if (!reconnecting_[0]) asio::co_spawn(executor_, reconnect(0), asio::detached);
    }
    bool someone_reconnecting = std::find(reconnecting_.begin(), reconnecting_.end(), true) != reconnecting_.end();
    if (!someone_reconnecting && !gave_up_) {
      // Lost before anyone noticed (e.g. a failed command raced the loss report).
      asio::co_spawn(executor_, reconnect(0), asio::detached);
    }
    co_await wait_for_change(outage_started_ + options_.retry_timeout + std::chrono::seconds(1));
  }
}

asio::awaitable<void> ConnectionPool::wait_for_change(clock::time_point deadline) {
  asio::steady_timer wake(executor_, std::max(deadline, clock::now() + std::chrono::milliseconds(100)));
  auto waiting = waiters_.insert(waiters_.end(), &wake);
  std::error_code ignored;
  co_await wake.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
  waiters_.erase(waiting);
}

void ConnectionPool::wake_waiters() {
  for (asio::steady_timer* waiter : waiters_) waiter->cancel();
}

Connection* ConnectionPool::least_loaded_usable() {
  Connection* best = nullptr;
  for (auto& connection : connections_) {
    if (!connection->usable()) continue;
    if (!best || connection->in_flight() < best->in_flight()) best = connection.get();
  }
  return best;
}

Connection& ConnectionPool::pick() {
  Connection* best = least_loaded_usable();
  return best ? *best : *connections_.front();
}

void ConnectionPool::cancel_connect() {
  for (auto& connection : connections_) connection->cancel_connect();
}

void ConnectionPool::close() {
  closed_ = true;
  for (auto& connection : connections_) connection->close();
  for (auto& connection : retired_) connection->close();
  server_.stop();
  wake_waiters();
}

}  // namespace nbd_client
