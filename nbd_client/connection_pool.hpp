// The connections to one export: one, or N when the server allows multi-conn,
// and their reconnection. Owns a [ CMD ] server subprocess too, so every
// connection reaches the same server. Loop thread only. Requests go to the
// least-loaded usable connection; while none is usable they wait for a
// reconnect, bounded by the retry timeout.
// Reads answered with structured replies cost libnbd four recv() calls against
// two for simple replies, so when the server shares one cache among connections
// (multi-conn) the data connections use simple replies and one more connection,
// used otherwise only for a share of the large READs and WRITEs, carries block
// status. With --connection-threads writes (the default) one more connection,
// driven by a thread of its own, carries WRITEs of 128 KiB and more, again only
// where multi-conn makes that sound.
#pragma once

#include "nbd_client/connection.hpp"
#include "nbd_client/server_process.hpp"

#include <asio/steady_timer.hpp>

#include <chrono>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace nbd_client {

// How the connections ask the server to answer (--replies).
enum class ReplyMode {
  automatic,   // simple replies for data plus a structured block-status connection, when sound
  structured,  // structured replies everywhere (libnbd's default)
  simple,      // simple replies everywhere: no block status at all
};

// What a command needs from the connection it runs on. Large READs and WRITEs
// (128 KiB and more) also use the block-status connection, which is otherwise
// idle: a second socket halves how often a large payload waits for a socket
// buffer to drain (the server's, for replies) or for the server's one reader of
// the socket. Both fall back to data connections where those are all there is.
// flush: the usable connection made first, whatever its role (see flush_succeeded()).
enum class Purpose { data, block_status, large_write, large_read, flush };

// Which connections a thread of their own drives (--connection-threads).
enum class ThreadMode {
  none,          // the loop drives every connection
  large_writes,  // one more connection, on its own thread, for large WRITEs (needs multi-conn)
  all,           // every connection on a thread of its own
};

struct PoolOptions {
  ConnectOptions connect;
  ReplyMode replies = ReplyMode::automatic;
  unsigned connections = 4;  // wanted when the server advertises multi-conn
  bool pass_server_stderr = false;
  ThreadMode threads = ThreadMode::large_writes;
  // Connection threads wait for start_held_threads() (ConnectOptions::hold_thread);
  // connections made after that call start theirs at once.
  bool hold_threads = false;
  // How long requests wait for a lost server to come back; zero: fail at once.
  std::chrono::milliseconds retry_timeout = std::chrono::seconds(60);
  // How long the first connect keeps trying while nothing is there to take it
  // (server_absent()): a server started alongside the bridge may not listen yet.
  // Zero: fail at once. Not for a [ CMD ] target (its socket listens before the
  // server starts) or an --fd one (connected already).
  std::chrono::milliseconds wait_for_server{0};
};

// Errors that mean "the connection broke under the command", not "the server
// refused it": such a command was never acknowledged and may be issued again.
bool is_connection_failure(std::error_code error);

// What differs between the export a mount was made with and the one a new connection
// sees, in the terms a message can show ("size 1024 -> 2048, FUA dropped"): whatever the
// bridge plans requests by. Empty when nothing does. several_connections: multi-conn is
// needed (more than one connection shares the export).
std::string export_change(const ExportInfo& was, const ExportInfo& now, bool several_connections);

class ConnectionPool {
 public:
  explicit ConnectionPool(asio::any_io_executor executor) : executor_(executor), server_wait_pause_(executor) {}

  // Connects the first connection (waiting for the server up to
  // PoolOptions::wait_for_server), then the rest if the server and target allow.
  // On failure: an error (Connection::async_connect's; ECANCELED after
  // cancel_connect()) and a one-line reason in error_message().
  asio::awaitable<std::error_code> async_connect(const Target& target, PoolOptions options);
  // Called once if the first connect found no server and async_connect waits for one,
  // with the reason the first attempt failed.
  std::function<void(const std::string& reason)> on_waiting_for_server;

