// The nbdbridge program: parse the command line, connect, mount, serve until
// unmounted or signalled, then shut down in one place. One thread runs the Asio
// loop that serves both /dev/fuse and the NBD socket.
#include "bridge/diagnostics.hpp"
#include "bridge/control_socket.hpp"
#include "bridge/fault_injection.hpp"
#include "bridge/file_system.hpp"
#include "bridge/geometry.hpp"
#include "bridge/mountpoint.hpp"
#include "fuse_front/operations.hpp"
#include "fuse_front/session.hpp"
#include "nbd_client/connection_pool.hpp"
#include "nbd_client/export_list.hpp"
#include "tools/cli_options.hpp"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/redirect_error.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <tuple>
#include <unistd.h>

namespace {

// With connection threads the loop no longer receives the replies, so it has the
// time to send large READ replies itself; a reply thread then only adds a third
// hop (1 MiB reads at depth 8: ~2100 against ~2440 MiB/s without it).
bool reply_thread_wanted(const tools::Options& options) {
  if (options.reply_thread != "auto") return options.reply_thread == "on";
  return options.connection_threads != "all";
}

// One line on stderr. While the mount serves requests, a stderr nobody reads (a full
// pipe) must not stall it: lines wait at most `patience`, then are dropped and counted.
void say(const std::string& line, std::chrono::milliseconds patience = bridge::final_patience) {
  bridge::diagnostic(line, patience);
}

std::chrono::milliseconds to_duration(double seconds) {
  return std::chrono::milliseconds(static_cast<long long>(seconds * 1000));
}

// "20", "0.5": a number of seconds as the user gave it.
std::string seconds_text(double seconds) {
  std::ostringstream text;
  text << seconds;
  return text.str();
}

// The line a connect that --wait-for-server gave up on ends with.
std::string waited_note(const tools::Options& options) {
  return " (no server there within --wait-for-server " + seconds_text(options.wait_for_server_seconds) + " s)";
}

std::string read_text_file(const char* path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// Written atomically (rename), so a script polling for it never reads half a pid.
// Written to a fresh temporary name beside it, then renamed into place, so a reader
// never sees a partial pid. `written` identifies the file, so that the exit removes
// it only while it is still ours.
bool write_pidfile(const std::string& path, struct stat& written) {
  std::string temporary = path + ".XXXXXX";
  int descriptor = mkstemp(temporary.data());
  if (descriptor < 0) return false;
  const std::string pid = std::to_string(getpid()) + "\n";
  bool done = fchmod(descriptor, 0644) == 0 && write(descriptor, pid.data(), pid.size()) == ssize_t(pid.size()) &&
              fstat(descriptor, &written) == 0;
  int error = errno;
  close(descriptor);
  if (done && std::rename(temporary.c_str(), path.c_str()) == 0) return true;
  if (done) error = errno;
  unlink(temporary.c_str());
  errno = error;
  return false;
}

void remove_pidfile(const std::string& path, const struct stat& written) {
  struct stat now {};
  if (lstat(path.c_str(), &now) == 0 && now.st_dev == written.st_dev && now.st_ino == written.st_ino)
    unlink(path.c_str());
}

// A file the bridge will write once mounted (pidfile) or at exit (statistics): a
// place it cannot write is found now, before anything is mounted. The statistics
// are written in place, so an existing writable file will do (/dev/stdout, a file
// made for us in a directory we cannot write); the pidfile is renamed into place.
std::string check_writable_place(const std::string& path, bool written_in_place) {
  if (path.empty()) return {};
  struct stat status {};
  if (written_in_place && stat(path.c_str(), &status) == 0 && !S_ISDIR(status.st_mode)) {
    // Opened in place at exit: the file's own permission decides, not its directory's.
    if (access(path.c_str(), W_OK) == 0) return {};
    return std::string("cannot write it: ") + std::strerror(errno);
  }
  std::string directory, name;
  bridge::split_parent(path, directory, name);
  if (stat(directory.c_str(), &status) != 0) return "cannot use directory " + directory + ": " + std::strerror(errno);
  if (!S_ISDIR(status.st_mode)) return directory + " is not a directory";
  if (access(directory.c_str(), W_OK | X_OK) != 0) return "cannot write into " + directory + ": " + std::strerror(errno);
  if (stat(path.c_str(), &status) == 0 && S_ISDIR(status.st_mode)) return "is a directory";
  // The pidfile takes the place of what is there (and goes at exit): never a device,
  // a FIFO or a symbolic link someone made there.
  if (lstat(path.c_str(), &status) == 0 && !S_ISREG(status.st_mode)) return "exists and is not a regular file";
  return {};
}

// Points each of the standard streams given at /dev/null.
void point_at_null_device(std::initializer_list<int> streams) {
  int null_device = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_device < 0) return;
  for (int stream : streams) dup2(null_device, stream);
  close(null_device);
}

volatile pid_t daemon_child = 0;
volatile sig_atomic_t daemon_signal_forwarded = 0;

// --daemon: the parent waits until the child reports the mount live (one byte)
// or fails (EOF), and exits accordingly. Returns the fd the child reports on.
// Descriptors a path on the command line names (/dev/fd/N, /proc/self/fd/N: a
// --stats-file, a [ CMD ] server's file given as `3<img`): the daemon keeps them.
std::vector<int> descriptors_named(const tools::Options& options) {
  std::vector<int> named;
  std::vector<std::string> words = options.server_command;
  words.push_back(options.stats_file);
  for (const std::string& word : words)
    for (std::string_view prefix : {"/dev/fd/", "/proc/self/fd/"})
      for (std::size_t at = word.find(prefix); at != std::string::npos; at = word.find(prefix, at + 1)) {
        int descriptor = 0;
        const char* digits = word.data() + at + prefix.size();
        auto [end, error] = std::from_chars(digits, word.data() + word.size(), descriptor);
        if (error == std::errc{} && end != digits) named.push_back(descriptor);
      }
  return named;
}

int become_daemon(int target_fd, std::vector<int> kept) {
  int report[2];
  if (pipe2(report, O_CLOEXEC) != 0) return -1;
  std::fflush(nullptr);
  pid_t child = fork();
  if (child < 0) return -1;
  if (child > 0) {
    close(report[1]);
    // Until the child reports, a stop signal for us (Ctrl-C, timeout(1)) is for it:
    // after setsid() the terminal's and the process group's no longer reach it.
    daemon_child = child;
    struct sigaction forward {};
    forward.sa_handler = [](int signal_number) {
      daemon_signal_forwarded = signal_number;
      kill(daemon_child, signal_number);
    };
    sigemptyset(&forward.sa_mask);
    for (int signal_number : {SIGINT, SIGTERM, SIGHUP}) {
      struct sigaction inherited {};
      sigaction(signal_number, nullptr, &inherited);
      if (inherited.sa_handler != SIG_IGN) sigaction(signal_number, &forward, nullptr);  // nohup stays nohup
    }
    char byte = 0;
    ssize_t got;
    do {
      got = read(report[0], &byte, 1);
    } while (got < 0 && errno == EINTR);
    // A signal passed on to the daemon stops it, also one that came as it went live:
    // the caller asked for that, and must not be told the mount is there.
    if (got == 1 && !daemon_signal_forwarded) std::_Exit(0);
    if (got == 1) {
      say("interrupted (" + std::string(strsignal(daemon_signal_forwarded)) +
          ") as the mount went live: the daemon unmounts it");
      std::_Exit(1);
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFSIGNALED(status)) {
      say("interrupted: the daemon ended by " + std::string(strsignal(WTERMSIG(status))) +
          " before the mount was live");
      std::_Exit(1);
    }
    std::_Exit(WIFEXITED(status) && WEXITSTATUS(status) != 0 ? WEXITSTATUS(status) : 1);
  }
  close(report[0]);
  setsid();
  // Nothing reads stdin or writes stdout, but a [ CMD ] server or fusermount3 would
  // inherit them and hold a caller's pipe open for as long as they run. An --fd
  // target given as 0 or 1 is the NBD socket itself and stays.
  if (target_fd != STDIN_FILENO) point_at_null_device({STDIN_FILENO});
  if (target_fd != STDOUT_FILENO) point_at_null_device({STDOUT_FILENO});
  // Likewise every other descriptor the caller left open (`3>&1 | cat`, a supervisor
  // waiting for EOF on a pipe): only the report pipe, an --fd target and those a path
  // on the command line names stay.
  unsigned first = 3;
  kept.push_back(report[1]);
  kept.push_back(target_fd);
  std::sort(kept.begin(), kept.end());
  for (int descriptor : kept) {
    if (descriptor < int(first)) continue;
    if (unsigned(descriptor) > first) close_range(first, unsigned(descriptor) - 1, 0);
    first = unsigned(descriptor) + 1;
  }
  close_range(first, ~0U, 0);
  return report[1];
}

class Bridge {
 public:
  Bridge(const tools::Options& options, nbd_client::Target target, bridge::MountPlan plan, int daemon_report,
         int mountpoint_lock)
      : options_(options),
        target_(std::move(target)),
        plan_(std::move(plan)),
        daemon_report_(daemon_report),
        mountpoint_lock_(mountpoint_lock),
        pool_(io_.get_executor()),
        session_(io_.get_executor(), fuse_front::operations_table(), &file_system_),
        file_system_(io_.get_executor(), pool_, session_,
                     {plan_.file_name, options.cache == "page" ? bridge::CacheMode::page : bridge::CacheMode::none,
                      options.verbose, to_duration(options.request_timeout_seconds),
                      reply_thread_wanted(options) ? bridge::FileSystemOptions{}.reply_thread_minimum : 0,
                      options.spliced_reads == "on" ? bridge::FileSystemOptions{}.spliced_read_minimum : 0,
                      options.spliced_writes == "on" ? bridge::FileSystemOptions{}.spliced_write_minimum : 0,
                      to_duration(options.idle_release_seconds), options.read_ahead == "on"}),
        signals_(io_, SIGINT, SIGTERM, SIGHUP),
        ended_(io_),
        stats_ticker_(io_) {}

