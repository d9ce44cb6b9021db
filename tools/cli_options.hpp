// The nbdbridge command line: options struct, CLI11 setup, and the checks that
// turn options into a connection target. Pure except for reading /etc/fuse.conf.
#pragma once

#include "nbd_client/target.hpp"

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace tools {

struct Options {
  std::string mountpoint;
  std::string uri;                           // positional TARGET
  std::vector<std::string> server_command;   // [ CMD ARGS... ]
  std::string unix_path;                     // --unix
  std::vector<std::string> tcp;              // --tcp HOST PORT
  int fd = -1;                               // --fd
  std::string export_name;                   // for --unix/--tcp/--fd/[ CMD ]
  bool readonly = false;
  std::string pidfile;
  bool daemon = false;
  std::vector<std::string> mount_options;    // -o, split at commas
  bool verbose = false;
  std::string cache = "none";
  std::string read_ahead = "on";             // --read-ahead on|off (--cache=none's small buffered reads)
  double connect_timeout_seconds = 30;
  double wait_for_server_seconds = 0;        // keep trying a server not listening yet (0: fail at once)
  double shutdown_timeout_seconds = 10;
  std::string connections = "auto";          // -C N or auto; used when the server allows multi-conn
  std::string replies = "auto";              // --replies auto|structured|simple
  std::string socket_batching = "on";        // --socket-batching on|off
  std::string spliced_reads = "on";          // --spliced-reads on|off
  std::string spliced_writes = "on";         // --spliced-writes on|off
  bool list = false;                         // --list TARGET: print exports and exit
  double retry_timeout_seconds = 60;         // 0: no reconnect, fail at once
  double request_timeout_seconds = 0;        // 0: unbounded
  double idle_release_seconds = 10;          // give buffer memory back after this long idle (0: never)
  bool force = false;                        // clear a stale mount at MOUNTPOINT first
  int busy_poll_microseconds = 50;           // keep polling this long before sleeping
  std::string connection_threads = "writes"; // which NBD connections get a thread of their own
  std::string tcp_congestion = "auto";       // auto (reno to loopback peers), system, or a name
  int tcp_keepalive_seconds = 60;            // a silent TCP server is lost after this (0: system default)
  std::string reply_thread = "auto";         // READ replies of 128 KiB and more from a second thread
  double stats_interval_seconds = 0;         // print a summary line this often (0: only at exit)
  std::string stats_file;                    // write the final statistics JSON here
  std::string inject_delay;                  // MEAN[:JITTER][:DIST] before each NBD command
  std::string inject_error;                  // RATE[:ERRNO] of commands failed before the server
  std::uint64_t seed = 1;                    // for injected faults: same seed, same sequence
};

// Removes a `[ CMD ARGS... ]` group from args into command. Returns a one-line
// problem (unbalanced or empty brackets) or "".
std::string extract_server_command(std::vector<std::string>& args, std::vector<std::string>& command);

void setup(CLI::App& app, Options& options);

// The whole command line (without the program name) into options: the [ CMD ] group,
// CLI11's parse, then check_option_combinations. Returns a one-line problem or "".
// A request for help is rethrown (CLI::CallForHelp) for app.exit() to print.
std::string parse_command_line(CLI::App& app, std::vector<std::string> args, Options& options);

// A CLI11 parse error as one line, with unexpected words in the order they were given.
std::string parse_error_message(const CLI::App& app, const CLI::ParseError& error);

// Options that contradict each other (given on the same command line). Returns a
// one-line problem or "".
std::string check_option_combinations(const CLI::App& app, const Options& options);

// Exactly one target must be given. Returns a one-line problem or "".
std::string build_target(Options options, nbd_client::Target& target);

// Splits "-o a,b" words into single options.
// -C: a number 1..64, or "auto" (4 with at least 4 CPUs, else 1). 0 = invalid.
unsigned resolve_connections(const std::string& text, unsigned cpus);

std::vector<std::string> split_mount_options(const std::vector<std::string>& words);

// A non-root user may pass allow_other only if /etc/fuse.conf says so.
std::string check_allow_other(const std::vector<std::string>& mount_options, bool is_root,
                              const std::string& fuse_conf_text);

}  // namespace tools