  const ExportInfo& info() const { return info_; }
  const std::string& error_message() const { return error_message_; }
  std::size_t size() const { return connections_.size(); }
  // For statistics: "data", "block_status" or "large_writes".
  const char* role_name(std::size_t index) const;
  // A note on why fewer connections were opened than asked for (empty if none).
  const std::string& note() const { return note_; }
  std::uint64_t disconnects() const { return disconnects_; }
  // Whether connection slot `index` was lost after disconnects() read `mark`.
  bool lost_since(std::size_t index, std::uint64_t mark) const {
    return index < last_loss_.size() && last_loss_[index] > mark;
  }
  std::uint64_t reconnects() const { return reconnects_; }

  // The usable connection for purpose with the fewest commands in flight (the
  // first if none is usable: its commands then fail at once with ENOTCONN).
  Connection& pick(Purpose purpose = Purpose::data);
  // The same, or nullptr when none is usable: the per-command fast path, which
  // needs no coroutine (usable_connection() costs a frame).
  Connection* least_loaded_usable(Purpose purpose = Purpose::data);

  // A usable connection, waiting through a reconnect if need be; nullptr once
  // the server has not come back within the retry timeout (after that, each
  // call makes one reconnect attempt of its own), or once *abandoned is true: the
  // request was answered meanwhile (a timeout, a signal). Whoever sets it calls
  // wake_waiters(), so the wait ends then and not at the reconnect.
  asio::awaitable<Connection*> usable_connection(Purpose purpose = Purpose::data,
                                                 const bool* abandoned = nullptr);
  void wake_waiters();
  std::chrono::milliseconds retry_timeout() const { return options_.retry_timeout; }
  // A connection serving purpose is usable now (no waiting for a reconnect).
  bool any_usable(Purpose purpose = Purpose::data) const;

  // One line per event, for stderr: losses, reconnects, giving up.
  std::function<void(const std::string& line)> on_event;
  // For statistics: a connection lost, and restored after an outage.
  std::function<void(std::size_t index)> on_connection_lost;
  std::function<void(std::size_t index, std::chrono::nanoseconds outage)> on_connection_restored;

  // Durability, loop thread only. A write acknowledged without FUA is on stable storage
  // only once a flush sent after it has succeeded: on its own connection, or under
  // multi-conn (one cache for all) on one made no later than its own (see
  // flush_succeeded(); flushes go to the oldest connection: Purpose::flush). A connection lost while holding such writes
  // leaves their fate unknown when the server may have gone with them (no connection
  // left to it): unknown_writes_events() counts such losses, and each open file is told
  // of them once, at its next fsync (FileSystem).
  void write_acknowledged(const Connection& connection);  // a write, zero or trim without FUA
  std::uint64_t flush_mark() const { return write_epoch_; }  // taken as a flush is sent
  void flush_succeeded(std::size_t index, std::uint64_t mark);
  std::uint64_t unknown_writes_events() const { return unknown_writes_events_; }
  // A flush the server answered with an error: its writes' fate is unknown too.
  void flush_failed() { ++unknown_writes_events_; }
  // Whether a write acknowledged without FUA still waits for a flush to cover it
  // (close() flushes only then).
  bool has_unflushed_writes() const;

  // Ends async_connect now (a signal): the connect under way, or the wait for the server.
  void cancel_connect();
  void close();
  // Starts the connection threads held back by PoolOptions::hold_threads.
  void start_held_threads();

 private:
  enum class Role { data_and_status, data, status, large_writes };
  bool serves(std::size_t index, Purpose purpose) const;
  // Where a command goes when no connection serves its purpose: large reads and writes to data.
  static Purpose fallback(Purpose purpose) {
    return purpose == Purpose::large_write || purpose == Purpose::large_read ? Purpose::data : purpose;
  }
  std::string describe(std::size_t index) const;
  // Whether a connection made no later than `made` (made_), whatever its role, is usable.
  bool usable_connection_made_by(std::uint64_t made) const;
  Connection* first_made_usable();
  std::uint64_t made_for_reconnect(std::size_t index);
  bool holds_unflushed_writes(std::size_t index) const;
  void account_lost_writes(std::size_t index);
  void writes_went_with_a_connection(std::uint64_t epoch, std::uint64_t made);
  ConnectOptions options_for(Role role) const;
  asio::awaitable<std::error_code> connect_first(std::chrono::milliseconds wait_for_server);
  asio::awaitable<void> open_connections(unsigned count, Role role);
  bool reconnectable() const;
  void watch(std::size_t index);  // hands the connection's events to lost() and server_shutting_down()
  void lost(std::size_t index, const std::string& reason);
  void server_shutting_down(std::size_t index, const Connection& reporter);
  asio::awaitable<void> reconnect(std::size_t index);
  bool start_reconnect(std::size_t index);
  // timeout: at most this long for the connect (0: the connect timeout alone).
  asio::awaitable<std::error_code> connect_slot(std::size_t index,
                                                std::chrono::milliseconds timeout = std::chrono::milliseconds(0));
  asio::awaitable<void> wait_for_change(std::chrono::steady_clock::time_point deadline);
  void say(const std::string& line) {
    if (on_event) on_event(line);
  }