  void inject_faults(std::unique_ptr<bridge::FaultInjector> faults) { file_system_.inject_faults(std::move(faults)); }

  int run() {
    asio::co_spawn(io_, lifecycle(), asio::detached);
    run_loop();
    return exit_code_;
  }

 private:
  // "data, large_writes, block_status": each connection's role, in order.
  std::string connection_roles() const {
    std::string roles;
    for (std::size_t index = 0; index < pool_.size(); ++index)
      roles += std::string(index ? ", " : "") + pool_.role_name(index);
    return roles;
  }
  // Runs the loop until no work is left; the session busy-polls after work for
  // the --busy-poll budget (Session::set_busy_poll).
  void run_loop() {
    const auto budget = std::chrono::microseconds(static_cast<long long>(options_.busy_poll_microseconds));
    session_.set_busy_poll(std::max(budget, std::chrono::microseconds(0)));
    io_.run();
  }

  void end() {
    ended_flag_ = true;
    ended_.cancel();
  }

  asio::awaitable<void> lifecycle() {
    signals_.async_wait([this](std::error_code error, int) {
      if (error) return;
      stop_requested_ = true;
      end();
      pool_.cancel_connect();
    });

    nbd_client::PoolOptions pool_options;
    pool_options.connect.readonly = options_.readonly;
    pool_options.connect.timeout = to_duration(options_.connect_timeout_seconds);
    pool_options.connect.batch_socket = options_.socket_batching == "on";
    pool_options.connect.set_tcp_congestion(options_.tcp_congestion);
    pool_options.connect.tcp_keepalive = std::chrono::seconds(static_cast<long long>(options_.tcp_keepalive_seconds));
    pool_options.hold_threads = true;  // until mounted: libfuse forks fusermount3
    pool_options.connect.on_progress = [this] { session_.note_activity(); };
    pool_options.threads = options_.connection_threads == "all"      ? nbd_client::ThreadMode::all
                           : options_.connection_threads == "writes" ? nbd_client::ThreadMode::large_writes
                                                                     : nbd_client::ThreadMode::none;
    pool_options.connections = tools::resolve_connections(options_.connections, std::thread::hardware_concurrency());
    // Under --daemon the server would hold a caller's pipe for as long as it runs; its
    // words then go only to a log file (see detach_stderr()).
    pool_options.pass_server_stderr = options_.verbose && (daemon_report_ < 0 || stderr_is_kept());
    pool_options.retry_timeout = to_duration(options_.retry_timeout_seconds);
    pool_options.wait_for_server = to_duration(options_.wait_for_server_seconds);
    if (options_.verbose)
      pool_.on_waiting_for_server = [this](const std::string& reason) {
        say("waiting up to " + seconds_text(options_.wait_for_server_seconds) + " s for the server at " +
            target_.describe() + " (" + reason + ")");
      };
    pool_options.replies = options_.replies == "simple"       ? nbd_client::ReplyMode::simple
                           : options_.replies == "structured" ? nbd_client::ReplyMode::structured
                                                              : nbd_client::ReplyMode::automatic;
    std::error_code error = co_await pool_.async_connect(target_, pool_options);
    if (stop_requested_) {
      say("interrupted before the mount was made");
      pool_.close();  // the connections made so far still wait on their sockets
      co_return finish(1);
    }
    if (error) {
      std::string reason = pool_.error_message();
      // gnutls says only that the handshake ended: a wrong PSK key or identity, or a
      // certificate the server does not accept, is the usual cause.
      if (reason.find("gnutls_handshake") != std::string::npos)
        reason += " (the TLS handshake failed: check the key file, the user name or the certificates)";
      if (nbd_client::server_absent(error) && options_.wait_for_server_seconds > 0) reason += waited_note(options_);
      say("cannot connect to " + target_.describe() + ": " + reason);
      pool_.close();
      co_return finish(1);
    }
    nbd_client::ExportInfo info = pool_.info();
    if (std::uint64_t reachable = bridge::reachable_size(info.size, info.minimum_block); reachable != info.size) {
      say("note: the export's size, " + std::to_string(info.size) + " bytes, is not a multiple of its minimum block (" +
          std::to_string(info.minimum_block) + " bytes): the file is " + std::to_string(reachable) +
          " bytes, the last " + std::to_string(info.size - reachable) + " cannot be reached with aligned requests");
      info.size = reachable;
    }
    file_system_.set_export(info);
    if (options_.verbose) {
      say("connected: " + std::to_string(info.size) + " bytes, " + (info.read_only ? "read-only" : "read-write") +
          ", " + std::to_string(pool_.size()) + " connection(s) (" + connection_roles() + "), flush " + (info.can_flush ? "yes" : "no") +
          ", fua " + (info.can_fua ? "yes" : "no") + ", zero " + (info.can_zero ? "yes" : "no") +
          ", block status " + (info.can_block_status ? "yes" : "no") + ", block sizes " +
          std::to_string(info.minimum_block) + "/" + std::to_string(info.preferred_block) + "/" +
          std::to_string(info.maximum_request));
      if (!pool_.note().empty()) say(pool_.note());
    }
    if (!info.can_flush && !info.read_only)
      say("note: the server does not support flush: it keeps no volatile write cache, so a write is durable "
          "once acknowledged and fsync succeeds without sending anything");
    pool_.on_event = [](const std::string& line) { say(line, bridge::notice_patience); };
    bridge::Statistics& statistics = file_system_.statistics();
    statistics.set_connections(pool_.size());
    for (std::size_t index = 0; index < pool_.size(); ++index) statistics.set_connection_role(index, pool_.role_name(index));
    pool_.on_connection_lost = [&statistics](std::size_t index) { statistics.connection_lost(index); };
    pool_.on_connection_restored = [&statistics](std::size_t index, std::chrono::nanoseconds outage) {
      statistics.connection_restored(index, std::uint64_t(outage.count()));
    };

    // auto_unmount: fusermount3 stays behind and removes the mount if we die,
    // even by SIGKILL, so a crash never leaves a dead mount.
    std::vector<std::string> mount_options{"fsname=nbdbridge", "subtype=nbdbridge", "default_permissions",
                                           "auto_unmount"};
    if (info.read_only) mount_options.push_back("ro");
    for (const auto& option : tools::split_mount_options(options_.mount_options)) {
      if (option == "rw" && info.read_only) {
        say("-o rw: the server's export is read-only");
        pool_.close();
        co_return finish(1);
      }
      mount_options.push_back(option);
    }
    std::string problem;
    file_system_.on_live = [this] { on_live(); };
    if (mount(mount_options, problem)) {
      say(problem);
      pool_.close();
      co_return finish(1);
    }
    pool_.start_held_threads();  // no FUSE request has been read yet
    session_.start([this] { end(); });
    start_control_server();
    if (options_.stats_interval_seconds > 0) asio::co_spawn(io_, print_statistics_periodically(), asio::detached);

    if (!ended_flag_) {
      ended_.expires_at(asio::steady_timer::time_point::max());
      std::error_code ignored;
      co_await ended_.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
    }

    // One way out for signals, fusermount3 -u and umount alike.
    session_.stop_receiving();
    co_await file_system_.drain(to_duration(options_.shutdown_timeout_seconds));
    session_.unmount();
    // Unmounted: the next bridge on this mountpoint need not wait for the rest of our exit.
    if (mountpoint_lock_ >= 0) close(std::exchange(mountpoint_lock_, -1));
    pool_.close();
    // The requests drain() answered end with their commands, which close() has just
    // failed: their completions, queued before this, run first, so the final
    // statistics show nothing still running.
    co_await asio::post(io_, asio::use_awaitable);
    stats_ticker_.cancel();
    if (control_) control_->stop();
    bool statistics_written = report_final_statistics();
    if (!options_.pidfile.empty() && pidfile_written_) remove_pidfile(options_.pidfile, pidfile_identity_);
    if (session_.init_refused()) say("the kernel's FUSE INIT failed: " + session_.init_failure());
    if (options_.verbose) say("unmounted " + plan_.export_path());
    // A --daemon child stopped (its parent passed a signal on) after mounting but before
    // going live: the parent, which exits 1 then, passes on this line as the reason.
    if (options_.daemon && stop_requested_ && !live_ && !pidfile_failed_ && !caller_gone_ &&
        !session_.init_refused())
      say("interrupted before the mount was live");
    // Writes the flush at stop did not cover fail the run: a script's `wait` must not take
    // them as safely on the server.
    finish(statistics_written && !pidfile_failed_ && !caller_gone_ && !session_.init_refused() &&
                   !file_system_.stop_left_writes_unflushed()
               ? 0
               : 1);
  }

