// Recording and rendering of the bridge's statistics. Loop thread only; the recording half
// never allocates, the rendering half (to_json, summary_line) builds fresh strings each call.
#include "bridge/statistics.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>

namespace bridge {

namespace {

constexpr std::array<std::string_view, operation_kinds> operation_names = {
    "read", "write", "flush", "trim_zero", "block_status"};

void append_unsigned(std::string& out, std::uint64_t value) {
  char digits[24];
  auto end = std::to_chars(digits, digits + sizeof digits, value).ptr;
  out.append(digits, end);
}

// Fixed-point, never exponent notation, never NaN or infinity: JSON has no spelling for those.
void append_fixed(std::string& out, double value, int decimals) {
  if (!(value == value) || value > 1e18 || value < -1e18) value = 0;
  char text[48];
  int length = std::snprintf(text, sizeof text, "%.*f", decimals, value);
  if (length > 0) out.append(text, std::size_t(length));
}

void append_microseconds(std::string& out, double nanoseconds) { append_fixed(out, nanoseconds / 1000.0, 1); }

void append_key(std::string& out, std::string_view key) {
  out += '"';
  out += key;
  out += "\":";
}

void append_latency(std::string& out, std::string_view key, const LatencyHistogram& histogram) {
  append_key(out, key);
  out += "{\"p50\":";
  append_microseconds(out, double(histogram.percentile(50)));
  out += ",\"p90\":";
  append_microseconds(out, double(histogram.percentile(90)));
  out += ",\"p99\":";
  append_microseconds(out, double(histogram.percentile(99)));
  out += ",\"p99.9\":";
  append_microseconds(out, double(histogram.percentile(99.9)));
  out += ",\"max\":";
  append_microseconds(out, double(histogram.max()));
  out += ",\"mean\":";
  append_microseconds(out, histogram.mean());
  out += ",\"count\":";
  append_unsigned(out, histogram.count());
  out += '}';
}

void append_buckets(std::string& out, std::string_view key, const LatencyHistogram& histogram) {
  append_key(out, key);
  out += '[';
  bool first = true;
  for (std::size_t index = 0; index < LatencyHistogram::bucket_count; ++index) {
    std::uint64_t count = histogram.bucket(index);
    if (count == 0) continue;
    if (!first) out += ',';
    first = false;
    out += '[';
    append_fixed(out, double(LatencyHistogram::bucket_upper(index)) / 1000.0, 3);
    out += ',';
    append_unsigned(out, count);
    out += ']';
  }
  out += ']';
}

double seconds_since(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// "85us", "12.3ms", "1.20s": short enough for a status line, precise enough to compare.
void append_duration(std::string& out, std::uint64_t nanoseconds) {
  if (nanoseconds < 1'000'000) {
    append_unsigned(out, (nanoseconds + 500) / 1000);
    out += "us";
  } else if (nanoseconds < 1'000'000'000) {
    append_fixed(out, double(nanoseconds) / 1e6, 1);
    out += "ms";
  } else {
    append_fixed(out, double(nanoseconds) / 1e9, 2);
    out += 's';
  }
}

void append_bytes(std::string& out, std::uint64_t bytes) {
  constexpr double mebibyte = 1024.0 * 1024.0;
  if (bytes >= std::uint64_t(10) * 1024 * 1024 * 1024) {
    append_fixed(out, double(bytes) / (mebibyte * 1024.0), 1);
    out += " GiB";
  } else {
    append_fixed(out, double(bytes) / mebibyte, 1);
    out += " MiB";
  }
}

}  // namespace

std::string_view operation_name(Operation operation) {
  auto index = std::size_t(operation);
  return index < operation_kinds ? operation_names[index] : std::string_view("unknown");
}

Statistics::Statistics(std::size_t connections) : connections_(connections) {}

void Statistics::set_connections(std::size_t connections) { connections_.resize(connections); }

void Statistics::set_connection_role(std::size_t index, const char* role) {
  if (index < connections_.size()) connections_[index].role = role;
}

void Statistics::request_started(Operation operation) {
  auto& kind = counters(operation);
  ++kind.in_flight;
  kind.in_flight_peak = std::max(kind.in_flight_peak, kind.in_flight);
  ++in_flight_;
  in_flight_peak_ = std::max(in_flight_peak_, in_flight_);
}

void Statistics::request_finished(Operation operation, std::uint64_t bytes, bool failed,
                                  std::uint64_t fuse_nanoseconds) {
  auto& kind = counters(operation);
  // A finish without a start (e.g. a caller that only reports) must not wrap the gauges.
  if (kind.in_flight > 0) --kind.in_flight;
  if (in_flight_ > 0) --in_flight_;
  ++kind.count;
  kind.bytes += bytes;
  if (failed) ++kind.errors;
  kind.fuse_latency.record(fuse_nanoseconds);
}

void Statistics::command_finished(Operation operation, std::size_t connection, std::uint64_t nbd_nanoseconds,
                                  bool failed) {
  counters(operation).nbd_latency.record(nbd_nanoseconds);
  if (connection >= connections_.size()) return;
  auto& link = connections_[connection];
  ++link.commands;
  if (failed) ++link.errors;
}

void Statistics::connection_lost(std::size_t connection) {
  ++disconnects_;
  if (connection < connections_.size()) ++connections_[connection].disconnects;
}

void Statistics::connection_restored(std::size_t connection, std::uint64_t outage_nanoseconds) {
  ++reconnects_;
  if (connection >= connections_.size()) return;
  ++connections_[connection].reconnects;
  connections_[connection].outage_nanoseconds += outage_nanoseconds;
}

void Statistics::injected_delay(std::uint64_t nanoseconds) {
  ++injected_delays_;
  injected_delay_nanoseconds_ += nanoseconds;
}

void Statistics::injected_error() { ++injected_errors_; }

void Statistics::spliced_read(bool whole) { ++(whole ? spliced_reads_ : splice_fallbacks_); }

void Statistics::spliced_write(bool retired) {
  ++spliced_writes_;
  if (retired) ++retired_write_buffers_;
}

void Statistics::reset() {
  for (auto& kind : operations_) {
    std::uint64_t still_in_flight = kind.in_flight;
    kind = OperationCounters{};
    kind.in_flight = still_in_flight;
    kind.in_flight_peak = still_in_flight;
  }
  for (auto& link : connections_) link = ConnectionCounters{.role = link.role};
  in_flight_peak_ = in_flight_;
  disconnects_ = reconnects_ = 0;
  injected_delays_ = injected_delay_nanoseconds_ = injected_errors_ = 0;
  spliced_reads_ = splice_fallbacks_ = 0;
  spliced_writes_ = retired_write_buffers_ = 0;
  last_reset_ = Clock::now();
}

std::string Statistics::to_json() const {
  std::string out;
  out.reserve(4096);
  out += "{\"version\":1,\"uptime_seconds\":";
  append_fixed(out, seconds_since(started_), 3);
  out += ",\"interval_seconds\":";
  append_fixed(out, seconds_since(last_reset_), 3);

  out += ",\"operations\":{";
  for (std::size_t index = 0; index < operation_kinds; ++index) {
    const auto& kind = operations_[index];
    if (index) out += ',';
    append_key(out, operation_names[index]);
    out += "{\"count\":";
    append_unsigned(out, kind.count);
    out += ",\"bytes\":";
    append_unsigned(out, kind.bytes);
    out += ",\"errors\":";
    append_unsigned(out, kind.errors);
    out += ",\"in_flight\":";
    append_unsigned(out, kind.in_flight);
    out += ",\"in_flight_peak\":";
    append_unsigned(out, kind.in_flight_peak);
    out += ',';
    append_latency(out, "fuse_latency_us", kind.fuse_latency);
    out += ',';
    append_latency(out, "nbd_latency_us", kind.nbd_latency);
    out += '}';
  }
  out += "},\"in_flight\":{\"now\":";
  append_unsigned(out, in_flight_);
  out += ",\"peak\":";
  append_unsigned(out, in_flight_peak_);

  out += "},\"connections\":[";
  for (std::size_t index = 0; index < connections_.size(); ++index) {
    const auto& link = connections_[index];
    if (index) out += ',';
    out += "{\"index\":";
    append_unsigned(out, index);
    out += ",\"role\":\"";
    out += link.role;
    out += '"';
    out += ",\"commands\":";
    append_unsigned(out, link.commands);
    out += ",\"errors\":";
    append_unsigned(out, link.errors);
    out += ",\"disconnects\":";
    append_unsigned(out, link.disconnects);
    out += ",\"reconnects\":";
    append_unsigned(out, link.reconnects);
    out += ",\"outage_us\":";
    append_microseconds(out, double(link.outage_nanoseconds));
    out += '}';
  }
  out += "],\"disconnects\":";
  append_unsigned(out, disconnects_);
  out += ",\"reconnects\":";
  append_unsigned(out, reconnects_);

  out += ",\"injected\":{\"delays\":";
  append_unsigned(out, injected_delays_);
  out += ",\"delay_total_us\":";
  append_microseconds(out, double(injected_delay_nanoseconds_));
  out += ",\"errors\":";
  append_unsigned(out, injected_errors_);
  out += "},\"spliced_reads\":{\"piped\":";
  append_unsigned(out, spliced_reads_);
  out += ",\"fallbacks\":";
  append_unsigned(out, splice_fallbacks_);
  out += "},\"spliced_writes\":{\"by_reference\":";
  append_unsigned(out, spliced_writes_);
  out += ",\"retired\":";
  append_unsigned(out, retired_write_buffers_);

  out += "},\"histograms\":{";
  for (std::size_t index = 0; index < operation_kinds; ++index) {
    const auto& kind = operations_[index];
    if (index) out += ',';
    append_key(out, operation_names[index]);
    out += '{';
    append_buckets(out, "fuse", kind.fuse_latency);
    out += ',';
    append_buckets(out, "nbd", kind.nbd_latency);
    out += '}';
  }
  out += "}}";
  return out;
}

std::string Statistics::summary_line() const {
  std::string out;
  for (std::size_t index = 0; index < operation_kinds; ++index) {
    const auto& kind = operations_[index];
    // Reads and writes always show, so consecutive lines line up; the rest only once they occur.
    bool always_shown = index == std::size_t(Operation::read) || index == std::size_t(Operation::write);
    if (!always_shown && kind.count == 0 && kind.in_flight == 0) continue;
    if (!out.empty()) out += " | ";
    out += operation_names[index];
    out += ' ';
    append_unsigned(out, kind.count);
    out += " ops ";
    if (index == std::size_t(Operation::read) || index == std::size_t(Operation::write)) {
      append_bytes(out, kind.bytes);
      out += ' ';
    }
    if (kind.errors) {
      append_unsigned(out, kind.errors);
      out += " errors ";
    }
    out += "p50 ";
    append_duration(out, kind.fuse_latency.percentile(50));
    out += " p99 ";
    append_duration(out, kind.fuse_latency.percentile(99));
  }
  out += " | in-flight ";
  append_unsigned(out, in_flight_);
  out += " (peak ";
  append_unsigned(out, in_flight_peak_);
  out += ") | reconnects ";
  append_unsigned(out, reconnects_);
  if (injected_delays_ || injected_errors_) {
    out += " | injected ";
    append_unsigned(out, injected_delays_);
    out += " delays ";
    append_unsigned(out, injected_errors_);
    out += " errors";
  }
  return out;
}

}  // namespace bridge