  asio::any_io_executor executor_;
  Target target_;
  bool target_was_command_ = false;
  PoolOptions options_;
  bool threads_released_ = false;
  ExportInfo info_;
  std::vector<std::unique_ptr<Connection>> connections_;
  // Replaced connections, alive while handlers may still name them (retire()).
  struct Retired {
    std::unique_ptr<Connection> connection;
    bool settled = false;  // the handlers its close() queued have run
  };
  std::vector<Retired> retired_;
  void retire(std::unique_ptr<Connection> connection);
  void say_if_thread_refused(std::size_t index);
  bool thread_refusal_said_ = false;
  std::vector<bool> reconnecting_;
  std::vector<Role> roles_;  // parallel to connections_; a block-status connection goes last
  ServerProcess server_;
  // async_connect's pause between attempts while it waits for the server.
  asio::steady_timer server_wait_pause_;
  bool connect_cancelled_ = false;
  std::string error_message_;
  std::string note_;
  std::list<asio::steady_timer*> waiters_;
  std::chrono::steady_clock::time_point outage_started_{};
  bool in_outage_ = false;
  bool gave_up_ = false;
  bool export_changed_ = false;
  bool export_change_said_ = false;
  // server_shutting_down(): when every connection was last drained for it, or
  // reconnected after that drain at the first attempt (not after a loss for any other
  // reason); none yet, or once a reconnect after a drain needed more attempts.
  std::optional<std::chrono::steady_clock::time_point> shutdown_drained_at_;
  bool refusal_reported_ = false;
  bool drain_found_server_gone_ = false;  // a reconnect after the last drain needed more than one attempt
  bool block_status_loss_said_ = false;  // once per mount, not per reconnect
  static constexpr std::chrono::seconds refusal_window{5};
  static constexpr std::chrono::milliseconds first_attempt_limit{3000};  // see reconnect()
  // Durability bookkeeping (write_acknowledged()): epochs count acknowledged writes.
  std::uint64_t write_epoch_ = 0;
  std::vector<std::uint64_t> last_write_;  // per slot: epoch of its last acknowledged write
  std::vector<std::uint64_t> flushed_;     // per slot: epoch its flushes have covered
  // Per slot: when its connection was made, in the order of reconnects (every connection
  // made at mount is 1). Under multi-conn a flush covers the writes of connections made
  // no earlier than its own; see flush_succeeded().
  std::vector<std::uint64_t> made_;
  std::uint64_t connections_made_ = 1;
  bool made_wave_open_ = false;  // see made_for_reconnect() (the mount's connections are made equal apart)
  std::chrono::steady_clock::time_point made_wave_opened_at_{};
  static constexpr std::chrono::seconds made_wave_span{1};  // the reconnect backoff's cap
  // Writes of a connection lost while others still served: safe in the server's shared
  // cache unless every connection goes before a flush covers them. orphaned_made_: the
  // earliest made_ of the lost connections they came from.
  std::uint64_t orphaned_writes_ = 0;
  std::uint64_t orphaned_made_ = 0;
  std::uint64_t unknown_writes_events_ = 0;  // losses that left acknowledged writes' fate unknown
  // Writes went with a lost connection and no flush sent since has succeeded: one may
  // still cover them if the server survived, so close() sends one. The epoch of the
  // loss (counted as a write, so a flush sent before it does not clear it); 0: none.
  std::uint64_t lost_unflushed_ = 0;
  bool closed_ = false;
  std::uint64_t disconnects_ = 0;
  std::vector<std::uint64_t> last_loss_;  // per slot: disconnects_ as of its latest loss
  std::uint64_t reconnects_ = 0;
};

}  // namespace nbd_client