  // Under --daemon the fusermount3 that stays behind for auto_unmount would inherit
  // our stderr, and a caller's pipe would then stay open as long as the mount: it gets
  // a file of its own, whose text (any complaint of the mount's) is passed on here.
  std::error_code mount(const std::vector<std::string>& mount_options, std::string& problem) {
    if (daemon_report_ < 0 || options_.fd == STDERR_FILENO)
      return session_.mount(plan_.mount_path, mount_options, problem);
    int own_stderr = memfd_create("nbdbridge-mount-stderr", MFD_CLOEXEC);
    int saved_stderr = own_stderr >= 0 ? fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3) : -1;
    if (saved_stderr >= 0) dup2(own_stderr, STDERR_FILENO);
    std::error_code error = session_.mount(plan_.mount_path, mount_options, problem);
    if (saved_stderr >= 0) {
      dup2(saved_stderr, STDERR_FILENO);
      close(saved_stderr);
      char text[4096];
      lseek(own_stderr, 0, SEEK_SET);
      for (ssize_t got; (got = read(own_stderr, text, sizeof text)) > 0;) {
        ssize_t ignored = write(STDERR_FILENO, text, std::size_t(got));
        (void)ignored;
      }
    }
    if (own_stderr >= 0) close(own_stderr);
    return error;
  }

