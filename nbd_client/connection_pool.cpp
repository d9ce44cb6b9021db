// Multi-conn pool and reconnection; see connection_pool.hpp.
#include "nbd_client/connection_pool.hpp"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/post.hpp>
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

std::string export_change(const ExportInfo& was, const ExportInfo& now, bool several_connections) {
  std::string change;
  auto note = [&change](const std::string& what) { change += (change.empty() ? "" : ", ") + what; };
  auto number = [&note](const char* name, std::uint64_t before, std::uint64_t after) {
    if (before != after) note(std::string(name) + " " + std::to_string(before) + " -> " + std::to_string(after));
  };
  auto flag = [&note](const char* name, bool before, bool after) {
    if (before != after) note(std::string(name) + (after ? " added" : " dropped"));
  };
  number("size", was.size, now.size);
  if (was.read_only != now.read_only) note("read-only flag changed");
  number("minimum block", was.minimum_block, now.minimum_block);
  number("maximum request", was.maximum_request, now.maximum_request);
  flag("flush", was.can_flush, now.can_flush);
  flag("FUA", was.can_fua, now.can_fua);
  flag("write zeroes", was.can_zero, now.can_zero);
  flag("trim", was.can_trim, now.can_trim);
  if (several_connections) flag("multi-conn", was.can_multi_conn, now.can_multi_conn);
  return change;
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
  roles_.push_back(Role::data_and_status);
  std::error_code error = co_await connect_first(options.wait_for_server);
  if (error) {
    std::string how;
    if (target_was_command_ && server_.exited(how, std::chrono::seconds(1)))
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
  // Block status on its own connection sees the data connections' writes only
  // when the server shares one cache among connections: multi-conn says so.
  bool split = options.replies == ReplyMode::automatic && info_.can_multi_conn && info_.can_block_status &&
               target_.kind != Target::Kind::socket_fd;
  // Large writes on a connection of their own see the same cache only under multi-conn.
  bool large_write_connection = options.threads == ThreadMode::large_writes && info_.can_multi_conn &&
                                !info_.read_only && target_.kind != Target::Kind::socket_fd;
  if (split) {
    roles_.front() = Role::status;
    co_await open_connections(wanted, Role::data);
    if (connections_.size() > 1 && large_write_connection) co_await open_connections(1, Role::large_writes);
    if (connections_.size() == 1) {
      roles_.front() = Role::data_and_status;  // no second connection: the first does everything
    } else {
      // The status connection goes last, so that data connections are numbered 0..N-1.
      std::rotate(connections_.begin(), connections_.begin() + 1, connections_.end());
      std::rotate(roles_.begin(), roles_.begin() + 1, roles_.end());
    }
  } else {
    co_await open_connections(wanted - 1, Role::data_and_status);
    if (large_write_connection && connections_.size() == wanted) co_await open_connections(1, Role::large_writes);
  }
  last_write_.assign(connections_.size(), 0);
  flushed_.assign(connections_.size(), 0);
  made_.assign(connections_.size(), connections_made_);
  last_loss_.assign(connections_.size(), 0);
  for (std::size_t index = 0; index < connections_.size(); ++index) {
    connections_[index]->set_index(index);
    watch(index);
  }
  // A connection lost while the others were being made had no one to tell (a loop
  // connection reports at once; a threaded one is not armed before the mount). Told
  // once the caller has resumed and set on_event and the statistics hooks (posted:
  // it runs when the caller first waits), so that the outage, and with it
  // --retry-timeout, starts, and the reconnect.
  for (std::size_t index = 0; index < connections_.size(); ++index)
    if (connections_[index]->was_lost())
      asio::post(executor_, [this, index, connection = connections_[index].get()] {
        if (connections_[index].get() != connection || closed_) return;
        lost(index, connection->error_message().empty() ? "the server closed the connection"
                                                        : connection->error_message());
      });
  co_return std::error_code{};
}

// --wait-for-server: a server started alongside the bridge (a CI script's `nbdkit -U
// sock ... &` just before it) may not listen yet. Only a server that is not there is
// waited for (server_absent(): no socket at the path, ECONNREFUSED); one that is there
// and refuses (TLS, no such export, a bad handshake) fails the mount at once, as does
// anything else. A host name that does not resolve is not waited through either:
// libnbd says only gai_strerror()'s words for it, no errno, so a name that may resolve
// later (EAI_AGAIN) cannot be told from one that never will (a typo), which would then
// keep the mount waiting in silence; and the server the option is for runs beside the
// bridge, under an address or a name that resolves already, only not listening yet.
// The wait is measured from the first attempt; the last attempt is made at its end.
asio::awaitable<std::error_code> ConnectionPool::connect_first(std::chrono::milliseconds wait_for_server) {
  Connection& connection = *connections_.front();
  const ConnectOptions options = options_for(Role::data_and_status);
  const bool may_wait = wait_for_server.count() > 0 && !target_was_command_ && target_.kind != Target::Kind::socket_fd;
  const auto wait_ends = clock::now() + wait_for_server;
  for (bool said = false;;) {
    if (connect_cancelled_) co_return std::error_code(ECANCELED, std::generic_category());
    std::error_code error = co_await connection.async_connect(target_, options);
    if (!error || !may_wait || !server_absent(error) || connect_cancelled_) co_return error;
    const auto now = clock::now();
    if (now >= wait_ends) co_return error;
    if (!std::exchange(said, true) && on_waiting_for_server) on_waiting_for_server(connection.error_message());
    server_wait_pause_.expires_after(std::min<clock::duration>(server_wait_interval, wait_ends - now));
    std::error_code ignored;
    co_await server_wait_pause_.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
  }
}

void ConnectionPool::write_acknowledged(const Connection& connection) {
  const std::size_t index = connection.index();
  ++write_epoch_;
  if (index < last_write_.size() && connections_[index].get() == &connection && !connection.was_lost()) {
    last_write_[index] = write_epoch_;
    return;
  }
  // Its reply came with the loss (delivered after the loss was accounted): the write
  // shares the lost connection's fate rather than the replacement's.
  lost_unflushed_ = write_epoch_;
  writes_went_with_a_connection(write_epoch_, index < made_.size() ? made_[index] : 0);
}

// Writes up to `epoch` went with a lost connection (made at `made`) before a flush
// covered them.
void ConnectionPool::writes_went_with_a_connection(std::uint64_t epoch, std::uint64_t made) {
  // Under multi-conn, while a connection made no later than the lost one is served,
  // the server it wrote to is alive with the writes in its cache, for a flush on that
  // connection to cover (flush_succeeded()).
  if (info_.can_multi_conn && usable_connection_made_by(made)) {
    orphaned_made_ = orphaned_writes_ ? std::min(orphaned_made_, made) : made;
    orphaned_writes_ = std::max(orphaned_writes_, epoch);
  } else {
    ++unknown_writes_events_;
  }
}

// Under multi-conn a flush covers what every connection to the same server had
// acknowledged. The one it went on is alive, so every connection made after it found
// that same server and writes through it. One made before it may talk to a server that
// has gone since (its host died without a reset, or the connection is not yet seen to
// be lost) while this one reached its successor: those writes stay uncovered until a
// flush on a connection as old covers them, or their connection's loss tells fsync.
void ConnectionPool::flush_succeeded(std::size_t index, std::uint64_t mark) {
  if (mark >= lost_unflushed_) lost_unflushed_ = 0;  // sent after the losses: covers what the server kept
  if (index >= flushed_.size()) return;
  if (!info_.can_multi_conn) {
    flushed_[index] = std::max(flushed_[index], mark);
    return;
  }
  for (std::size_t slot = 0; slot < flushed_.size(); ++slot)
    if (made_[slot] >= made_[index]) flushed_[slot] = std::max(flushed_[slot], mark);
  if (orphaned_writes_ && orphaned_writes_ <= mark && orphaned_made_ >= made_[index]) orphaned_writes_ = 0;
}

bool ConnectionPool::holds_unflushed_writes(std::size_t index) const {
  return index < last_write_.size() && last_write_[index] > flushed_[index];
}

bool ConnectionPool::has_unflushed_writes() const {
  if (orphaned_writes_ || lost_unflushed_) return true;
  for (std::size_t index = 0; index < last_write_.size(); ++index)
    if (holds_unflushed_writes(index)) return true;
  return false;
}

bool ConnectionPool::usable_connection_made_by(std::uint64_t made) const {
  for (std::size_t index = 0; index < connections_.size(); ++index)
    if (index < made_.size() && made_[index] <= made && connections_[index]->usable()) return true;
  return false;
}

// Connections made together count as made at once, as those of the mount do: a
// reconnect when none is usable starts such a wave, and reconnects within
// made_wave_span join it, unless a loss has come in between (a loss may mean the
// server changed, so a connection made after it may reach another server than one made
// before; a loss a thread has seen and not yet posted counts too). Otherwise every
// connection made in one outage would be younger than the first, and a later drop of
// that one alone would leave its writes with nothing old enough to vouch for them.
std::uint64_t ConnectionPool::made_for_reconnect(std::size_t index) {
  bool another_usable = false, another_lost = false;
  for (std::size_t slot = 0; slot < connections_.size(); ++slot) {
    if (slot == index) continue;
    if (connections_[slot]->usable()) another_usable = true;
    if (connections_[slot]->was_lost() && !reconnecting_[slot]) another_lost = true;
  }
  if (!another_usable) {
    made_wave_open_ = true;
    made_wave_opened_at_ = clock::now();
    return ++connections_made_;
  }
  if (made_wave_open_ && !another_lost && clock::now() - made_wave_opened_at_ <= made_wave_span)
    return connections_made_;
  made_wave_open_ = false;
  return ++connections_made_;
}

// Called as connection `index` is lost, before it is replaced.
void ConnectionPool::account_lost_writes(std::size_t index) {
  made_wave_open_ = false;
  if (holds_unflushed_writes(index)) {
    lost_unflushed_ = ++write_epoch_;
    writes_went_with_a_connection(last_write_[index], made_[index]);
  }
  if (orphaned_writes_ && !usable_connection_made_by(orphaned_made_)) {
    ++unknown_writes_events_;  // every connection that could cover them went before a flush did
    orphaned_writes_ = 0;
  }
  if (index < last_write_.size()) last_write_[index] = flushed_[index] = 0;  // the slot's next connection starts clean
}

ConnectOptions ConnectionPool::options_for(Role role) const {
  ConnectOptions connect = options_.connect;
  // The large-write connection reads nothing, so it never needs structured replies.
  if (role == Role::data || (role == Role::large_writes && options_.replies != ReplyMode::structured) ||
      options_.replies == ReplyMode::simple)
    connect.structured_replies = false;
  connect.own_thread = options_.threads == ThreadMode::all || role == Role::large_writes;
  connect.hold_thread = options_.hold_threads && !threads_released_;
  return connect;
}

// Appends up to `count` connections of one role; stops at the first failure, with a note.
asio::awaitable<void> ConnectionPool::open_connections(unsigned count, Role role) {
  for (unsigned opened = 0; opened < count; ++opened) {
    std::size_t index = connections_.size();
    connections_.push_back(std::make_unique<Connection>(executor_));
    reconnecting_.push_back(false);
    roles_.push_back(role);
    if (co_await connect_slot(index)) {
      std::string why = export_changed_ ? error_message_ : connections_.back()->error_message();
      export_changed_ = false;  // the mount goes on with the connections that agree
      note_ = "connection " + std::to_string(index + 1) + " failed (" + why + "): using " + std::to_string(index);
      retire(std::move(connections_.back()));
      connections_.pop_back();
      reconnecting_.pop_back();
      roles_.pop_back();
      co_return;
    }
  }
}

// For messages: "the connection", "connection 2 of 4", "the block-status connection".
std::string ConnectionPool::describe(std::size_t index) const {
  if (roles_[index] == Role::status) return "the block-status connection";
  if (roles_[index] == Role::large_writes) return "the large-write connection";
  std::size_t data_connections = 0;
  for (Role role : roles_) data_connections += role == Role::data || role == Role::data_and_status;
  if (data_connections == 1) return "the connection";
  return "connection " + std::to_string(index + 1) + " of " + std::to_string(data_connections);
}

bool ConnectionPool::serves(std::size_t index, Purpose purpose) const {
  if (purpose == Purpose::flush) return true;  // any connection reaches the server's cache
  switch (roles_[index]) {
    case Role::data_and_status:
      return true;
    case Role::data:
      return purpose == Purpose::data || purpose == Purpose::large_read;
    case Role::status:
      return purpose == Purpose::block_status || purpose == Purpose::large_read || purpose == Purpose::large_write;
    case Role::large_writes:
      return purpose == Purpose::large_write;
  }
  return false;
}

const char* ConnectionPool::role_name(std::size_t index) const {
  switch (roles_[index]) {
    case Role::status:
      return "block_status";
    case Role::large_writes:
      return "large_writes";
    default:
      return "data";
  }
}

// Connects connections_[index] (a fresh Connection) and checks that it sees the
// export every other connection saw.
asio::awaitable<std::error_code> ConnectionPool::connect_slot(std::size_t index, std::chrono::milliseconds timeout) {
  Connection& connection = *connections_[index];
  connection.set_index(index);
  ConnectOptions options = options_for(roles_[index]);
  if (timeout.count() > 0) options.timeout = std::min(options.timeout, timeout);
  if (auto error = co_await connection.async_connect(target_, options)) co_return error;
  std::string change = export_change(info_, connection.info(), connections_.size() > 1);
  if (!change.empty()) {
    export_changed_ = true;
    error_message_ = "the export changed (" + change + ")";
    connection.close();
    co_return std::error_code(ESTALE, std::generic_category());
  }
  // Not a change that refuses the export: the data is the same, only its map is gone
  // (Connection answers block status with "all data" from then on).
  if (info_.can_block_status && options.structured_replies && roles_[index] != Role::large_writes &&
      !connection.info().can_block_status && !std::exchange(block_status_loss_said_, true))
    say(describe(index) + " came back without block status (base:allocation): SEEK_DATA, SEEK_HOLE and st_blocks "
        "now take all of the export as data");
  co_return std::error_code{};
}

bool ConnectionPool::any_usable(Purpose purpose) const {
  for (std::size_t index = 0; index < connections_.size(); ++index)
    if (serves(index, purpose) && connections_[index]->usable()) return true;
  return false;
}

bool ConnectionPool::reconnectable() const {
  // A [ CMD ] server or an inherited fd cannot be reached again.
  return !target_was_command_ && target_.kind != Target::Kind::socket_fd && options_.retry_timeout.count() > 0;
}

void ConnectionPool::watch(std::size_t index) {
  connections_[index]->on_lost = [this, index](const std::string& reason) { lost(index, reason); };
  connections_[index]->on_server_shutdown = [this, index, connection = connections_[index].get()] {
    server_shutting_down(index, *connection);
  };
}

// Every connection goes to the same server (multi-conn, or one server process), and
// it leaves only once all have: each drains, then the usual reconnect follows. Not
// drained (the command fails): a target that cannot be reached again ([ CMD ], --fd,
// --retry-timeout 0), whose connections stay while the server serves them; and a
// server that says so again within refusal_window of the last such reconnect, which
// refuses rather than leaves (a plugin failing with ESHUTDOWN, an error filter): at
// most one drain per window, not one per refused command.
void ConnectionPool::server_shutting_down(std::size_t index, const Connection& reporter) {
  if (closed_ || !reconnectable()) return;
  // A report from a connection this stop has drained already (a connection thread
  // checks before the drain reaches it, and posts), or from one replaced since: the
  // same stop, said and handled. Only a connection made after it speaks of a new one.
  if (connections_[index].get() != &reporter || reporter.drain_requested()) return;
  if (shutdown_drained_at_ && clock::now() - *shutdown_drained_at_ < refusal_window) {
    if (!refusal_reported_)
      say("the server refused a request as shutting down again right after the reconnect: "
          "taken for a refusal (EIO) for " + std::to_string(refusal_window.count()) + " s");
    refusal_reported_ = true;
    return;
  }
  shutdown_drained_at_ = clock::now();
  drain_found_server_gone_ = false;
  refusal_reported_ = false;
  say("the server is shutting down (it told " + describe(index) +
      "): closing every connection once its requests are answered");
  for (auto& connection : connections_) connection->drain();
}

void ConnectionPool::lost(std::size_t index, const std::string& reason) {
  if (closed_) return;
  ++disconnects_;
  if (index < last_loss_.size()) last_loss_[index] = disconnects_;
  account_lost_writes(index);
  if (on_connection_lost) on_connection_lost(index);
  if (!in_outage_ && !any_usable()) {
    in_outage_ = true;
    gave_up_ = false;
    outage_started_ = clock::now();
  }
  std::string which = describe(index);
  if (!reconnectable()) {
    say("lost " + which + " to the server (" + reason + "); requests on it fail with EIO");
    wake_waiters();
    return;
  }
  say("lost " + which + " to the server (" + reason + "); reconnecting for up to " +
      std::to_string(options_.retry_timeout.count() / 1000) + " s");
  start_reconnect(index);
}

// Retries with backoff until connected, the export turns out different, or the
// retry timeout has passed with no usable connection at all.
asio::awaitable<void> ConnectionPool::reconnect(std::size_t index) {
  reconnecting_[index] = true;
  // Only the reconnect that follows a graceful stop's drain starts refusal_window: one
  // after a dropped connection must not make the next graceful stop look like a refusal.
  const bool after_shutdown_drain = connections_[index]->drain_requested();
  auto started = clock::now();
  auto delay = std::chrono::milliseconds(50);
  // Each attempt's handshake gets first_attempt_limit, doubling up to the connect
  // timeout: a listener that takes the connection and never answers (a hung server, or
  // one stopping with its socket still open) must not hold the slot for the whole
  // connect timeout while a working server may have taken its place.
  auto attempt_limit = first_attempt_limit;
  int attempts = 0;
  asio::steady_timer pause(executor_);
  for (;;) {
    // A connection that was established may still have commands and handlers referring
    // to it: retire it. One whose connect failed holds no handle and no thread: reuse it,
    // so a long outage does not pile up retired connections.
    if (connections_[index]->was_established()) {
      // Closed at once (its thread joined, its dead handle freed: a link that keeps
      // dropping must not pile up threads); the object itself stays for the handlers.
      connections_[index]->close();
      retire(std::move(connections_[index]));
      connections_[index] = std::make_unique<Connection>(executor_);
    }
    // A server that accepts and never answers must not hold requests past the retry
    // timeout: no attempt outlasts what is left of it (nor, after giving up, the whole
    // of it for a request's one attempt).
    auto budget = options_.retry_timeout;
    if (in_outage_ && !gave_up_)
      budget = std::chrono::duration_cast<std::chrono::milliseconds>(outage_started_ + options_.retry_timeout -
                                                                     clock::now());
    budget = std::max(budget, std::chrono::milliseconds(100));
    if (!gave_up_) budget = std::min(budget, attempt_limit);  // after giving up, one attempt with all of it
    ++attempts;
    const auto attempt_started = clock::now();
    std::error_code error = co_await connect_slot(index, budget);
    // Only an attempt that used all of its time doubles the next one's: quick refusals
    // while the server is away leave it short for when a hung listener appears.
    if (error && clock::now() - attempt_started >= attempt_limit)
      attempt_limit = std::min(attempt_limit * 2, std::chrono::milliseconds(std::chrono::hours(1)));
    if (closed_) break;
    if (!error) {
      watch(index);
      say_if_thread_refused(index);
      ++reconnects_;
      if (index < made_.size()) made_[index] = made_for_reconnect(index);
      // refusal_window runs from here, but only when the server was back at the first
      // attempt of every reconnect after the drain: one that stopped for real was gone
      // a while, and what answers after that is a new server, whose own stop (an admin
      // restarting twice) is a stop again. Whichever connection finds that decides.
      if (after_shutdown_drain) {
        if (attempts > 1) drain_found_server_gone_ = true;
        if (drain_found_server_gone_)
          shutdown_drained_at_.reset();
        else
          shutdown_drained_at_ = clock::now();
      }
      if (on_connection_restored) on_connection_restored(index, clock::now() - started);
      say("reconnected " + describe(index) + " after " + std::to_string(milliseconds_since(started)) + " ms");
      // The outage (no data connection at all) ends with a data connection, not with the
      // block-status one: until then the data connections' retry timeout still runs.
      if (in_outage_ && any_usable(Purpose::data)) {
        bool had_given_up = gave_up_;
        in_outage_ = false;
        gave_up_ = false;
        // After giving up, only this connection was tried (once, for a request): the
        // server is back, so bring the others back too.
        if (had_given_up)
          for (std::size_t other = 0; other < connections_.size(); ++other)
            if (other != index && !connections_[other]->usable() && !connections_[other]->draining())
              start_reconnect(other);
      }
      break;
    }
    if (export_changed_) {
      if (!std::exchange(export_change_said_, true))  // once, not once per connection
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

// co_spawn dispatches: on the loop thread the reconnect runs inline up to its
// first wait, so a connect that fails at once has finished, and woken nobody,
// before the caller starts waiting. Returns whether it is still running.
bool ConnectionPool::start_reconnect(std::size_t index) {
  if (!reconnecting_[index]) asio::co_spawn(executor_, reconnect(index), asio::detached);
  return reconnecting_[index];
}

asio::awaitable<Connection*> ConnectionPool::usable_connection(Purpose purpose, const bool* abandoned) {
  constexpr auto grace = std::chrono::seconds(1);  // for the reconnect's own give-up to come first
  purpose = fallback(purpose);  // waiting: any data connection will do
  bool tried_once = false;
  bool waited_for_the_retries = false;  // pending when the pool gave up: fail then
  auto waiting_since = clock::now();
  std::size_t first = 0;  // the first connection serving purpose: the one to revive
  while (first + 1 < connections_.size() && !serves(first, purpose)) ++first;
  for (;;) {
    if (abandoned && *abandoned) co_return nullptr;
    if (any_usable(purpose)) co_return &pick(purpose);
    if (closed_ || export_changed_ || !reconnectable()) co_return nullptr;
    // Only this purpose's connection is down (the outage logic watches data
    // connections): bound the wait by the retry timeout on its own.
    if (purpose != Purpose::data && any_usable(Purpose::data) &&
        clock::now() - waiting_since >= options_.retry_timeout)
      co_return nullptr;
    // Past the retry timeout with no give-up said only because an attempt is still
    // under way (a slow name resolution): the timeout binds the requests anyway.
    if (in_outage_ && !gave_up_ && clock::now() >= outage_started_ + options_.retry_timeout + grace)
      co_return nullptr;
    if (gave_up_) {
      // Pending requests fail as the pool gives up; a new one makes one attempt, and
      // fails once it is over (another connection's attempt ending wakes us too).
      if (waited_for_the_retries) co_return nullptr;
      if (!tried_once) {
        tried_once = true;
        // (A draining connection is reconnected once it has closed: wait for that.)
        if (!connections_[first]->draining() && !start_reconnect(first)) continue;  // over: look again
      } else if (!reconnecting_[first] && !connections_[first]->draining()) {
        co_return nullptr;
      }
    } else {
      // A draining connection is reconnected once it has closed; not before, or its
      // commands in flight would be given up and sent again.
      bool someone_reconnecting =
          std::find(reconnecting_.begin(), reconnecting_.end(), true) != reconnecting_.end() ||
          std::any_of(connections_.begin(), connections_.end(), [](const auto& c) { return c->draining(); });
      // Lost before anyone noticed (e.g. a failed command raced the loss report): the
      // outage starts now, or the retry timeout would never bind this wait.
      if (!someone_reconnecting) {
        if (!in_outage_ && !any_usable()) {
          in_outage_ = true;
          outage_started_ = clock::now();
        }
        if (!start_reconnect(first)) continue;
      }
      waited_for_the_retries = true;
    }
    // After giving up, a request's own attempt gets the whole retry timeout.
    co_await wait_for_change((in_outage_ && !gave_up_ ? outage_started_ : waiting_since) + options_.retry_timeout +
                             grace);
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

// A flush goes to the connection made first, whatever its role: under multi-conn it
// then covers the writes of every connection (flush_succeeded()).
Connection* ConnectionPool::first_made_usable() {
  Connection* best = nullptr;
  std::uint64_t best_made = 0;
  for (std::size_t index = 0; index < connections_.size() && index < made_.size(); ++index) {
    Connection* connection = connections_[index].get();
    if (!connection->usable()) continue;
    if (!best || made_[index] < best_made ||
        (made_[index] == best_made && connection->in_flight() < best->in_flight())) {
      best = connection;
      best_made = made_[index];
    }
  }
  return best;
}

Connection* ConnectionPool::least_loaded_usable(Purpose purpose) {
  if (purpose == Purpose::flush) return first_made_usable();
  Connection* best = nullptr;
  for (std::size_t index = 0; index < connections_.size(); ++index) {
    Connection* connection = connections_[index].get();
    if (!serves(index, purpose) || !connection->usable()) continue;
    if (!best || connection->in_flight() < best->in_flight()) best = connection;
  }
  if (!best && fallback(purpose) != purpose) return least_loaded_usable(fallback(purpose));
  return best;
}

Connection& ConnectionPool::pick(Purpose purpose) {
  if (Connection* best = least_loaded_usable(purpose)) return *best;
  purpose = fallback(purpose);
  for (std::size_t index = 0; index < connections_.size(); ++index)
    if (serves(index, purpose)) return *connections_[index];
  return *connections_.front();
}

void ConnectionPool::cancel_connect() {
  connect_cancelled_ = true;
  server_wait_pause_.cancel();
  for (auto& connection : connections_) connection->cancel_connect();
}

// A link that keeps dropping must not pile up replaced connections, yet one may be
// freed only once nothing the loop will run names it: not in the handler that retired
// it (several connections lost in one notify are retired in one handler, and a sweep
// there freed one whose cancelled waits were still queued: ASan, test_reconnect), and
// only by its own settling (a later one's would not be behind its handlers). Its
// close() cancelled its waits and a thread posts before close() joins it, so their
// handlers are queued already. The loop's io_context is single-threaded (one queue, in
// order): one post would run after them. The second keeps that true with a concurrency
// hint, where this thread's completions join the queue only after the current
// handler. A connection with memory not yet given back waits for a later settling.
void ConnectionPool::retire(std::unique_ptr<Connection> connection) {
  Connection* retiring = connection.get();
  retired_.push_back({std::move(connection)});
  asio::post(executor_, [this, retiring] {
    asio::post(executor_, [this, retiring] {
      for (auto& retired : retired_)
        if (retired.connection.get() == retiring) retired.settled = true;
      std::erase_if(retired_, [](Retired& retired) { return retired.settled && retired.connection->can_be_freed(); });
    });
  });
}

void ConnectionPool::start_held_threads() {
  threads_released_ = true;
  for (std::size_t index = 0; index < connections_.size(); ++index) {
    connections_[index]->start_held_thread();
    say_if_thread_refused(index);
  }
}

// Once per mount: --connection-threads is not what the user asked for then.
void ConnectionPool::say_if_thread_refused(std::size_t index) {
  if (thread_refusal_said_ || connections_[index]->thread_refused().empty()) return;
  thread_refusal_said_ = true;
  say("the system refused a thread for " + describe(index) + " (" + connections_[index]->thread_refused() +
      "): the event loop drives it");
}

void ConnectionPool::close() {
  closed_ = true;
  for (auto& connection : connections_) connection->close();
  for (auto& retired : retired_) retired.connection->close();
  server_.stop();
  wake_waiters();
}

}  // namespace nbd_client
