// Counters and latency histograms for the bridge's requests, connections and injected faults,
// and their JSON and one-line renderings. Loop thread only: every recording call is O(1), takes
// no lock and allocates nothing; only set_connections(), to_json() and summary_line() allocate.
//
// JSON format, version 1 (keys are only ever added; a change of meaning bumps "version"):
//   {"version":1,
//    "uptime_seconds":12.3,              since construction
//    "interval_seconds":4.5,             since the last reset() (equals uptime without one)
//    "operations":{
//      "read":{"count":N,                requests finished (failed ones included)
//              "bytes":N,"errors":N,
//              "in_flight":N,"in_flight_peak":N,
//              "fuse_latency_us":{"p50":x,"p90":x,"p99":x,"p99.9":x,"max":x,"mean":x,"count":N},
//              "nbd_latency_us":{...same keys...}},
//      "write":{...},"flush":{...},"trim_zero":{...},"block_status":{...}},
//    "in_flight":{"now":N,"peak":N},
//    "connections":[{"index":0,"role":"data"|"block_status","commands":N,"errors":N,"disconnects":N,"reconnects":N,
//                    "outage_us":x}, ...],
//    "disconnects":N,"reconnects":N,
//    "injected":{"delays":N,"delay_total_us":x,"errors":N},
//    "spliced_reads":{"piped":N,"fallbacks":N},  READs answered by splice(), and those
//                                        started so but copied after all (see fuse_front/reply_pipe.hpp)
//    "spliced_writes":{"by_reference":N,"retired":N},  WRITEs whose payload the socket took by
//                                        reference, and receive buffers retired after such a WRITE failed
//    "histograms":{"read":{"fuse":[[upper_bound_us,count],...],"nbd":[...]},...}}
// Latencies are microseconds with one decimal (bucket bounds with three). Histogram lists hold
// only non-empty buckets, in increasing order; a bucket holds samples below its upper bound and
// at or above the previous bucket's. Every operation appears in "operations" and "histograms".
// The FUSE span covers failed requests too: a failure is latency the application saw.
#pragma once