  // `nbdbridge stats MOUNTPOINT` reaches us here; directory mounts also show .stats.
  void start_control_server() {
    auto& statistics = file_system_.statistics();
    control_ = std::make_unique<bridge::ControlServer>(
        io_.get_executor(), bridge::control_socket_path(plan_.mount_path),
        [&statistics](std::string_view command) -> std::string {
          if (command == "reset") {
            statistics.reset();
            return "ok\n";
          }
          if (command == "stats" || command.empty()) return statistics.to_json() + "\n";
          return "error: unknown command (stats, reset)\n";
        });
    if (auto error = control_->start()) say("statistics socket unavailable: " + error.message());
  }

  asio::awaitable<void> print_statistics_periodically() {
    for (;;) {
      stats_ticker_.expires_after(to_duration(options_.stats_interval_seconds));
      std::error_code cancelled;
      co_await stats_ticker_.async_wait(asio::redirect_error(asio::use_awaitable, cancelled));
      if (cancelled || ended_flag_) co_return;
      say("stats: " + file_system_.statistics().summary_line(), bridge::notice_patience);
    }
  }

  // False if --stats-file could not be written: the exit status says so.
  bool report_final_statistics() {
    say("stats at exit: " + file_system_.statistics().summary_line());
    if (auto dropped = bridge::dropped_diagnostics())
      say(std::to_string(dropped) + " line(s) for stderr were dropped: it was not being read");
    if (options_.stats_file.empty()) return true;
    const std::string json = file_system_.statistics().to_json() + "\n";
    // O_NONBLOCK: a FIFO nobody reads would block the exit for ever (ENXIO instead);
    // a reader that comes a moment late is waited for, up to a second.
    int descriptor = -1;
    for (int tries = 0; tries < 100; ++tries) {
      descriptor = open(options_.stats_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NONBLOCK | O_CLOEXEC, 0666);
      if (descriptor >= 0 || errno != ENXIO) break;
      usleep(10000);
    }
    if (descriptor >= 0) fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) & ~O_NONBLOCK);
    std::FILE* file = descriptor >= 0 ? fdopen(descriptor, "w") : nullptr;
    if (descriptor >= 0 && !file) close(descriptor);
    bool written = file && std::fwrite(json.data(), 1, json.size(), file) == json.size();
    int error = errno;
    if (file && std::fclose(file) != 0 && written) {
      written = false;
      error = errno;
    }
    if (written) return true;
    say("cannot write the statistics file " + options_.stats_file + ": " + std::strerror(error));
    return false;
  }

  void on_live() {
    if (session_.init_refused()) return;  // the session has ended: not live, and never was
    // A script waits for the pidfile: a mount it never learns of must not stay.
    if (!options_.pidfile.empty() && !(pidfile_written_ = write_pidfile(options_.pidfile, pidfile_identity_))) {
      say("cannot write pidfile " + options_.pidfile + ": " + std::strerror(errno) + "; unmounting");
      pidfile_failed_ = true;
      if (daemon_report_ >= 0) close(daemon_report_);  // the parent sees EOF and waits for our status
      daemon_report_ = -1;
      end();
      return;
    }
    if (options_.verbose) say("mounted " + plan_.export_path());
    if (daemon_report_ >= 0) {
      ssize_t written;
      do {
        written = write(daemon_report_, "1", 1);
      } while (written < 0 && errno == EINTR);
      close(daemon_report_);
      daemon_report_ = -1;
      if (written != 1) {
        // The caller that started us has gone (killed, say, while we connected): it was
        // told nothing of a mount, so none stays.
        say("the process that started --daemon is gone; unmounting");
        caller_gone_ = true;
        end();
        return;
      }
      detach_stderr();
    }
    live_ = true;
  }

  // --daemon, once live: a caller reading our stderr until EOF ($(...), ssh, a
  // pipe, a terminal) must not wait for the unmount, so those give way to /dev/null.
  // A file (the daemon's log) or a socket (journald's, under systemd) stays.
  static bool stderr_is_kept() {
    struct stat status {};
    return fstat(STDERR_FILENO, &status) == 0 && (S_ISREG(status.st_mode) || S_ISSOCK(status.st_mode));
  }
  void detach_stderr() {
    if (options_.fd != STDERR_FILENO && !stderr_is_kept()) point_at_null_device({STDERR_FILENO});
  }

  // Unmounted and reported: a signal from now on has its default effect (what is
  // left to end is bounded, but a second Ctrl-C should not wait for it).
  void finish(int code) {
    exit_code_ = code;
    signals_.cancel();
    std::error_code ignored;
    signals_.clear(ignored);
  }

  const tools::Options& options_;
  nbd_client::Target target_;
  bridge::MountPlan plan_;
  int daemon_report_;
  int mountpoint_lock_;  // lock_mountpoint()'s, until the unmount (-1: none)
  asio::io_context io_{1};
  nbd_client::ConnectionPool pool_;
  fuse_front::Session session_;
  bridge::FileSystem file_system_;
  asio::signal_set signals_;
  asio::steady_timer ended_;
  asio::steady_timer stats_ticker_;
  std::unique_ptr<bridge::ControlServer> control_;
  bool ended_flag_ = false;
  bool stop_requested_ = false;
  bool pidfile_failed_ = false;
  bool pidfile_written_ = false;
  struct stat pidfile_identity_ {};
  bool caller_gone_ = false;
  bool live_ = false;  // on_live() ran to its end: the pidfile written, a --daemon parent told
  int exit_code_ = 1;
};

// Bounds a synchronous libnbd call that has no timeout of its own.
void give_up_after(double seconds) {
  std::signal(SIGALRM, [](int) {
    const char message[] = "nbdbridge: no answer from the server in time\n";
    ssize_t ignored = write(STDERR_FILENO, message, sizeof message - 1);
    (void)ignored;
    std::_Exit(1);
  });
  alarm(static_cast<unsigned>(seconds + 0.999));
}

// --list --wait-for-server runs before any loop: while it waits for the server (and
// tries it), a stop ends it from the handler, as give_up_after() does, in one line.
// Without the option, and once the server has answered, a stop has its default effect.
class StopEndsWait {
 public:
  StopEndsWait() {
    struct sigaction stop {};
    stop.sa_handler = [](int) {
      const char message[] = "nbdbridge: interrupted while waiting for the server\n";
      ssize_t ignored = write(STDERR_FILENO, message, sizeof message - 1);
      (void)ignored;
      std::_Exit(1);
    };
    sigemptyset(&stop.sa_mask);
    for (std::size_t index = 0; index < std::size(signals_); ++index) {
      sigaction(signals_[index], nullptr, &inherited_[index]);
      if (inherited_[index].sa_handler != SIG_IGN) sigaction(signals_[index], &stop, nullptr);  // nohup stays nohup
    }
  }
  ~StopEndsWait() {
    for (std::size_t index = 0; index < std::size(signals_); ++index) sigaction(signals_[index], &inherited_[index], nullptr);
  }
  StopEndsWait(const StopEndsWait&) = delete;
  StopEndsWait& operator=(const StopEndsWait&) = delete;