#include "bridge/latency_histogram.hpp"

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace bridge {

// Built with -DNBDBRIDGE_WITHOUT_STATISTICS (cmake -DNBDBRIDGE_STATISTICS=OFF) the
// request path records nothing; tools/bench compares the two builds.
#ifdef NBDBRIDGE_WITHOUT_STATISTICS
inline constexpr bool statistics_compiled_in = false;
#else
inline constexpr bool statistics_compiled_in = true;
#endif

enum class Operation { read, write, flush, trim_zero, block_status, count_ };  // count_ = number of kinds

inline constexpr std::size_t operation_kinds = std::size_t(Operation::count_);

// The JSON key and summary-line label of an operation.
std::string_view operation_name(Operation operation);

class Statistics {
 public:
  explicit Statistics(std::size_t connections = 1);

  // Not on the hot path: resizes the per-connection table, keeping existing counters.
  void set_connections(std::size_t connections);  // new ones are "data" until told otherwise
  void set_connection_role(std::size_t index, const char* role);

  // FUSE span: from FUSE arrival to FUSE reply.
  void request_started(Operation operation);
  void request_finished(Operation operation, std::uint64_t bytes, bool failed, std::uint64_t fuse_nanoseconds);

  // NBD span: from sending the NBD command to its reply. A connection index outside the table
  // still feeds the latency histogram, but not the per-connection counters.
  void command_finished(Operation operation, std::size_t connection, std::uint64_t nbd_nanoseconds, bool failed);

  void connection_lost(std::size_t connection);
  void connection_restored(std::size_t connection, std::uint64_t outage_nanoseconds);

  void injected_delay(std::uint64_t nanoseconds);
  void injected_error();

  // A request answered before its commands finished (--request-timeout, a signal, a
  // stop), and such a request's end: a gauge of what stalled servers still hold.
  void answered_early(bool finished) { finished ? --answered_running_ : ++answered_running_; }

  // A READ started as a spliced reply: whole (sent from the pipe) or fell back to a copy.
  void spliced_read(bool whole);
  // A WRITE whose payload pages went to the socket by reference; retired: it
  // failed, so its receive buffer is unmapped instead of reused.
  void spliced_write(bool retired);
  // A read-ahead window fetched (bridge/read_ahead.hpp), and a READ answered from one.
  void read_ahead_fetched(std::uint64_t bytes, bool failed);
  void read_ahead_served(std::uint64_t bytes) {
    ++read_ahead_reads_;
    read_ahead_served_bytes_ += bytes;
  }

  // Zeroes everything but the in-flight-now gauges; peaks restart from the current level.
  void reset();

  std::string to_json() const;
  // e.g. "read 12345 ops 48.2 MiB p50 85us p99 310us | write ... | in-flight 64 (peak 64) | reconnects 0"
  std::string summary_line() const;

  // For tests and for callers that want numbers rather than text.
  struct OperationCounters {
    std::uint64_t count = 0;
    std::uint64_t bytes = 0;
    std::uint64_t errors = 0;
    std::uint64_t in_flight = 0;
    std::uint64_t in_flight_peak = 0;
    LatencyHistogram fuse_latency;
    LatencyHistogram nbd_latency;
  };
  struct ConnectionCounters {
    std::uint64_t commands = 0;
    std::uint64_t errors = 0;
    std::uint64_t disconnects = 0;
    std::uint64_t reconnects = 0;
    std::uint64_t outage_nanoseconds = 0;
    const char* role = "data";  // "data", "block_status" or "large_writes"
  };
  const OperationCounters& operation(Operation operation) const { return operations_[std::size_t(operation)]; }
  const std::vector<ConnectionCounters>& connections() const { return connections_; }
  std::uint64_t in_flight() const { return in_flight_; }
  std::uint64_t in_flight_peak() const { return in_flight_peak_; }
  std::uint64_t answered_running() const { return answered_running_; }
  std::uint64_t disconnects() const { return disconnects_; }
  std::uint64_t reconnects() const { return reconnects_; }
  std::uint64_t injected_delays() const { return injected_delays_; }
  std::uint64_t injected_delay_nanoseconds() const { return injected_delay_nanoseconds_; }
  std::uint64_t injected_errors() const { return injected_errors_; }
  std::uint64_t spliced_reads() const { return spliced_reads_; }
  std::uint64_t splice_fallbacks() const { return splice_fallbacks_; }
  std::uint64_t spliced_writes() const { return spliced_writes_; }
  std::uint64_t retired_write_buffers() const { return retired_write_buffers_; }
  std::uint64_t read_ahead_windows() const { return read_ahead_windows_; }
  std::uint64_t read_ahead_reads() const { return read_ahead_reads_; }

 private:
  using Clock = std::chrono::steady_clock;

  OperationCounters& counters(Operation operation) { return operations_[std::size_t(operation)]; }

  Clock::time_point started_ = Clock::now();
  Clock::time_point last_reset_ = started_;
  // ~33 KiB per histogram, so a Statistics is ~330 KiB: keep one per bridge, not per request.
  std::array<OperationCounters, operation_kinds> operations_{};
  std::vector<ConnectionCounters> connections_;
  std::uint64_t in_flight_ = 0;
  std::uint64_t in_flight_peak_ = 0;
  std::uint64_t answered_running_ = 0;  // a gauge: reset() keeps it
  std::uint64_t disconnects_ = 0;
  std::uint64_t reconnects_ = 0;
  std::uint64_t injected_delays_ = 0;
  std::uint64_t injected_delay_nanoseconds_ = 0;
  std::uint64_t injected_errors_ = 0;
  std::uint64_t spliced_reads_ = 0;
  std::uint64_t splice_fallbacks_ = 0;
  std::uint64_t spliced_writes_ = 0;
  std::uint64_t retired_write_buffers_ = 0;
  std::uint64_t read_ahead_windows_ = 0;
  std::uint64_t read_ahead_failed_windows_ = 0;
  std::uint64_t read_ahead_fetched_bytes_ = 0;
  std::uint64_t read_ahead_reads_ = 0;
  std::uint64_t read_ahead_served_bytes_ = 0;
};

}  // namespace bridge