 private:
  static constexpr int signals_[] = {SIGINT, SIGTERM, SIGHUP};
  struct sigaction inherited_[std::size(signals_)] {};
};

int list_exports(const nbd_client::Target& target, const tools::Options& options) {
  std::vector<nbd_client::ExportListing> exports;
  std::string problem;
  std::error_code connect_error;
  // As a mount does (ConnectionPool::connect_first): only a server not there yet is
  // waited for, each attempt bounded by --connect-timeout, the last one at the end.
  const auto wait_ends = std::chrono::steady_clock::now() + to_duration(options.wait_for_server_seconds);
  std::optional<StopEndsWait> stop_ends_wait;
  if (options.wait_for_server_seconds > 0) stop_ends_wait.emplace();
  for (;;) {
    give_up_after(options.connect_timeout_seconds);
    exports.clear();
    problem = nbd_client::list_exports(target, exports, connect_error);
    alarm(0);
    const auto now = std::chrono::steady_clock::now();
    if (problem.empty() || !nbd_client::server_absent(connect_error) || now >= wait_ends) break;
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(nbd_client::server_wait_interval,
                                                                               wait_ends - now));
  }
  stop_ends_wait.reset();
  if (!problem.empty()) {
    if (nbd_client::server_absent(connect_error) && options.wait_for_server_seconds > 0)
      problem += waited_note(options);
    say("cannot list the exports of " + target.describe() + ": " + problem);
    return 1;
  }
  for (const auto& listing : exports) {
    std::printf("%s\t%s", listing.name.empty() ? "\"\"" : listing.name.c_str(),
                listing.size >= 0 ? std::to_string(listing.size).c_str() : "?");
    if (!listing.description.empty()) std::printf("\t%s", listing.description.c_str());
    std::printf("\n");
  }
  return 0;
}

int run(const tools::Options& options) {
  nbd_client::Target target;
  if (std::string problem = tools::build_target(options, target); !problem.empty()) {
    say(problem);
    return 2;
  }
  if (options.list) return list_exports(target, options);
  // Everything that can be checked is checked before --force changes anything.
  if (std::string problem = tools::check_allow_other(tools::split_mount_options(options.mount_options),
                                                     geteuid() == 0, read_text_file("/etc/fuse.conf"));
      !problem.empty()) {
    say(problem);
    return 1;
  }
  std::unique_ptr<bridge::FaultInjector> faults;
  if (!options.inject_delay.empty() || !options.inject_error.empty()) {
    std::optional<bridge::DelaySpec> delay;
    std::optional<bridge::ErrorSpec> error;
    if (!options.inject_delay.empty()) {
      delay.emplace();
      if (std::string problem = bridge::parse_delay_spec(options.inject_delay, *delay); !problem.empty()) {
        say(problem);
        return 2;
      }
    }
    if (!options.inject_error.empty()) {
      error.emplace();
      if (std::string problem = bridge::parse_error_spec(options.inject_error, *error); !problem.empty()) {
        say(problem);
        return 2;
      }
    }
    faults = std::make_unique<bridge::FaultInjector>(delay, error, options.seed);
    // Injected delays end on a timer (BlockIo::wait_precisely): without the default 50 us
    // of slack (this thread's; the threads started later inherit it) it fires when asked.
    if (delay) prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  }
  for (const auto& [option, path, in_place] :
       {std::tuple{"--pidfile", options.pidfile, false}, {"--stats-file", options.stats_file, true}})
    if (std::string problem = check_writable_place(path, in_place); !problem.empty()) {
      say(std::string(option) + " " + path + ": " + problem);
      return 1;
    }
  if (options.force) {
    if (std::string problem = bridge::clear_stale_mount(options.mountpoint); !problem.empty()) {
      say(problem);
      return 1;
    }
  }
  bridge::MountPlan plan;
  if (std::string problem = bridge::resolve_mountpoint(options.mountpoint, plan); !problem.empty()) {
    say(problem);
    return 1;
  }
  // Held until the unmount (by the daemon, under --daemon): a second bridge started at
  // the same moment on the same mountpoint stops here instead of stacking a second mount.
  // It waits a little for a bridge that is still finishing after its unmount, then looks
  // at the mountpoint again: the holder may have mounted it meanwhile.
  const int mountpoint_lock = bridge::lock_mountpoint(plan.mount_path, std::chrono::seconds(1));
  if (mountpoint_lock < 0 && errno == EWOULDBLOCK) {
    say("another nbdbridge is starting on or serving " + plan.mount_path);
    return 1;
  }
  if (std::string problem = bridge::resolve_mountpoint(options.mountpoint, plan); !problem.empty()) {
    say(problem);
    return 1;
  }
  std::signal(SIGPIPE, SIG_IGN);
  int daemon_report = -1;
  std::vector<int> daemon_keeps = descriptors_named(options);
  daemon_keeps.push_back(mountpoint_lock);
  if (options.daemon && (daemon_report = become_daemon(options.fd, daemon_keeps)) < 0) {
    say(std::string("cannot go to the background: ") + std::strerror(errno));
    return 1;
  }
  auto bridge = std::make_unique<Bridge>(options, std::move(target), std::move(plan), daemon_report, mountpoint_lock);
  if (faults) bridge->inject_faults(std::move(faults));
  const int status = bridge->run();
  bridge.reset();
  // Everything is done (unmounted, statistics written); a thread left resolving a
  // name for an abandoned reconnect would abort in libnbd during exit().
  if (nbd_client::Connection::name_resolutions_running()) {
    std::fflush(nullptr);
    _exit(status);
  }
  return status;
}

// `nbdbridge stats [--reset] MOUNTPOINT`: asks the bridge serving MOUNTPOINT
// through its control socket. MOUNTPOINT may be the mounted directory, the
// export file inside it, or a file-mode mount.
int stats_command(std::vector<std::string> args) {
  CLI::App app{"Print the live statistics of a running nbdbridge as JSON"};
  app.name("nbdbridge stats");
  std::string mountpoint;
  bool reset = false;
  app.add_option("MOUNTPOINT", mountpoint, "the mountpoint, or the export file, of a running nbdbridge")->required();
  app.add_flag("--reset", reset, "zero the statistics");
  app.footer("Examples:\n  nbdbridge stats ./mnt > stats.json && tools/plot-stats stats.json\n  nbdbridge stats --reset ./mnt");
  try {
    std::reverse(args.begin(), args.end());
    app.parse(args);
  } catch (const CLI::ParseError& error) {
    if (error.get_exit_code() == 0) return app.exit(error);
    say(tools::parse_error_message(app, error) + " (see nbdbridge stats --help)");
    return 2;
  }
  std::vector<std::string> candidates;
  char resolved[PATH_MAX];
  if (realpath(mountpoint.c_str(), resolved)) {
    candidates.emplace_back(resolved);
    std::string parent, name;
    bridge::split_parent(resolved, parent, name);
    candidates.push_back(parent);
  } else {
    // A dead or stale mount cannot be resolved; try the path as given.
    candidates.push_back(mountpoint);
  }
  // Said: the most telling failure (a socket that refused, a bridge that did not
  // answer), not "no such file" from a candidate that was never a mount's.
  std::error_code telling_error;
  for (const auto& candidate : candidates) {
    std::string reply;
    std::error_code error = bridge::query_control(bridge::control_socket_path(candidate), reset ? "reset" : "stats",
                                                  reply, std::chrono::seconds(5));
    if (!error) {
      std::fputs(reply.c_str(), stdout);
      return reply.rfind("error", 0) == 0 ? 1 : 0;
    }
    if (!telling_error || telling_error == std::errc::no_such_file_or_directory) telling_error = error;
  }
  say("no running nbdbridge found for " + mountpoint + " (" + telling_error.message() + ")");
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args.front() == "stats") return stats_command({args.begin() + 1, args.end()});
  tools::Options options;
  CLI::App app{"nbdbridge"};
  app.name("nbdbridge");
  tools::setup(app, options);
  try {
    if (std::string problem = tools::parse_command_line(app, std::move(args), options); !problem.empty()) {
      say(problem);
      return 2;
    }
  } catch (const CLI::ParseError& help) {
    return app.exit(help);
  }
  return run(options);
}
